# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
# Shared settings and helpers for ensure-tools.sh / start.sh / stop.sh here
# and for tests/node/*.sh. Sourced, not run.
#
# Versions are read from the pinned Go modules under go/, so go.mod is the
# single source of truth (bump a version there, run `go mod tidy`, done).

HT_CONTROLPLANE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HT_NODE_DIR="$(dirname "$HT_CONTROLPLANE_DIR")/node"
HT_CACHE="${HT_CACHE:-$HOME/.cache/high-templar}"

# Version of module $2 required by go/$1/go.mod.
ht_mod_version() {
    awk -v m="$2" '($1 == "require" && $2 == m) { print $3; exit } ($1 == m && $2 ~ /^v/) { print $2; exit }' \
        "$HT_CONTROLPLANE_DIR/go/$1/go.mod"
}

KUBE_VERSION="$(ht_mod_version kube-apiserver k8s.io/kubernetes)"
ETCD_VERSION="$(ht_mod_version etcd go.etcd.io/etcd/server/v3)"
HELM_VERSION="$(ht_mod_version helm helm.sh/helm/v3)"
COREDNS_VERSION="$(ht_mod_version coredns github.com/coredns/coredns)"
PROMETHEUS_VERSION="$(ht_mod_version prometheus github.com/prometheus/prometheus)"

# Cached binaries: $HT_CACHE/<tool>-<version>/<tool>
HT_KUBE_APISERVER="$HT_CACHE/kube-apiserver-$KUBE_VERSION/kube-apiserver"
HT_KUBE_CONTROLLER_MANAGER="$HT_CACHE/kube-controller-manager-$KUBE_VERSION/kube-controller-manager"
HT_KUBECTL="$HT_CACHE/kubectl-$KUBE_VERSION/kubectl"
HT_KUBELET="$HT_CACHE/kubelet-$KUBE_VERSION/kubelet"
HT_KUBE_PROXY="$HT_CACHE/kube-proxy-$KUBE_VERSION/kube-proxy"
HT_KUBE_SCHEDULER="$HT_CACHE/kube-scheduler-$KUBE_VERSION/kube-scheduler"
HT_ETCD="$HT_CACHE/etcd-$ETCD_VERSION/etcd"
HT_HELM="$HT_CACHE/helm-$HELM_VERSION/helm"
HT_COREDNS="$HT_CACHE/coredns-$COREDNS_VERSION/coredns"
HT_PROMTOOL="$HT_CACHE/promtool-$PROMETHEUS_VERSION/promtool"
HT_PROMETHEUS="$HT_CACHE/prometheus-$PROMETHEUS_VERSION/prometheus"
# The node's sandbox image (tests/node/pause): versioned by a hash of its
# sources, so an edit rebuilds it.
if [ -n "$HT_NODE_DIR" ] && [ -f "$HT_NODE_DIR/pause/main.go" ]; then
    PAUSE_VERSION="$(cat "$HT_NODE_DIR/pause/main.go" "$HT_NODE_DIR/pause/go.mod" | sha256sum | cut -c1-12)"
else
    PAUSE_VERSION=none
fi
HT_PAUSE_IMAGE="$HT_CACHE/pause-$PAUSE_VERSION/pause.oci.tar"
HT_PAUSE_IMAGE_NAME="localhost/high-templar/pause:$PAUSE_VERSION"
# Stable symlinks to the versions above, handy for PATH.
HT_BIN="$HT_CACHE/bin"

ht_go() {
    if command -v go >/dev/null 2>&1; then
        command go "$@"
    elif [ -x /usr/local/go/bin/go ]; then
        /usr/local/go/bin/go "$@"
    else
        echo "ht: no Go toolchain found (need go >= 1.26 on PATH or in /usr/local/go)" >&2
        return 1
    fi
}

# ht_apt_install PKG...: apt-get install (quietly), `apt-get update` once and
# retry if that fails. Root, or sudo.
ht_apt_install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "ht: installing Debian packages: $*" >&2
    if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@" >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@" >/dev/null
    fi
}

# --- helpers of start.sh / stop.sh (control plane and node) -------------------------
# They use the caller's variables: W (work dir), P (PKI dir), START_TIMEOUT,
# the array STARTED_PIDS, and a function die MESSAGE.

