// CoreDNS v1.15.0 with only the plugins the test node's Corefile uses
// (tests/node/start.sh): building all ~60 plugins of the upstream binary
// pulls in the cloud SDKs and takes minutes longer. Same start-up code as
// upstream's coredns.go; the plugin chain order comes from coremain's
// generated directive list, so it is the upstream order.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
