#!/usr/bin/env bash
# Stop a node started by tests/node/start.sh and remove everything it made:
# processes (kubelet first), containers, shims, the RabbitMQ node, mounts
# under WORKDIR, kubepods cgroups, /var/log/{pods,containers} entries, CNI
# result files, the network namespace, veth and host routes, the lock.
#
# Usage: stop.sh [--keep-logs] WORKDIR
#
# Idempotent: safe to run twice, on a half-started node, and on a WORKDIR that
# does not exist or holds no node (then it does nothing). The files start.sh
# made are removed, then WORKDIR if empty (with --keep-logs or HT_KEEP_LOGS=1
# WORKDIR/logs/ stays).
set -uo pipefail   # no -e: clean up as much as possible, report at the end

KEEP_LOGS="${HT_KEEP_LOGS:-0}"
if [ "${1:-}" = "--keep-logs" ]; then KEEP_LOGS=1; shift; fi
if [ "$#" -ne 1 ]; then
    echo "usage: $0 [--keep-logs] WORKDIR" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
export PATH="$PATH:/usr/sbin:/sbin"
T0_NS=$(date +%s%N)
log() { echo "node/stop.sh: $*" >&2; }

[ -d "$1" ] || exit 0
W="$(cd "$1" && pwd)"
ht_node_load_vars
[ -n "$NETNS" ] || { [ -e "$W/env" ] || exit 0; }   # not a node WORKDIR (or nothing started)
ERRORS=()

# --- processes ----------------------------------------------------------------
HT_STOP_WAIT=5
if [ "${HT_FROM_WATCHDOG:-0}" != 1 ]; then
    ht_terminate KILL watchdog
fi
# kubelet first, so that it does not restart what is being stopped.
ht_terminate KILL kubelet

# Containers through the node's containerd (bounded: containerd may be gone).
CTR=(timeout 10 ctr --address "$CONTAINERD_SOCK" -n k8s.io)
CONTAINER_IDS=()
if [ -S "$CONTAINERD_SOCK" ] && [ -n "$(ht_ours containerd)" ]; then
    mapfile -t CONTAINER_IDS < <("${CTR[@]}" containers ls -q 2>/dev/null)
    mapfile -t tasks < <("${CTR[@]}" tasks ls -q 2>/dev/null)
    for t in "${tasks[@]}"; do "${CTR[@]}" tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 & done
    wait
    for t in "${tasks[@]}"; do "${CTR[@]}" tasks delete -f "$t" >/dev/null 2>&1 & done
    wait
    for c in "${CONTAINER_IDS[@]}"; do "${CTR[@]}" containers delete "$c" >/dev/null 2>&1 & done
    wait
fi

# Graceful where logs are kept, else SIGKILL (all state is thrown away).
SIG=KILL
[ "$KEEP_LOGS" = 1 ] && SIG=TERM
ht_terminate "$SIG" kube-proxy coredns kube-scheduler kube-controller-manager
ht_terminate "$SIG" kube-apiserver rabbitmq-beam
ht_terminate "$SIG" etcd containerd rabbitmq

# Leftovers: shims of this node's containerd socket, container processes in
# the kubepods cgroups, and anything else in the node's netns (epmd, CNI
# plugins, ...). By matching the socket, the cgroup and the netns only.
pids_of_netns() {
    local ino
    ino="$(stat -L -c %i "/run/netns/$NETNS" 2>/dev/null)" || return 0
    stat -L -c '%i %n' /proc/[0-9]*/ns/net 2>/dev/null | awk -v ino="$ino" '$1 == ino { split($2, p, "/"); print p[3] }'
}
leftovers() {
    # One grep over all command lines (NUL-separated arguments).
    grep -lzF -- "$CONTAINERD_SOCK" /proc/[0-9]*/cmdline 2>/dev/null | while IFS= read -r f; do
        tr '\0' ' ' 2>/dev/null <"$f" | grep -q "^[^ ]*containerd-shim.* -address $CONTAINERD_SOCK " && { f="${f#/proc/}"; echo "${f%/cmdline}"; }
    done
    find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null
    [ -n "$NETNS" ] && pids_of_netns
}
for _ in 1 2 3 4 5 6 7 8 9 10; do
    mapfile -t left < <(leftovers | sort -un | grep -vx "$$")
    [ "${#left[@]}" -gt 0 ] || break
    kill -9 "${left[@]}" 2>/dev/null
    sleep 0.2
done
[ "${#left[@]}" -eq 0 ] || ERRORS+=("processes still running: ${left[*]}")

# Shim sockets: containerd 1.6 puts them in /run/containerd/s/sha256(SOCKET/NS/ID).
for c in "${CONTAINER_IDS[@]}"; do
    rm -f "/run/containerd/s/$(printf '%s' "$CONTAINERD_SOCK/k8s.io/$c" | sha256sum | cut -d' ' -f1)"