# ht_ec_key FILE: a new EC P-256 private key (PKCS#8).
ht_ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# ht_pki_ca: $P/ca.key, $P/ca.crt (self-signed, 10 years).
ht_pki_ca() {
    ht_ec_key "$P/ca.key"
    openssl req -x509 -new -key "$P/ca.key" -subj "/CN=high-templar-test-ca" -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$P/ca.crt" 2>/dev/null
}

# ht_pki_sign NAME SUBJECT EXTENSIONS...: $P/NAME.key, $P/NAME.crt signed by the CA.
ht_pki_sign() {
    local name="$1" subj="$2"; shift 2
    local ext="$P/$name.ext"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "$@" >"$ext"
    # Two openssl runs: key + CSR, then the certificate (random serial: OpenSSL 3's
    # default without -CAserial).
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$P/$name.key" \
        -subj "$subj" 2>/dev/null |
        openssl x509 -req -CA "$P/ca.crt" -CAkey "$P/ca.key" -days 3650 -sha256 \
            -extfile "$ext" -out "$P/$name.crt" 2>/dev/null
    rm -f "$ext"
}

# ht_pki_client NAME USER [GROUP]: a client certificate (CN=USER, O=GROUP).
ht_pki_client() {
    ht_pki_sign "$1" "${3:+/O=$3}/CN=$2" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth"
}

# ht_pki_sa_keys: $P/sa.key, $P/sa.pub, the ServiceAccount token signing pair (RS256).
ht_pki_sa_keys() {
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$P/sa.key" 2>/dev/null
    openssl pkey -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
}

# ht_kubeconfig FILE SERVER CERT_NAME USER: a kubeconfig trusting $P/ca.crt and
# authenticating with $P/CERT_NAME.{crt,key}, everything embedded.
ht_kubeconfig() {
    local file="$1" server="$2" cert="$3" user="$4"
    cat >"$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: high-templar-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$P/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$P/$cert.crt")
    client-key-data: $(base64 -w0 <"$P/$cert.key")
contexts:
- name: high-templar-test
  context:
    cluster: high-templar-test
    user: $user
    namespace: default
current-context: high-templar-test
KUBECONFIG
    chmod 600 "$file"
}

# ht_run NAME CMD...: start CMD detached (own session, stdin closed), log to
# $W/logs/NAME.log, pid to $W/run/NAME.pid. The pid is the one of CMD itself
# (CMD may be a chain of exec-ing wrappers such as nsenter).
ht_run() {
    local name="$1"; shift
    rm -f "$W/run/$name.pid"
    # shellcheck disable=SC2016
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$W/run/$name.pid" "$@" \
        </dev/null >>"$W/logs/$name.log" 2>&1 &
    disown "$!"   # no "Killed" job notice from bash when it is stopped
    local i
    for i in $(seq 1 250); do [ -s "$W/run/$name.pid" ] && break; sleep 0.02; done
    [ -s "$W/run/$name.pid" ] || die "$name did not start"
    STARTED_PIDS+=("$(cat "$W/run/$name.pid")")
}

