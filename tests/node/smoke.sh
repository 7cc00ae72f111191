#!/usr/bin/env bash
# End-to-end check of the test node: start -> a Pod from the pause image
# Running -> (with the gateway image, when images/build.sh has made it) a
# restricted gateway Pod behind a ClusterIP Service, /healthz through the
# Service from the host -> CoreDNS names through the kube-dns Service -> the
# node's RabbitMQ: AMQP login as guest, stop/start with rabbitmq.sh -> stop ->
# the host is as before. Prints `smoke: PASS` and timings.
#
# Usage: smoke.sh [WORKDIR]     (default: a fresh mktemp dir)
#   HT_GATEWAY_IMAGE   gateway image archive
#                      (default: target/images/high-templar-gateway-0.1.0.oci.tar)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
W="${1:-$(mktemp -d /tmp/ht-node-smoke.XXXXXX)}"
GATEWAY_IMAGE="${HT_GATEWAY_IMAGE:-$REPO/target/images/high-templar-gateway-0.1.0.oci.tar}"
GATEWAY_IMAGE_NAME="docker.io/library/high-templar-gateway:0.1.0"

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "smoke: ok   $*"; }
ms_since() { echo "$((($(date +%s%N) - $1) / 1000000))ms"; }

host_state() {
    {
        ip route; ip netns list; ip -o link show | awk -F': ' '{print $2}'
        grep -F " $W" /proc/self/mountinfo || true
        ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null || true
        ls /var/log/pods /var/log/containers /var/lib/cni /run/containerd 2>/dev/null || true
    } | sort
}
BEFORE="$(host_state)"

t=$(date +%s%N)
"$HERE/ensure-tools.sh"
echo "smoke: ensure-tools took $(ms_since "$t")"

images=()
if [ -f "$GATEWAY_IMAGE" ]; then images+=("$GATEWAY_IMAGE"); else
    echo "smoke: no gateway image ($GATEWAY_IMAGE): skipping the Service-to-pod check (run images/build.sh)"
fi
t=$(date +%s%N)
stopped=0
trap '[ "$stopped" = 1 ] || "$HERE/stop.sh" "$W"' EXIT
"$HERE/start.sh" "$W" "${images[@]}"
START_MS=$(ms_since "$t")
echo "smoke: start.sh took $START_MS"
# shellcheck disable=SC1091
source "$W/env"
k() { "$HT_KUBECTL" "$@"; }
# pod_pid POD: host pid of the pod's (first) container, to look at it and
# enter its network namespace from the host.
pod_pid() {
    local id
    id="$(k get pod "$1" -o 'jsonpath={.status.containerStatuses[0].containerID}')"
    # shellcheck disable=SC2086  # $CTR is a command line
    $CTR tasks ls | awk -v id="${id#containerd://}" '$1 == id { print $2 }'
}

# --- a Pod from the pause image ---------------------------------------------------
t=$(date +%s%N)
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: pause, namespace: default}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  securityContext: {runAsNonRoot: true, runAsUser: 65535, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: pause
    image: $PAUSE_IMAGE
    imagePullPolicy: Never
    securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
EOF
k wait --for=condition=Ready pod/pause --timeout=60s >/dev/null \
    || fail "pause pod not Ready: $(k describe pod pause | tail -n 15)"
ok "pause Pod Running/Ready ($(ms_since "$t"), IP $(k get pod pause -o 'jsonpath={.status.podIP}'))"

# --- from inside a pod's network namespace ------------------------------------------
pid="$(pod_pid pause)"
[ -n "$pid" ] || fail "no pid for the pause pod's container"
grep -q "^nameserver $DNS_SERVICE_IP" "/proc/$pid/root/etc/resolv.conf" || fail "pod resolv.conf: $(cat "/proc/$pid/root/etc/resolv.conf")"
got="$(nsenter --net="/proc/$pid/ns/net" -- dig +short +time=2 +tries=2 @"$DNS_SERVICE_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" A)"
[ "$got" = "$KUBERNETES_SERVICE_IP" ] || fail "kubernetes.default.svc.$CLUSTER_DOMAIN from the pod resolved to '$got'"
ok "a pod (nameserver $DNS_SERVICE_IP in its resolv.conf) resolves kubernetes.default.svc.$CLUSTER_DOMAIN -> $got"
port=$((20000 + RANDOM % 10000))
python3 -m http.server --bind "$HOST_IP" "$port" --directory "$W/logs" >/dev/null 2>&1 &
srv=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/$HOST_IP/$port") 2>/dev/null && break; sleep 0.1; done
nsenter --net="/proc/$pid/ns/net" -- curl -fsS --max-time 5 -o /dev/null "http://$HOST_IP:$port/" \
    || { kill "$srv"; fail "pod -> host $HOST_IP:$port"; }
kill "$srv"; wait "$srv" 2>/dev/null || true
ok "a pod reaches the host at $HOST_IP"

# --- the kubernetes Service from the host (kube-proxy DNAT to the apiserver) -------
curl -fsS --max-time 5 --cacert "$APISERVER_CA_FILE" -H "Authorization: Bearer $APISERVER_TOKEN" \
    "https://$KUBERNETES_SERVICE_IP/readyz" | grep -qx ok || fail "https://$KUBERNETES_SERVICE_IP/readyz from the host"
ok "https://$KUBERNETES_SERVICE_IP/readyz (the kubernetes Service) from the host"

# --- the gateway behind a ClusterIP Service ------------------------------------------
if [ "${#images[@]}" -gt 0 ]; then
    t=$(date +%s%N)
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: gateway, namespace: default, labels: {app: gateway}}
spec:
  terminationGracePeriodSeconds: 2
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: gateway
    image: $GATEWAY_IMAGE_NAME
    imagePullPolicy: Never
    args: [serve, --backend-url, "http://$HOST_IP:1/"]
    ports: [{containerPort: 8080, name: http}]
    readinessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 1}
    securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {name: gateway, namespace: default}
