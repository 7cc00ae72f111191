#!/usr/bin/env bash
# Start a throw-away Kubernetes control plane on loopback for integration tests:
# etcd + kube-apiserver (+ kube-controller-manager for garbage collection,
# namespace deletion and default ServiceAccounts). No kubelet, no scheduler,
# no kube-proxy: Pods are stored but never run.
#
# Usage: start.sh WORKDIR
#
# Everything (certs, keys, etcd data, logs) lives under WORKDIR. On success it
# writes WORKDIR/kubeconfig (cluster-admin) and WORKDIR/env (shell-sourceable,
# see README.md), waits for /readyz, and exits leaving the processes running.
# The caller MUST run `stop.sh WORKDIR` afterwards (e.g. in `trap ... EXIT`).
# As a safety net a watchdog runs stop.sh when the caller (the parent process
# of start.sh, or $HT_WATCH_PID) exits, or after $HT_MAX_LIFETIME seconds.
#
# Environment (all optional):
#   HT_APISERVER_PORT, HT_ETCD_PORT, HT_ETCD_PEER_PORT, HT_KCM_PORT
#                          fixed ports (default: random free ports on 127.0.0.1)
#   HT_CONTROLLER_MANAGER  1 (default) to run kube-controller-manager, 0 not to
#   HT_WATCH_PID           pid whose exit stops the control plane
#                          (default: parent of start.sh; 0 = don't watch)
#   HT_MAX_LIFETIME        seconds before the watchdog stops it anyway
#                          (default 10800 = 3h; 0 = no limit)
#   HT_START_TIMEOUT       seconds to wait for readiness (default 120)
#   HT_CACHE               tool cache (default ~/.cache/high-templar)
# shellcheck disable=SC2016,SC2034  # single-quoted inner scripts; vars read via ${!v}
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 WORKDIR" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

mkdir -p "$1"
W="$(cd "$1" && pwd)"
WATCH_PID="${HT_WATCH_PID:-$PPID}"
MAX_LIFETIME="${HT_MAX_LIFETIME:-10800}"
START_TIMEOUT="${HT_START_TIMEOUT:-120}"
WITH_KCM="${HT_CONTROLLER_MANAGER:-1}"

log() { echo "start.sh: $*" >&2; }
die() { log "$*"; exit 1; }

if [ -f "$W/env" ]; then
    die "$W/env exists: a control plane may already run there (run stop.sh $W first)"
fi

tools=(kube-apiserver etcd)
[ "$WITH_KCM" = 1 ] && tools+=(kube-controller-manager)
"$HERE/ensure-tools.sh" "${tools[@]}"

# --- ports -------------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
TAKEN=" "
pick_port() {
    local p i
    for i in $(seq 1 200); do
        # 20000-32767: below Linux' default ephemeral range (32768-60999).
        p=$((20000 + RANDOM % 12768))
        case "$TAKEN" in *" $p "*) continue ;; esac
        port_in_use "$p" && continue
        TAKEN+="$p "
        echo "$p"
        return 0
    done
    die "no free port found"
}
ETCD_PORT="${HT_ETCD_PORT:-$(pick_port)}"; TAKEN+="$ETCD_PORT "
ETCD_PEER_PORT="${HT_ETCD_PEER_PORT:-$(pick_port)}"; TAKEN+="$ETCD_PEER_PORT "
APISERVER_PORT="${HT_APISERVER_PORT:-$(pick_port)}"; TAKEN+="$APISERVER_PORT "
KCM_PORT="${HT_KCM_PORT:-$(pick_port)}"; TAKEN+="$KCM_PORT "

ETCD_URL="http://127.0.0.1:$ETCD_PORT"
APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"

mkdir -p "$W/pki" "$W/logs" "$W/etcd" "$W/run"
chmod 700 "$W/pki" "$W/etcd"

# If anything below fails, take down what was started.
STARTED_PIDS=()
cleanup_on_failure() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        local p
        for p in "${STARTED_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        for f in etcd kube-apiserver kube-controller-manager; do
            if [ -s "$W/logs/$f.log" ]; then
                log "---- last lines of $W/logs/$f.log"
                tail -n 25 "$W/logs/$f.log" >&2 || true
            fi
        done
        rm -f "$W/env"
    fi
}
trap cleanup_on_failure EXIT

