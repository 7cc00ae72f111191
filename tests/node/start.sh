#!/usr/bin/env bash
# Start a throw-away single-node Kubernetes for tests, in a network namespace
# of its own: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# containerd, kubelet, kube-proxy (iptables), CoreDNS, and a RabbitMQ broker
# for the pods. See README.md for addresses, the env file and why things are
# configured the way they are.
#
# Usage: start.sh WORKDIR [IMAGE_ARCHIVE...]
#
# IMAGE_ARCHIVEs (OCI/docker archives) are imported into the node's containerd
# (namespace k8s.io); pods use them with imagePullPolicy IfNotPresent/Never.
# On success WORKDIR/kubeconfig (cluster-admin, https://10.250.0.2:6443) and
# WORKDIR/env exist, the node is Ready and CoreDNS answers. The caller MUST
# run `stop.sh WORKDIR` afterwards; a watchdog does it when the caller (parent
# of start.sh, or $HT_WATCH_PID) exits, or after $HT_MAX_LIFETIME seconds.
#
# Environment (all optional):
#   HT_WATCH_PID       pid whose exit stops the node (default: parent; 0 = don't watch)
#   HT_MAX_LIFETIME    seconds before the watchdog stops it anyway (default 10800; 0 = never)
#   HT_START_TIMEOUT   seconds to wait for each component (default 120)
#   HT_NODE_RABBITMQ   1 (default) to start the node's RabbitMQ, 0 not to
#   HT_NODE_NAME       the Node's name (default ht-node)
#   HT_CACHE           tool cache (default ~/.cache/high-templar)
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: $0 WORKDIR [IMAGE_ARCHIVE...]" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

T0=$SECONDS
T0_NS=$(date +%s%N)
log() { echo "node/start.sh: $*" >&2; }
# mark NAME: record the time spent since the previous mark (printed at the end).
PHASES="" LAST_NS=$T0_NS
mark() {
    local now; now=$(date +%s%N)
    PHASES+=" $1 $(((now - LAST_NS) / 1000000))ms,"
    LAST_NS=$now
}
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespace, mounts, cgroups)"
mkdir -p "$1"
W="$(cd "$1" && pwd)"
shift
IMAGES=()
for img in "$@"; do
    [ -f "$img" ] || die "image archive not found: $img"
    IMAGES+=("$(cd "$(dirname "$img")" && pwd)/$(basename "$img")")
done
WATCH_PID="${HT_WATCH_PID:-$PPID}"
MAX_LIFETIME="${HT_MAX_LIFETIME:-10800}"
START_TIMEOUT="${HT_START_TIMEOUT:-120}"
WITH_RABBITMQ="${HT_NODE_RABBITMQ:-1}"
ht_node_paths

[ -f "$W/env" ] && die "$W/env exists: a node may already run there (run tests/node/stop.sh $W first)"

"$HERE/ensure-tools.sh"
mark tools
export PATH="$PATH:/usr/sbin:/sbin"

