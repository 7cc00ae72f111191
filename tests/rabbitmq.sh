#!/usr/bin/env bash
# Makes sure a RabbitMQ listens for the tests on 127.0.0.1:5672 (AMQP) and
# 127.0.0.1:5671 (AMQP over TLS): when none does, installs Debian's
# rabbitmq-server (if missing) and starts it bound to loopback. Idempotent;
# fails with a message saying what to do.
#
# The TLS listener uses a CA and a server certificate this script makes once
# with openssl in $HT_RABBITMQ_TLS_DIR (default /var/lib/rabbitmq/ht-test-tls,
# the path the tests read; it outlives reboots so a running node and the files
# agree):
#   ca.pem                  the test CA (trust this to connect)
#   server.pem, server.key  the listener's certificate: SAN DNS:localhost only,
#                           so amqps://…@127.0.0.1:5671 is a hostname mismatch
#   client.pem, client.key  a client certificate from the same CA
#   rabbitmq.conf           the node's configuration (RABBITMQ_CONFIG_FILE)
# The listener verifies a client certificate when one is presented
# (verify_peer) and accepts connections without one (fail_if_no_peer_cert =
# false).
#
# A node already running without the TLS listener (started by an older
# version of this script) is restarted once with the configuration: the
# tests sharing it see one short outage, the next runs none.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
fail() { echo "tests/rabbitmq.sh: $*" >&2; exit 1; }

tls_dir=${HT_RABBITMQ_TLS_DIR:-/var/lib/rabbitmq/ht-test-tls}

if listening 5672 && listening 5671; then
  [ -r "$tls_dir/ca.pem" ] || fail "a RabbitMQ listens on 5671 but $tls_dir/ca.pem is missing: it was not started by this script; stop it (rabbitmqctl stop) and run tests/rabbitmq.sh again"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  [ "$(id -u)" = 0 ] || fail "RabbitMQ is not installed and this is not root: run 'apt-get install rabbitmq-server' as root, or start a RabbitMQ on 127.0.0.1:5672"
  echo "tests/rabbitmq.sh: installing Debian's rabbitmq-server"
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null \
    || fail "apt-get install rabbitmq-server failed"
fi
export PATH="$PATH:/usr/sbin"
if ! command -v openssl >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "openssl is needed to make the test CA: run 'apt-get install openssl' as root"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null || fail "apt-get install openssl failed"
fi

# The CA, the server and the client certificates, made once.
if [ ! -s "$tls_dir/client.key" ]; then
  [ "$(id -u)" = 0 ] || fail "$tls_dir is missing and this is not root: run tests/rabbitmq.sh as root once"
  echo "tests/rabbitmq.sh: making the test CA and certificates in $tls_dir"
  tmp=$(mktemp -d "${tls_dir%/*}/.ht-test-tls.XXXXXX")
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  (
    cd "$tmp"
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 36500 -subj "/CN=high-templar test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    for who in server client; do
      if [ "$who" = server ]; then usage="serverAuth"; san="subjectAltName=DNS:localhost"; else usage="clientAuth"; san="subjectAltName=DNS:high-templar-test-client"; fi
      openssl req "${ec[@]}" -keyout "$who.key" -out "$who.csr" -subj "/CN=high-templar test $who"
      printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n%s\n' "$usage" "$san" >"$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 36500 -extfile "$who.ext" -out "$who.pem"
      rm -f "$who.csr" "$who.ext"
    done
    rm -f ca.srl
  ) >/dev/null 2>&1 || { rm -rf "$tmp"; fail "openssl could not make the test certificates"; }
  chmod 0755 "$tmp"
  chmod 0644 "$tmp"/*.pem "$tmp/client.key"
  chmod 0600 "$tmp/ca.key" "$tmp/server.key"
  chown rabbitmq:rabbitmq "$tmp/server.key" 2>/dev/null || chmod 0644 "$tmp/server.key"
  rm -rf "$tls_dir"
  mv "$tmp" "$tls_dir"
fi

conf="$tls_dir/rabbitmq.conf"
cat >"$conf.tmp" <<EOF
# Written by tests/rabbitmq.sh.
listeners.tcp.default = 127.0.0.1:5672
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $tls_dir/ca.pem
ssl_options.certfile = $tls_dir/server.pem
ssl_options.keyfile = $tls_dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
EOF
chmod 0644 "$conf.tmp"
mv "$conf.tmp" "$conf"

if listening 5672; then
  # Running without the TLS listener; listeners are read at boot only.
  echo "tests/rabbitmq.sh: RabbitMQ runs without the TLS listener on 5671: restarting it once with $conf"
  rabbitmqctl stop >/dev/null 2>&1 || fail "rabbitmqctl stop failed: stop the RabbitMQ on 5672 yourself and run tests/rabbitmq.sh again"
  for _ in $(seq 1 120); do listening 5672 || break; sleep 0.5; done
  listening 5672 && fail "RabbitMQ did not stop within a minute"
fi

echo "tests/rabbitmq.sh: starting rabbitmq-server on 127.0.0.1:5672 and (TLS) 127.0.0.1:5671"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_CONFIG_FILE="$conf"
export RABBITMQ_SERVER_START_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
rabbitmq-server -detached || fail "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
# The node registers with epmd a moment after -detached returns; the AMQP
# ports open last, when booting is done.
for _ in $(seq 1 240); do
  if listening 5672 && rabbitmqctl await_startup --timeout 10 >/dev/null 2>&1; then
    listening 5671 || fail "RabbitMQ started but does not listen on 5671 (TLS): see /var/log/rabbitmq/ for ssl errors"
    exit 0
  fi
  sleep 0.5
done
fail "RabbitMQ did not start within 2 minutes (see /var/log/rabbitmq/)"