# --- PKI (openssl) ---------------------------------------------------------------
P="$W/pki"
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# sign NAME SUBJECT EXTENSIONS...: NAME.key/NAME.crt signed by the CA.
sign() {
    local name="$1" subj="$2"; shift 2
    local ext="$P/$name.ext"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "$@" >"$ext"
    ec_key "$P/$name.key"
    openssl req -new -key "$P/$name.key" -subj "$subj" -out "$P/$name.csr" 2>/dev/null
    openssl x509 -req -in "$P/$name.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
        -extfile "$ext" -out "$P/$name.crt" 2>/dev/null
    rm -f "$P/$name.csr" "$ext"
}
ec_key "$P/ca.key"
openssl req -x509 -new -key "$P/ca.key" -subj "/CN=high-templar-test-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$P/ca.crt" 2>/dev/null
sign apiserver "/CN=kube-apiserver" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
sign admin "/O=system:masters/CN=high-templar-admin" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth"
# ServiceAccount token signing key pair (RS256).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$P/sa.key" 2>/dev/null
openssl pkey -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
# Static bearer token for cluster-admin (handy for curl).
ADMIN_TOKEN="$(openssl rand -hex 24)"
printf '%s,high-templar-admin,high-templar-admin,"system:masters"\n' "$ADMIN_TOKEN" >"$P/tokens.csv"
chmod 600 "$P"/*.key "$P/tokens.csv"

b64() { base64 -w0 <"$1"; }
cat >"$W/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: high-templar-test
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$P/ca.crt")
users:
- name: high-templar-admin
  user:
    client-certificate-data: $(b64 "$P/admin.crt")
    client-key-data: $(b64 "$P/admin.key")
contexts:
- name: high-templar-test
  context:
    cluster: high-templar-test
    user: high-templar-admin
    namespace: default
current-context: high-templar-test
EOF
chmod 600 "$W/kubeconfig"

# --- processes -------------------------------------------------------------------
# run NAME CMD...: start CMD detached (own session, stdin closed), log to
# logs/NAME.log, pid to run/NAME.pid. The pid is the one of CMD itself.
run() {
    local name="$1"; shift
    rm -f "$W/run/$name.pid"
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$W/run/$name.pid" "$@" \
        </dev/null >>"$W/logs/$name.log" 2>&1 &
    local i
    for i in $(seq 1 50); do [ -s "$W/run/$name.pid" ] && break; sleep 0.1; done
    [ -s "$W/run/$name.pid" ] || die "$name did not start"
    STARTED_PIDS+=("$(cat "$W/run/$name.pid")")
}
alive() {
    local st
    st="$(sed 's/.*) //' "/proc/$(cat "$W/run/$1.pid")/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}
# wait_for NAME WHAT CMD...: poll CMD until it succeeds while NAME is alive.
wait_for() {
    local name="$1" what="$2"; shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        alive "$name" || die "$name exited while waiting for $what"
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${START_TIMEOUT}s waiting for $what"
        sleep 0.2
    done
}

run etcd "$HT_ETCD" \
    --name=high-templar \
    --data-dir="$W/etcd" \
    --listen-client-urls="$ETCD_URL" \
    --advertise-client-urls="$ETCD_URL" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="high-templar=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state=new \
    --unsafe-no-fsync \
    --log-level=warn
etcd_healthy() { curl -fsS --max-time 2 "$ETCD_URL/health" | grep -q '"health":"true"'; }
wait_for etcd "etcd $ETCD_URL/health" etcd_healthy

ISSUER="https://kubernetes.default.svc.cluster.local"
# --endpoint-reconciler-type=none: the apiserver refuses a loopback
#   --advertise-address with an endpoint reconciler; nothing routes to the
#   "kubernetes" Service here anyway.
# --requestheader-*: only so that kube-controller-manager finds a front-proxy
#   CA (it logs errors every second otherwise); no cert has that CN.
run kube-apiserver "$HT_KUBE_APISERVER" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$APISERVER_PORT" \
    --etcd-servers="$ETCD_URL" \
    --cert-dir="$W/pki/apiserver-generated" \
    --tls-cert-file="$P/apiserver.crt" \
    --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --token-auth-file="$P/tokens.csv" \
    --requestheader-client-ca-file="$P/ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.96.0.0/16 \
    --service-account-issuer="$ISSUER" \
    --api-audiences="$ISSUER" \
    --service-account-key-file="$P/sa.pub" \
    --service-account-signing-key-file="$P/sa.key" \
    --allow-privileged=true \
    --profiling=false \
    --v=1
apiserver_ready() {
    curl -fsS --max-time 2 --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
        "$APISERVER_URL/readyz" | grep -qx ok
}
wait_for kube-apiserver "kube-apiserver $APISERVER_URL/readyz" apiserver_ready

KCM_PID=""
if [ "$WITH_KCM" = 1 ]; then
    run kube-controller-manager "$HT_KUBE_CONTROLLER_MANAGER" \
        --kubeconfig="$W/kubeconfig" \
        --authentication-kubeconfig="$W/kubeconfig" \
        --authorization-kubeconfig="$W/kubeconfig" \
        --bind-address=127.0.0.1 \
        --secure-port="$KCM_PORT" \
        --cert-dir="$W/pki/kcm-generated" \
        --leader-elect=false \
        --use-service-account-credentials=false \
        --service-account-private-key-file="$P/sa.key" \
        --root-ca-file="$P/ca.crt" \
        --cluster-signing-cert-file="$P/ca.crt" \
        --cluster-signing-key-file="$P/ca.key" \
        --profiling=false \
        --v=1
    kcm_healthy() { curl -fsSk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz" | grep -qx ok; }
    wait_for kube-controller-manager "kube-controller-manager healthz" kcm_healthy
    KCM_PID="$(cat "$W/run/kube-controller-manager.pid")"
fi

ETCD_PID="$(cat "$W/run/etcd.pid")"
APISERVER_PID="$(cat "$W/run/kube-apiserver.pid")"

# --- watchdog ----------------------------------------------------------------------
# Stops the control plane when $WATCH_PID exits or after $MAX_LIFETIME seconds,
# in case the caller dies without running stop.sh.
setsid bash -c '
    echo $$ >"$0/run/watchdog.pid"
    watch="$1"; max="$2"
    while sleep 2; do
        if [ "$watch" != 0 ] && ! kill -0 "$watch" 2>/dev/null; then break; fi
        if [ "$max" != 0 ] && [ "$SECONDS" -ge "$max" ]; then break; fi
    done
    HT_FROM_WATCHDOG=1 exec "$3" "$0"
' "$W" "$WATCH_PID" "$MAX_LIFETIME" "$HERE/stop.sh" </dev/null >>"$W/logs/watchdog.log" 2>&1 &
for i in $(seq 1 50); do [ -s "$W/run/watchdog.pid" ] && break; sleep 0.1; done
WATCHDOG_PID="$(cat "$W/run/watchdog.pid" 2>/dev/null || true)"

# --- env -----------------------------------------------------------------------------
{
    echo "# Written by tests/controlplane/start.sh; source it. Stop with: stop.sh $W"
    for v in HT_WORKDIR KUBECONFIG APISERVER_URL APISERVER_PORT APISERVER_CA_FILE APISERVER_TOKEN \
        ETCD_URL ETCD_PID APISERVER_PID CONTROLLER_MANAGER_PID WATCHDOG_PID \
        KUBE_VERSION HT_KUBECTL HT_HELM HT_BIN; do
        case "$v" in
            HT_WORKDIR) val="$W" ;;
            KUBECONFIG) val="$W/kubeconfig" ;;
            APISERVER_CA_FILE) val="$P/ca.crt" ;;
            APISERVER_TOKEN) val="$ADMIN_TOKEN" ;;
            CONTROLLER_MANAGER_PID) val="$KCM_PID" ;;
            *) val="${!v}" ;;
        esac
        printf 'export %s=%q\n' "$v" "$val"
    done
} >"$W/env.tmp"
mv "$W/env.tmp" "$W/env"
trap - EXIT