done

# --- mounts under WORKDIR, deepest first --------------------------------------
unmount_all() {
    local m
    # mountinfo field 5 is the mount point (octal escapes for spaces etc.).
    awk -v w="$W" '{ p = $5; gsub(/\\040/, " ", p); if (p == w || index(p, w "/") == 1) print p }' /proc/self/mountinfo |
        awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2- | uniq |
        while IFS= read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
}
for _ in 1 2 3; do
    unmount_all
    grep -qF " $W" /proc/self/mountinfo || break
done
if grep -qF " $W" /proc/self/mountinfo; then
    ERRORS+=("mounts left under $W: $(awk -v w="$W" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | tr '\n' ' ')")
fi

# --- cgroups (all v1 hierarchies and the v2 one) ------------------------------
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$root" ] || continue
    for _ in 1 2 3 4 5; do
        find "$root" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$root" ] || break
        sleep 0.2
    done
    [ -d "$root" ] && ERRORS+=("cgroup $root not removed")
done

# --- files the kubelet/CNI put outside WORKDIR --------------------------------
before="$W/run/host-before"
existed() { [ -f "$before" ] && grep -qxF "existed $1" "$before"; }
for d in /var/log/pods /var/log/containers; do
    [ -d "$d" ] || continue
    for e in "$d"/* "$d"/.[!.]*; do
        [ -e "$e" ] || [ -L "$e" ] || continue
        [ -f "$before" ] && grep -qxF "entry $e" "$before" && continue
        rm -rf "$e"
    done
    existed "$d" || rmdir "$d" 2>/dev/null
done
# libcni's result cache: <network>-<sandbox id>-<interface>.
for c in "${CONTAINER_IDS[@]}"; do rm -f /var/lib/cni/results/*-"$c"-* 2>/dev/null; done
rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null
existed /var/lib/cni/results || rmdir /var/lib/cni/results 2>/dev/null
existed /var/lib/cni || rmdir /var/lib/cni 2>/dev/null
# The kubelet's device plugin socket is hard-coded: /var/lib/kubelet/device-plugins/kubelet.sock.
rm -f /var/lib/kubelet/device-plugins/kubelet.sock
existed /var/lib/kubelet/device-plugins || rmdir /var/lib/kubelet/device-plugins 2>/dev/null
existed /var/lib/kubelet || rmdir /var/lib/kubelet 2>/dev/null
existed /run/containerd/s || rmdir /run/containerd/s 2>/dev/null
existed /run/containerd || rmdir /run/containerd 2>/dev/null

# --- network: netns (its iptables rules go with it), veth, routes -------------
if [ -n "$NETNS" ]; then
    [ -e "/run/netns/$NETNS" ] && { ip netns delete "$NETNS" 2>/dev/null || ERRORS+=("ip netns delete $NETNS failed"); }
    ip link show "$HOST_VETH" >/dev/null 2>&1 && ip link delete "$HOST_VETH" 2>/dev/null
    # Routes via the veth vanish with it.
    if [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ] && ! existed /run/netns; then
        grep -q ' /run/netns ' /proc/self/mountinfo && ! grep -qxF "mounted /run/netns" "$before" 2>/dev/null \
            && umount /run/netns 2>/dev/null
        rmdir /run/netns 2>/dev/null
    fi
fi

# --- lock, files ---------------------------------------------------------------
if [ -s "$HT_NODE_OWNER" ] && [ "$(cut -d' ' -f1 "$HT_NODE_OWNER")" = "$W" ]; then
    rm -f "$HT_NODE_OWNER"
fi
# What start.sh created (the caller's own files in WORKDIR stay), then WORKDIR if empty.
rm -rf "$W/pki" "$W/etcd" "$W/containerd" "$W/kubelet" "$W/kubelet-plugins" "$W/cni" "$W/coredns" \
    "$W/rabbitmq" "$W/sysctl" "$W/kubeconfigs" "$W/kubeconfig" "$W/kubelet.yaml" "$W/kube-proxy.yaml" \
    "$W/resolv.conf" "$W/kube-cache" "$W/env" "$W/env.tmp" "$W/run" || ERRORS+=("could not remove all files in $W")
[ "$KEEP_LOGS" = 1 ] || rm -rf "$W/logs"
rmdir "$W" 2>/dev/null

ms=$((($(date +%s%N) - T0_NS) / 1000000))
if [ "${#ERRORS[@]}" -gt 0 ]; then
    for e in "${ERRORS[@]}"; do log "WARNING: $e"; done
    exit 1
fi
log "stopped in $((ms / 1000)).$(printf %03d $((ms % 1000)))s"
