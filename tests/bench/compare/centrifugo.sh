#!/usr/bin/env bash
# The Centrifugo peer of compare.sh (see README.md, "Centrifugo"): builds a
# pinned Centrifugo from the Go module proxy once, and writes the bench's
# configuration for it.
#
#   centrifugo.sh build                 build when missing; print the binary's path
#   centrifugo.sh config FILE PORT KEY  write the bench configuration to FILE
#
# compare.sh sources this file for the two functions.
#
# The binary is cached in ${HT_CACHE:-$HOME/.cache/high-templar}/centrifugo-<version>/
# (Go from PATH or /usr/local/go; the module's own go.mod and go.sum, verified
# against the checksum database, pin every dependency).

HTC_CENTRIFUGO_VERSION=${HTC_CENTRIFUGO_VERSION:-v6.9.1}

# centrifugo_build: builds (when missing) and prints the path of the binary.
centrifugo_build() {
  local version=$HTC_CENTRIFUGO_VERSION
  local dir="${HT_CACHE:-$HOME/.cache/high-templar}/centrifugo-$version"
  local bin="$dir/centrifugo" go=go start
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  command -v go >/dev/null 2>&1 || go=/usr/local/go/bin/go
  if ! command -v "$go" >/dev/null 2>&1; then
    echo "centrifugo: no Go toolchain (need go on PATH or in /usr/local/go)" >&2
    return 1
  fi
  echo "centrifugo: building $version from the Go module proxy (first run only, ~5 min on 2 cores)" >&2
  start=$SECONDS
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  # go install MODULE@VERSION builds with that module's go.mod (no replace
  # directives in it), outside any workspace. The version string is the one
  # Centrifugo's release builds set (.goreleaser.yml ldflags); without it
  # `centrifugo version` says 0.0.0. CGO off: a static binary, as released.
  if ! (cd "$dir.tmp" && GOWORK=off GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOBIN="$dir.tmp" \
    nice -n 19 "$go" install -trimpath \
    -ldflags "-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version=${version#v}" \
    "github.com/centrifugal/centrifugo/v6@$version" >&2); then
    echo "centrifugo: go install failed" >&2
    rm -rf "$dir.tmp"
    return 1
  fi
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  echo "centrifugo: built $bin in $((SECONDS - start)) s" >&2
  echo "$bin"
}

# centrifugo_config FILE PORT KEY: the bench's configuration. Keys are v6's
# (internal/config/config.go and internal/configtypes/types.go of the module):
# * http_server: listen on loopback only; the HTTP API and /health are served
#   on the same port (no http_server.internal_port);
# * engine memory: one node, no Redis (the default; written out to be plain);
# * client.allow_anonymous_connect_without_token: the bench's clients have no
#   JWT, as the 3.x clients have no credential the gateway checks itself;
# * channel.without_namespace allow_subscribe_for_client +
#   allow_subscribe_for_anonymous: both are needed for an anonymous client
#   to subscribe (internal/client/handler.go); no history, no presence, no
#   recovery: a publication goes to the subscribers only, as in the gateway;
# * http_api.key: what --trigger-token sends as X-API-Key;
# * client pings keep their defaults (25 s, pong within 8 s): the bench
#   answers them, as it answers the gateway's websocket pings;
# * log level error: no per-connection lines in the measured process;
#   usage_stats disabled: no calls out.
centrifugo_config() {
  local file=$1 port=$2 key=$3
  cat >"$file" <<EOF
{
  "http_server": {"address": "127.0.0.1", "port": $port},
  "log": {"level": "error"},
  "engine": {"type": "memory"},
  "client": {"allow_anonymous_connect_without_token": true},
  "channel": {
    "without_namespace": {"allow_subscribe_for_client": true, "allow_subscribe_for_anonymous": true}
  },
  "http_api": {"key": "$key"},
  "health": {"enabled": true},
  "usage_stats": {"disabled": true}
}
EOF
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    build) centrifugo_build ;;
    config) [ $# -eq 4 ] || { echo "usage: centrifugo.sh config FILE PORT KEY" >&2; exit 2; }
            centrifugo_config "$2" "$3" "$4" ;;
    *) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
fi
