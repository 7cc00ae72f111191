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
    local p
    for _ in $(seq 1 200); do
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
        ht_print_logs etcd kube-apiserver kube-controller-manager
        rm -f "$W/env"
    fi
}
trap cleanup_on_failure EXIT

# --- PKI (openssl) ---------------------------------------------------------------
P="$W/pki"
ht_pki_ca
ht_pki_sign apiserver "/CN=kube-apiserver" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
ht_pki_client admin high-templar-admin system:masters
ht_pki_sa_keys
# Static bearer token for cluster-admin (handy for curl).
ADMIN_TOKEN="$(openssl rand -hex 24)"
printf '%s,high-templar-admin,high-templar-admin,"system:masters"\n' "$ADMIN_TOKEN" >"$P/tokens.csv"
chmod 600 "$P"/*.key "$P/tokens.csv"
ht_kubeconfig "$W/kubeconfig" "$APISERVER_URL" admin high-templar-admin

# --- processes -------------------------------------------------------------------
ht_etcd_args high-templar "$ETCD_URL" "http://127.0.0.1:$ETCD_PEER_PORT"
ht_run etcd "$HT_ETCD" "${ETCD_ARGS[@]}"
etcd_healthy() { curl -fsS --max-time 2 "$ETCD_URL/health" | grep -q '"health":"true"'; }
ht_wait_for etcd "etcd $ETCD_URL/health" etcd_healthy

# --endpoint-reconciler-type=none: the apiserver refuses a loopback
#   --advertise-address with an endpoint reconciler; nothing routes to the
#   "kubernetes" Service here anyway.
# (--requestheader-* in the common flags: only so that kube-controller-manager
#   finds a front-proxy CA, it logs errors every second otherwise.)
ht_apiserver_args "$ETCD_URL" 10.96.0.0/16
ht_run kube-apiserver "$HT_KUBE_APISERVER" "${APISERVER_ARGS[@]}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$APISERVER_PORT" \
    --authorization-mode=RBAC
apiserver_ready() {
    curl -fsS --max-time 2 --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
        "$APISERVER_URL/readyz" | grep -qx ok
}
ht_wait_for kube-apiserver "kube-apiserver $APISERVER_URL/readyz" apiserver_ready

KCM_PID=""
if [ "$WITH_KCM" = 1 ]; then
    ht_kcm_args "$W/kubeconfig" "$KCM_PORT" "$W/run/flexvolume"
    ht_run kube-controller-manager "$HT_KUBE_CONTROLLER_MANAGER" "${KCM_ARGS[@]}" \
        --use-service-account-credentials=false
    kcm_healthy() { curl -fsSk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz" | grep -qx ok; }
    ht_wait_for kube-controller-manager "kube-controller-manager healthz" kcm_healthy
    KCM_PID="$(cat "$W/run/kube-controller-manager.pid")"
fi

ETCD_PID="$(cat "$W/run/etcd.pid")"
APISERVER_PID="$(cat "$W/run/kube-apiserver.pid")"

# --- watchdog ----------------------------------------------------------------------
# Stops the control plane when $WATCH_PID exits or after $MAX_LIFETIME seconds,
# in case the caller dies without running stop.sh.
ht_start_watchdog "$HERE/stop.sh" "$WATCH_PID" "$MAX_LIFETIME"

# --- env -----------------------------------------------------------------------------
ht_write_env "Written by tests/controlplane/start.sh; source it. Stop with: stop.sh $W" \
    HT_WORKDIR="$W" KUBECONFIG="$W/kubeconfig" APISERVER_URL="$APISERVER_URL" APISERVER_PORT="$APISERVER_PORT" \
    APISERVER_CA_FILE="$P/ca.crt" APISERVER_TOKEN="$ADMIN_TOKEN" ETCD_URL="$ETCD_URL" ETCD_PID="$ETCD_PID" \
    APISERVER_PID="$APISERVER_PID" CONTROLLER_MANAGER_PID="$KCM_PID" WATCHDOG_PID="$WATCHDOG_PID" \
    KUBE_VERSION="$KUBE_VERSION" HT_KUBECTL="$HT_KUBECTL" HT_HELM="$HT_HELM" HT_BIN="$HT_BIN"
trap - EXIT
