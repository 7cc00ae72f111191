#!/usr/bin/env bash
# Makes sure a RabbitMQ listens on 127.0.0.1:5672 for the tests: when none
# does, installs Debian's rabbitmq-server (if missing) and starts it bound
# to loopback. Idempotent; fails with a message saying what to do.
set -euo pipefail

listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
fail() { echo "tests/rabbitmq.sh: $*" >&2; exit 1; }

listening && exit 0

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  [ "$(id -u)" = 0 ] || fail "RabbitMQ is not installed and this is not root: run 'apt-get install rabbitmq-server' as root, or start a RabbitMQ on 127.0.0.1:5672"
  echo "tests/rabbitmq.sh: installing Debian's rabbitmq-server"
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null \
    || fail "apt-get install rabbitmq-server failed"
fi
export PATH="$PATH:/usr/sbin"

echo "tests/rabbitmq.sh: starting rabbitmq-server on 127.0.0.1:5672"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_START_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
rabbitmq-server -detached || fail "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
# The node registers with epmd a moment after -detached returns; the AMQP
# port opens last, when booting is done.
for _ in $(seq 1 240); do
  if listening && rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.5
done
fail "RabbitMQ did not start within 2 minutes (see /var/log/rabbitmq/)"