# --- claim the machine-wide lock ------------------------------------------------
NETNS="ht-node-$$"
HOST_VETH="htn$$"
RABBITMQ_NODENAME="ht-node-$$@localhost"
mkdir -p "$HT_NODE_LOCK_DIR" "$W/run" "$W/logs"
STARTED_PIDS=()
CLAIMED=0
cleanup_on_failure() {
    local rc=$?
    [ "$rc" -eq 0 ] && return 0
    ht_print_logs etcd kube-apiserver kube-controller-manager kube-scheduler containerd \
        kubelet kube-proxy coredns rabbitmq
    rm -f "$W/env"
    if [ "$CLAIMED" = 1 ]; then
        log "start failed after $((SECONDS - T0))s; cleaning up (logs kept in $W/logs)"
        "$HERE/stop.sh" --keep-logs "$W" >&2 || true
    else
        rmdir "$W/run" "$W/logs" "$W" 2>/dev/null || true
    fi
}
trap cleanup_on_failure EXIT
trap 'exit 143' TERM INT HUP   # so that the EXIT trap cleans up on these too
(
    flock 8
    if [ -s "$HT_NODE_OWNER" ]; then
        read -r other_w other_ns other_veth other_pid <"$HT_NODE_OWNER" || true
        # Live while its netns or veth exists, or its start.sh still runs.
        if [ -e "/run/netns/$other_ns" ] || ip link show "$other_veth" >/dev/null 2>&1 \
            || { [ -n "$other_pid" ] && kill -0 "$other_pid" 2>/dev/null; }; then
            echo "node/start.sh: another test node is running (WORKDIR $other_w, netns $other_ns); only one can run at a time (fixed addresses). Stop it with: tests/node/stop.sh $other_w" >&2
            exit 1
        fi
    fi
    if [ -n "$(ip -o addr show to "$HOST_IP" 2>/dev/null)" ]; then
        echo "node/start.sh: $HOST_IP is already assigned on this host ($(ip -o addr show to "$HOST_IP" | awk '{print $2}')): a leftover of another node? Run tests/node/stop.sh on its WORKDIR" >&2
        exit 1
    fi
    echo "$W $NETNS $HOST_VETH $$" >"$HT_NODE_OWNER"
) 8>"$HT_NODE_LOCK" || exit 1
CLAIMED=1
cat >"$VARS_FILE" <<EOF
NETNS=$NETNS
HOST_VETH=$HOST_VETH
RABBITMQ_NODENAME=$RABBITMQ_NODENAME
EOF
ht_node_load_vars
# The watchdog from the start on: if the caller dies (or kills start.sh with
# SIGKILL) half-way, it still removes the node.
ht_start_watchdog "$HERE/stop.sh" "$WATCH_PID" "$MAX_LIFETIME"

# What exists on the host before we start, so that stop.sh removes only what the node made.
{
    for d in /var/log/pods /var/log/containers /var/lib/cni /var/lib/cni/results /run/containerd /run/containerd/s \
        /run/netns /var/lib/kubelet /var/lib/kubelet/device-plugins; do
        [ -e "$d" ] && echo "existed $d"
    done
    grep -q ' /run/netns ' /proc/self/mountinfo && echo "mounted /run/netns"
    find /var/log/pods /var/log/containers -mindepth 1 -maxdepth 1 -printf 'entry %p\n' 2>/dev/null
} >"$W/run/host-before" || true

# --- network namespace ----------------------------------------------------------------
ip netns add "$NETNS"
ip link add "$HOST_VETH" type veth peer name eth0 netns "$NETNS"
ip addr add "$HOST_IP/$VETH_PREFIX" dev "$HOST_VETH"
ip link set "$HOST_VETH" up
"${NSX[@]}" ip link set lo up
"${NSX[@]}" ip addr add "$NODE_IP/$VETH_PREFIX" dev eth0
"${NSX[@]}" ip link set eth0 up
"${NSX[@]}" ip route add default via "$HOST_IP"
ip route add "$POD_CIDR" via "$NODE_IP" dev "$HOST_VETH"
ip route add "$SERVICE_CIDR" via "$NODE_IP" dev "$HOST_VETH"
# Per-namespace sysctls only (nsenter --net: /proc/sys/net is the namespace's).
"${NSX[@]}" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward
    if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables; fi'

mark network

# --- RabbitMQ (boots in the background while the rest starts) ---------------------------
if [ "$WITH_RABBITMQ" = 1 ]; then
    mkdir -p "$RABBITMQ_DIR/mnesia" "$RABBITMQ_DIR/log"
    chmod 700 "$RABBITMQ_DIR"
    : >"$RABBITMQ_DIR/rabbitmq-env.conf"
    echo '[].' >"$RABBITMQ_DIR/enabled_plugins"
    cat >"$RABBITMQ_DIR/rabbitmq.conf" <<EOF