spec:
  selector: {app: gateway}
  ports: [{name: http, port: 80, targetPort: http}]
EOF
    k wait --for=condition=Ready pod/gateway --timeout=60s >/dev/null \
        || fail "gateway pod not Ready: $(k describe pod gateway | tail -n 20; k logs gateway --tail 20 2>&1)"
    ok "gateway Pod Ready as uid 65532, read-only root ($(ms_since "$t"))"
    ip="$(k get svc gateway -o 'jsonpath={.spec.clusterIP}')"
    t=$(date +%s%N)
    for i in $(seq 1 50); do
        curl -fsS --max-time 2 "http://$ip/healthz" >/dev/null 2>&1 && break
        [ "$i" = 50 ] && fail "http://$ip/healthz (Service gateway) not answering from the host"
        sleep 0.2
    done
    ok "http://$ip/healthz through the ClusterIP Service from the host ($(ms_since "$t") after Ready)"
    got="$(dig +short +time=2 +tries=2 "@$DNS_SERVICE_IP" "gateway.default.svc.$CLUSTER_DOMAIN" A)"
    [ "$got" = "$ip" ] || fail "gateway.default.svc.$CLUSTER_DOMAIN resolved to '$got', want $ip"
    ok "gateway.default.svc.$CLUSTER_DOMAIN -> $got"
    k logs gateway --tail 3 >/dev/null || fail "kubectl logs gateway"
    k exec gateway -- /usr/local/bin/high-templar-gateway --version >/dev/null || fail "kubectl exec gateway"
    ok "kubectl logs gateway, kubectl exec gateway"
    pfport=$((20000 + RANDOM % 10000))
    k port-forward pod/gateway "$pfport:8080" >/dev/null 2>&1 &
    pf=$!
    for i in $(seq 1 50); do
        curl -fsS --max-time 2 "http://127.0.0.1:$pfport/healthz" >/dev/null 2>&1 && break
        [ "$i" = 50 ] && { kill "$pf"; fail "kubectl port-forward pod/gateway"; }
        sleep 0.2
    done
    kill "$pf"; wait "$pf" 2>/dev/null || true
    ok "kubectl port-forward pod/gateway"
    # pod -> Service -> pod on the same bridge (hairpin through iptables)
    nsenter --net="/proc/$(pod_pid pause)/ns/net" -- curl -fsS --max-time 5 "http://$ip/healthz" >/dev/null \
        || fail "pause pod -> Service gateway $ip"
    ok "a pod reaches another pod through its ClusterIP Service"
    # the ServiceAccount token of the gateway pod, through the kubernetes Service
    gpid="$(pod_pid gateway)"
    sa="/proc/$gpid/root/var/run/secrets/kubernetes.io/serviceaccount"
    who="$(nsenter --net="/proc/$gpid/ns/net" -- curl -fsS --max-time 5 --cacert "$sa/ca.crt" \
        -H "Authorization: Bearer $(cat "$sa/token")" -H 'Content-Type: application/json' -X POST \
        --data '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
        "https://kubernetes.default.svc.$CLUSTER_DOMAIN/apis/authentication.k8s.io/v1/selfsubjectreviews" \
        --resolve "kubernetes.default.svc.$CLUSTER_DOMAIN:443:$KUBERNETES_SERVICE_IP")" \
        || fail "SelfSubjectReview with the gateway pod's token"
    grep -q '"username": *"system:serviceaccount:default:default"' <<<"$who" || fail "SelfSubjectReview: $who"
    ok "the gateway pod's ServiceAccount token authenticates at https://kubernetes.default.svc"
