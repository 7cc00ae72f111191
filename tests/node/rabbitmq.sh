#!/usr/bin/env bash
# Control the node's own RabbitMQ (started by tests/node/start.sh in the
# node's network namespace, reachable at 10.250.0.2:5672 from pods and host):
#
#   rabbitmq.sh WORKDIR stop     stop the broker application (rabbitmqctl stop_app):
#                                the AMQP listener closes, connections are dropped;
#                                the Erlang node keeps running, so start is quick
#   rabbitmq.sh WORKDIR start    start it again (start_app) and wait for the port
#   rabbitmq.sh WORKDIR status   print "running" (exit 0) or "stopped" (exit 3)
#
# The host's shared broker on 127.0.0.1:5672 is a different node: not touched.
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 WORKDIR stop|start|status" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
W="$(cd "$1" && pwd)"
ht_node_load_vars
die() { echo "node/rabbitmq.sh: $*" >&2; exit 1; }
if [ -z "$RABBITMQ_NODENAME" ] || [ ! -e "/run/netns/$NETNS" ]; then die "no running node in $W"; fi
[ -d "$RABBITMQ_DIR" ] || die "the node in $W runs without RabbitMQ (HT_NODE_RABBITMQ=0)"

ctl() { "${NSX[@]}" "${RABBITMQ_ENV[@]}" "$RABBITMQ_LIB/rabbitmqctl" -q -n "$RABBITMQ_NODENAME" "$@"; }
listening() { (exec 3<>"/dev/tcp/$NODE_IP/5672") 2>/dev/null; }

case "$2" in
    stop)
        ctl stop_app >/dev/null || die "rabbitmqctl stop_app failed"
        for _ in $(seq 1 50); do listening || exit 0; sleep 0.1; done
        die "port $NODE_IP:5672 still open after stop_app" ;;
    start)
        ctl start_app >/dev/null || die "rabbitmqctl start_app failed"
        for _ in $(seq 1 100); do listening && exit 0; sleep 0.1; done
        die "port $NODE_IP:5672 not open 10s after start_app" ;;
    status)
        if listening; then echo running; else echo stopped; exit 3; fi ;;
    *)
        die "unknown command '$2' (stop, start or status)" ;;
esac
