#!/usr/bin/env bash
# Everything tests/node/start.sh needs, installed/built only when missing:
#   Debian packages: containerd, runc, containernetworking-plugins, iptables,
#     conntrack, iproute2, util-linux (nsenter, unshare, findmnt), bind9-dnsutils
#     (dig), rabbitmq-server, openssl, curl
#   Go tools (tests/controlplane/ensure-tools.sh node): kube-apiserver,
#     kube-controller-manager, kubectl, etcd, helm, kubelet, kube-proxy,
#     kube-scheduler, coredns, and the pause (sandbox) image archive.
# Silent when everything is there.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have containerd || need+=(containerd)
have runc || need+=(runc)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ] \
    && [ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
have iptables || need+=(iptables)
have conntrack || need+=(conntrack)
have ip || need+=(iproute2)
{ have nsenter && have unshare && have findmnt && have flock; } || need+=(util-linux)
have dig || need+=(bind9-dnsutils)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
if [ "${#need[@]}" -gt 0 ]; then
    # shellcheck source=../controlplane/lib.sh
    source "$HERE/../controlplane/lib.sh"
    ht_apt_install "${need[@]}"
    # Debian's packages may start their services (containerd on
    # /run/containerd/containerd.sock, a rabbitmq on 127.0.0.1:5672) where
    # policy-rc.d allows it: harmless, the node runs its own instances with
    # their own sockets/ports in its own network namespace.
fi

exec "$HERE/../controlplane/ensure-tools.sh" node