listeners.tcp.default = 5672
loopback_users = none
log.console = false
log.file.level = info
EOF
    # Foreground mode: the script stays the parent of the Erlang VM, whose
    # own pid (RABBITMQ_PID_FILE) stop.sh uses. epmd starts in the netns too.
    ht_run rabbitmq "${NSX[@]}" "${RABBITMQ_ENV[@]}" ERL_EPMD_PORT=4369 RABBITMQ_NODE_PORT=5672 \
        RABBITMQ_DIST_PORT=25672 "$RABBITMQ_LIB/rabbitmq-server"
fi

# --- containerd ---------------------------------------------------------------------------
mkdir -p "$CONTAINERD_DIR/root" "$CONTAINERD_DIR/state" "$CONTAINERD_DIR/runc" "$CONTAINERD_DIR/opt" \
    "$W/cni/net.d" "$W/cni/ipam"
cat >"$CONTAINERD_DIR/config.toml" <<EOF
version = 2
root = "$CONTAINERD_DIR/root"
state = "$CONTAINERD_DIR/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CONTAINERD_DIR/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$HT_PAUSE_IMAGE_NAME"
  # No CAP_SYS_RESOURCE: a negative oom_score_adj is refused (see README).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  max_container_log_line_size = 65536
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CONTAINERD_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$W/cni/net.d"
    max_conf_num = 1
EOF
cat >"$W/cni/net.d/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$W/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
ht_run containerd "${NSX[@]}" containerd --config "$CONTAINERD_DIR/config.toml" --log-level warn
CTR=(ctr --address "$CONTAINERD_SOCK" -n k8s.io)

# --- etcd (needs no certificates), image imports ------------------------------------------------
mkdir -p "$W/etcd"
chmod 700 "$W/etcd"
ht_etcd_args ht-node http://127.0.0.1:2379 http://127.0.0.1:2380
ht_run etcd "${NSX[@]}" "$HT_ETCD" "${ETCD_ARGS[@]}"

# Image imports run while the control plane comes up (containerd starts in ~0.5 s).
ctr_up() { "${CTR[@]}" version; }
(
    ht_wait_for containerd "containerd on $CONTAINERD_SOCK" ctr_up
    for img in "$HT_PAUSE_IMAGE" "${IMAGES[@]}"; do
        "${CTR[@]}" images import "$img" >>"$W/logs/images.log" 2>&1 \
            || { echo "import of $img failed" >>"$W/logs/images.log"; exit 1; }
    done
) &
IMPORT_JOB=$!

# --- PKI (openssl) -------------------------------------------------------------------------
P="$W/pki"
mkdir -p "$P" "$W/kubeconfigs"
chmod 700 "$P"
ht_pki_ca
# The certificates are independent of each other: made in parallel.
PKI_JOBS=()
pki_bg() { "$@" & PKI_JOBS+=($!); }
pki_bg ht_pki_sign apiserver "/CN=kube-apiserver" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:$NODE_IP,IP:$KUBERNETES_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN"
pki_bg ht_pki_sign kubelet-serving "/CN=$NODE_NAME" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME"
for c in kube-controller-manager-serving kube-scheduler-serving; do
    pki_bg ht_pki_sign "$c" "/CN=${c%-serving}" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost"