fi

# --- DNS ----------------------------------------------------------------------------------
got="$(dig +short +time=2 +tries=2 "@$DNS_SERVICE_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" A)"
[ "$got" = "$KUBERNETES_SERVICE_IP" ] || fail "kubernetes.default.svc.$CLUSTER_DOMAIN resolved to '$got'"
ok "kubernetes.default.svc.$CLUSTER_DOMAIN -> $got (CoreDNS via the kube-dns Service $DNS_SERVICE_IP)"
got="$(dig +short +tcp +time=2 +tries=2 "@$DNS_SERVICE_IP" "kube-dns.kube-system.svc.$CLUSTER_DOMAIN" A)"
[ "$got" = "$DNS_SERVICE_IP" ] || fail "kube-dns.kube-system.svc.$CLUSTER_DOMAIN over TCP resolved to '$got'"
ok "kube-dns.kube-system.svc.$CLUSTER_DOMAIN -> $got (TCP)"

# --- the node's RabbitMQ -------------------------------------------------------------
# AMQP 0-9-1 handshake up to Connection.Tune, i.e. the PLAIN login was accepted.
amqp_login() {
    python3 - "$NODE_IP" <<'EOF'
import socket, struct, sys
s = socket.create_connection((sys.argv[1], 5672), timeout=5)
s.sendall(b"AMQP\x00\x00\x09\x01")
def frame():
    h = b""
    while len(h) < 7:
        c = s.recv(7 - len(h))
        if not c: sys.exit("connection closed")
        h += c
    t, ch, n = struct.unpack(">BHI", h)
    p = b""
    while len(p) < n + 1:
        c = s.recv(n + 1 - len(p))
        if not c: sys.exit("connection closed")
        p += c
    return struct.unpack(">HH", p[:4])
if frame() != (10, 10): sys.exit("no Connection.Start")
resp = b"\x00guest\x00guest"
args = struct.pack(">I", 0) + b"\x05PLAIN" + struct.pack(">I", len(resp)) + resp + b"\x05en_US"
pl = struct.pack(">HH", 10, 11) + args
s.sendall(struct.pack(">BHI", 1, 0, len(pl)) + pl + b"\xce")
m = frame()
if m != (10, 30): sys.exit("login refused: %r" % (m,))
EOF
}
amqp_login || fail "AMQP login guest/guest at $NODE_AMQP_URL"
ok "AMQP login guest/guest at $NODE_AMQP_URL"
t=$(date +%s%N)
"$HERE/rabbitmq.sh" "$W" stop
[ "$("$HERE/rabbitmq.sh" "$W" status || true)" = stopped ] || fail "rabbitmq.sh status after stop"
! amqp_login 2>/dev/null || fail "AMQP still accepting after rabbitmq.sh stop"
ok "rabbitmq.sh stop: port closed ($(ms_since "$t"))"
t=$(date +%s%N)
"$HERE/rabbitmq.sh" "$W" start
amqp_login || fail "AMQP login after rabbitmq.sh start"
ok "rabbitmq.sh start: login works again ($(ms_since "$t"))"

# --- stop, host as before ---------------------------------------------------------------------
t=$(date +%s%N)
stopped=1
"$HERE/stop.sh" "$W" || fail "stop.sh reported leftovers"
STOP_MS=$(ms_since "$t")
AFTER="$(host_state)"
[ "$BEFORE" = "$AFTER" ] || fail "host state differs after stop: $(diff <(echo "$BEFORE") <(echo "$AFTER"))"
ok "stop.sh ($STOP_MS); routes, netns, links, mounts, cgroups, /var/log/pods as before"
echo "smoke: PASS (start $START_MS, stop $STOP_MS)"