# ht_running PID: true while PID runs (a zombie counts as gone).
ht_running() {
    local st
    st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

# ht_alive NAME: true while the process of $W/run/NAME.pid runs.
ht_alive() { ht_running "$(cat "$W/run/$1.pid" 2>/dev/null)"; }

# ht_wait_for NAME WHAT CMD...: poll CMD until it succeeds while NAME is alive.
ht_wait_for() {
    local name="$1" what="$2"; shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ht_alive "$name" || die "$name exited while waiting for $what"
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${START_TIMEOUT}s waiting for $what"
        sleep 0.2
    done
}

# ht_start_watchdog STOP_SCRIPT WATCH_PID MAX_LIFETIME: a detached loop that
# runs `STOP_SCRIPT $W` (with HT_FROM_WATCHDOG=1) when WATCH_PID exits (0: never)
# or after MAX_LIFETIME seconds (0: never). Sets WATCHDOG_PID.
ht_start_watchdog() {
    # shellcheck disable=SC2016
    setsid bash -c '
        echo $$ >"$0/run/watchdog.pid"
        watch="$1"; max="$2"
        while sleep 2; do
            if [ "$watch" != 0 ] && ! kill -0 "$watch" 2>/dev/null; then break; fi
            if [ "$max" != 0 ] && [ "$SECONDS" -ge "$max" ]; then break; fi
        done
        HT_FROM_WATCHDOG=1 exec "$3" "$0"
    ' "$W" "$2" "$3" "$1" </dev/null >>"$W/logs/watchdog.log" 2>&1 &
    disown "$!"
    local i
    for i in $(seq 1 50); do [ -s "$W/run/watchdog.pid" ] && break; sleep 0.1; done
    WATCHDOG_PID="$(cat "$W/run/watchdog.pid" 2>/dev/null || true)"
}

# ht_print_logs NAME...: the last lines of $W/logs/NAME.log, to stderr.
ht_print_logs() {
    local f
    for f in "$@"; do
        if [ -s "$W/logs/$f.log" ]; then
            echo "---- last lines of $W/logs/$f.log" >&2
            tail -n "${HT_LOG_LINES:-25}" "$W/logs/$f.log" >&2 || true
        fi
    done
}

# ht_ours NAME: the pid recorded in $W/run/NAME.pid if that process still runs
# for this WORKDIR (its command line names $W: guards against pid reuse).
ht_ours() {
    local f="$W/run/$1.pid" pid
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$W"; then
        echo "$pid"
    fi
}

# ht_terminate SIGNAL NAME...: send SIGNAL to the recorded processes, wait up
# to ${HT_STOP_WAIT:-5}s, then SIGKILL.
ht_terminate() {
    local sig="$1" n p alive pids=()
    shift
    for n in "$@"; do
        p="$(ht_ours "$n")"
        [ -n "$p" ] && pids+=("$p")
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 $((${HT_STOP_WAIT:-5} * 10))); do
        alive=0
        for p in "${pids[@]}"; do ht_running "$p" && alive=1; done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

# ht_write_env HEADER NAME=VALUE...: $W/env, a comment line then one
# `export NAME=VALUE` per pair (value quoted with printf %q), written atomically.
ht_write_env() {
    local header="$1" kv
    shift
    {
        echo "# $header"
        for kv in "$@"; do printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"; done
    } >"$W/env.tmp"
    mv "$W/env.tmp" "$W/env"
}

# --- command lines shared by both tiers -------------------------------------------
# Each sets an array; the caller adds its own flags.

# ht_etcd_args NAME CLIENT_URL PEER_URL -> ETCD_ARGS (data in $W/etcd).
ht_etcd_args() {
    ETCD_ARGS=(--name="$1" --data-dir="$W/etcd"
        --listen-client-urls="$2" --advertise-client-urls="$2"
        --listen-peer-urls="$3" --initial-advertise-peer-urls="$3"
        --initial-cluster="$1=$3" --initial-cluster-state=new
        --unsafe-no-fsync --log-level=warn)
}

# ht_apiserver_args ETCD_URL SERVICE_CIDR -> APISERVER_ARGS: TLS from $P, client
# certs + $P/tokens.csv + ServiceAccount tokens, front-proxy CA (only so that
# kube-controller-manager finds one; no cert has that CN).
ht_apiserver_args() {
    local issuer="https://kubernetes.default.svc.cluster.local"
    APISERVER_ARGS=(--etcd-servers="$1"
        --cert-dir="$P/apiserver-generated"
        --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key"
        --client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv"
        --requestheader-client-ca-file="$P/ca.crt" --requestheader-allowed-names=front-proxy-client
        --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group
        --requestheader-extra-headers-prefix=X-Remote-Extra-
        --service-cluster-ip-range="$2"
        --service-account-issuer="$issuer" --api-audiences="$issuer"
        --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key"
        --allow-privileged=true --profiling=false --v=1)
}

# ht_kcm_args KUBECONFIG PORT FLEX_DIR -> KCM_ARGS: no leader election,
# ServiceAccount token signing, root CA, CSR signing by the CA, health on
# 127.0.0.1:PORT, flex volume plugins in FLEX_DIR (else it creates
# /usr/libexec/kubernetes/kubelet-plugins/volume/exec on the host).
ht_kcm_args() {
    KCM_ARGS=(--kubeconfig="$1" --authentication-kubeconfig="$1" --authorization-kubeconfig="$1"
        --bind-address=127.0.0.1 --secure-port="$2" --cert-dir="$P/kcm-generated"
        --flex-volume-plugin-dir="$3"
        --leader-elect=false
        --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt"
        --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key"
        --profiling=false --v=1)
}