done
pki_bg ht_pki_client admin high-templar-admin system:masters
pki_bg ht_pki_client apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
pki_bg ht_pki_client kube-controller-manager system:kube-controller-manager
pki_bg ht_pki_client kube-scheduler system:kube-scheduler
pki_bg ht_pki_client kubelet "system:node:$NODE_NAME" system:nodes
pki_bg ht_pki_client kube-proxy system:kube-proxy
pki_bg ht_pki_client coredns system:coredns
pki_bg ht_pki_sa_keys
for j in "${PKI_JOBS[@]}"; do wait "$j" || die "making the certificates in $P failed"; done
ADMIN_TOKEN="$(openssl rand -hex 24)"
printf '%s,high-templar-admin,high-templar-admin,"system:masters"\n' "$ADMIN_TOKEN" >"$P/tokens.csv"
chmod 600 "$P"/*.key "$P/tokens.csv"
APISERVER_URL="https://$NODE_IP:$APISERVER_PORT"
ht_kubeconfig "$W/kubeconfig" "$APISERVER_URL" admin high-templar-admin
for c in kube-controller-manager kube-scheduler kubelet kube-proxy coredns; do
    ht_kubeconfig "$W/kubeconfigs/$c.kubeconfig" "$APISERVER_URL" "$c" "$c"
done

mark pki

# --- kube-apiserver, kube-controller-manager, kube-scheduler ----------------------------------

etcd_healthy() { "${NSX[@]}" curl -fsS --max-time 2 http://127.0.0.1:2379/health | grep -q '"health":"true"'; }
ht_wait_for etcd "etcd health" etcd_healthy

ht_apiserver_args http://127.0.0.1:2379 "$SERVICE_CIDR"
ht_run kube-apiserver "${NSX[@]}" "$HT_KUBE_APISERVER" "${APISERVER_ARGS[@]}" \
    --bind-address=0.0.0.0 \
    --advertise-address="$NODE_IP" \
    --secure-port="$APISERVER_PORT" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$P/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction
# The scheduler waits for the apiserver (and its RBAC) itself: starting it now saves
# seconds. (The controller manager exits if its RBAC is not there yet.)
ht_run kube-scheduler "${NSX[@]}" "$HT_KUBE_SCHEDULER" \
    --kubeconfig="$W/kubeconfigs/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$W/kubeconfigs/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$W/kubeconfigs/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port=10259 \
    --tls-cert-file="$P/kube-scheduler-serving.crt" \
    --tls-private-key-file="$P/kube-scheduler-serving.key" \
    --leader-elect=false \
    --profiling=false \
    --v=1

# curl, not kubectl, for the polls: a kubectl process costs ~0.2 s of CPU,
# which the components starting up on 2 cores need more. (-A: a curl user agent
# gets pretty-printed JSON.)
api_get() { curl -fsS --max-time 2 -A ht-node-start --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$APISERVER_URL$1"; }
apiserver_ready() { api_get /readyz | grep -qx ok; }
ht_wait_for kube-apiserver "kube-apiserver $APISERVER_URL/readyz" apiserver_ready
mark apiserver

mkdir -p "$W/kubelet-plugins/volume/exec"
ht_kcm_args "$W/kubeconfigs/kube-controller-manager.kubeconfig" 10257 "$W/kubelet-plugins/volume/exec"
ht_run kube-controller-manager "${NSX[@]}" "$HT_KUBE_CONTROLLER_MANAGER" "${KCM_ARGS[@]}" \
    --tls-cert-file="$P/kube-controller-manager-serving.crt" \
    --tls-private-key-file="$P/kube-controller-manager-serving.key" \
    --use-service-account-credentials=true \
    --allocate-node-cidrs=false

# --- CoreDNS, kube-proxy ---------------------------------------
mkdir -p "$W/coredns"
cat >"$W/coredns/Corefile" <<EOF
.:53 {
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $W/kubeconfigs/coredns.kubeconfig high-templar-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
    loadbalance
}
EOF
ht_run coredns "${NSX[@]}" "$HT_COREDNS" -conf "$W/coredns/Corefile"

cat >"$W/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
clientConnection:
  kubeconfig: $W/kubeconfigs/kube-proxy.kubeconfig
nodePortAddresses: [primary]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0 = leave the conntrack sysctls alone (nf_conntrack_max is host-global).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  minSyncPeriod: 0s
  syncPeriod: 30s
EOF
ht_run kube-proxy "${NSX[@]}" "$HT_KUBE_PROXY" --config="$W/kube-proxy.yaml" --v=1

# --- kubelet ----------------------------------------------------------------------------------
wait "$IMPORT_JOB" || die "image import failed: $(tail -n 5 "$W/logs/images.log")"
mkdir -p "$KUBELET_DIR"
# The root dir is a shared bind mount, so that the volumes the kubelet mounts
# in its own mount namespace (below) propagate to the host's, where
# containerd/runc bind them into the containers.
mount --bind "$KUBELET_DIR" "$KUBELET_DIR"
mount --make-shared "$KUBELET_DIR"
cat >"$W/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $P/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: $P/kubelet-serving.crt
tlsPrivateKeyFile: $P/kubelet-serving.key
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $W/resolv.conf
volumePluginDir: $W/kubelet-plugins/volume/exec
registerNode: true
maxPods: 110
podPidsLimit: 4096
failSwapOn: false
serializeImagePulls: false
# Only locally imported images: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A busy or full-ish test disk must not evict pods.
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
evictionPressureTransitionPeriod: 5s
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
EOF
# Pods with dnsPolicy Default get this (the host has no upstream for them).
echo "nameserver $DNS_SERVICE_IP" >"$W/resolv.conf"
# The kubelet sets vm.overcommit_memory, kernel.panic, kernel.panic_on_oops...
# (host-global sysctls) when they differ from what it wants, and refuses to
# start with protectKernelDefaults if they do. It runs in a mount namespace of
# its own where read-only files with the wanted values cover those of /proc/sys
# that differ: it sees them right and writes nothing. The host keeps its values.
mkdir -p "$W/sysctl"
fakes=()
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    k="${kv%=*}" v="${kv#*=}"
    if [ "$(cat "/proc/sys/$k" 2>/dev/null)" != "$v" ]; then
        echo "$v" >"$W/sysctl/${k//\//.}"
        fakes+=("$W/sysctl/${k//\//.}:/proc/sys/$k")
    fi
done
# shellcheck disable=SC2016  # the inner script is single-quoted on purpose
ht_run kubelet "${NSX[@]}" unshare --mount --propagation unchanged -- env FAKES="${fakes[*]}" sh -c '
    mount --make-private /proc || exit 1
    for f in $FAKES; do mount --bind -o ro "${f%%:*}" "${f#*:}" || exit 1; done
    exec "$@"' kubelet-sysctl-shim "$HT_KUBELET" \
    --config="$W/kubelet.yaml" \
    --kubeconfig="$W/kubeconfigs/kubelet.kubeconfig" \
    --root-dir="$KUBELET_DIR" \
    --cert-dir="$P/kubelet-generated" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" \
    --v=1

KUBECTL=("$HT_KUBECTL" --kubeconfig "$W/kubeconfig")
# (Started before these exist: they retry.) CoreDNS' permissions and the kube-dns Service: selector-less, its
# EndpointSlice points at CoreDNS, a process on $NODE_IP:53 in the netns.
"${KUBECTL[@]}" apply -f - >"$W/logs/bootstrap.log" 2>&1 <<EOF || die "kubectl apply of the bootstrap objects failed: $(cat "$W/logs/bootstrap.log")"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: $DNS_SERVICE_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-coredns
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: high-templar-test-node
addressType: IPv4
endpoints:
- addresses: ["$NODE_IP"]
  conditions: {ready: true}
  nodeName: $NODE_NAME
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF

# --- wait for the node ----------------------------------------------------------------------------
node_ready() { api_get "/api/v1/nodes/$NODE_NAME" | grep -q '"type":"Ready","status":"True"'; }
ht_wait_for kubelet "node $NODE_NAME Ready" node_ready
mark node-ready
coredns_ready() { "${NSX[@]}" curl -fsS --max-time 2 http://127.0.0.1:8181/ready; }
ht_wait_for coredns "CoreDNS /ready" coredns_ready
dns_answers() {
    [ "$(dig +time=1 +tries=1 +short "@$DNS_SERVICE_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" A)" = "$KUBERNETES_SERVICE_IP" ]
}
ht_wait_for kube-proxy "kubernetes.default.svc.$CLUSTER_DOMAIN via the kube-dns Service $DNS_SERVICE_IP" dns_answers
mark dns
default_sa() { api_get /api/v1/namespaces/default/serviceaccounts/default && api_get /api/v1/namespaces/default/configmaps/kube-root-ca.crt; }
ht_wait_for kube-controller-manager "ServiceAccount default/default and ConfigMap kube-root-ca.crt" default_sa
mark serviceaccount
if [ "$WITH_RABBITMQ" = 1 ]; then
    rabbitmq_up() { (exec 3<>"/dev/tcp/$NODE_IP/5672") 2>/dev/null; }
    ht_wait_for rabbitmq "RabbitMQ on $NODE_IP:5672" rabbitmq_up
    # The beam's own pid, for stop.sh (the script above it exits with it).
    cp "$RABBITMQ_DIR/rabbitmq.pid" "$W/run/rabbitmq-beam.pid" 2>/dev/null || true
    mark rabbitmq
fi

# --- env ---------------------------------------------------------------------------------------------
pid() { cat "$W/run/$1.pid" 2>/dev/null || true; }
ht_write_env "Written by tests/node/start.sh; source it. Stop with: tests/node/stop.sh $W" \
    HT_WORKDIR="$W" KUBECONFIG="$W/kubeconfig" \
    NODE_NAME="$NODE_NAME" NODE_IP="$NODE_IP" HOST_IP="$HOST_IP" NETNS="$NETNS" HOST_VETH="$HOST_VETH" \
    NSENTER="nsenter --net=/run/netns/$NETNS --" \
    POD_CIDR="$POD_CIDR" SERVICE_CIDR="$SERVICE_CIDR" CLUSTER_DOMAIN="$CLUSTER_DOMAIN" \
    DNS_SERVICE_IP="$DNS_SERVICE_IP" KUBERNETES_SERVICE_IP="$KUBERNETES_SERVICE_IP" \
    APISERVER_URL="$APISERVER_URL" APISERVER_CA_FILE="$P/ca.crt" APISERVER_TOKEN="$ADMIN_TOKEN" \
    CONTAINERD_SOCK="$CONTAINERD_SOCK" CTR="ctr --address $CONTAINERD_SOCK -n k8s.io" \
    PAUSE_IMAGE="$HT_PAUSE_IMAGE_NAME" \
    NODE_AMQP_URL="$([ "$WITH_RABBITMQ" = 1 ] && echo "amqp://guest:guest@$NODE_IP:5672/%2f")" \
    RABBITMQ_NODENAME="$([ "$WITH_RABBITMQ" = 1 ] && echo "$RABBITMQ_NODENAME")" \
    ETCD_PID="$(pid etcd)" APISERVER_PID="$(pid kube-apiserver)" CONTROLLER_MANAGER_PID="$(pid kube-controller-manager)" \
    SCHEDULER_PID="$(pid kube-scheduler)" CONTAINERD_PID="$(pid containerd)" KUBELET_PID="$(pid kubelet)" \
    KUBE_PROXY_PID="$(pid kube-proxy)" COREDNS_PID="$(pid coredns)" RABBITMQ_PID="$(cat "$W/run/rabbitmq-beam.pid" 2>/dev/null || true)" \
    WATCHDOG_PID="$WATCHDOG_PID" \
    KUBECACHEDIR="$W/kube-cache" KUBE_VERSION="$KUBE_VERSION" HT_KUBECTL="$HT_KUBECTL" HT_HELM="$HT_HELM" HT_BIN="$HT_BIN"
trap - EXIT
ms=$((($(date +%s%N) - T0_NS) / 1000000))
log "node $NODE_NAME ready in $((ms / 1000)).$(printf %03d $((ms % 1000)))s (netns $NETNS, API $APISERVER_URL, env $W/env)"
log "time spent:${PHASES%,}"
