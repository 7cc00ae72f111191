#!/usr/bin/env bash
# Stop a control plane started by start.sh and delete its state.
#
# Usage: stop.sh [--keep-logs] WORKDIR
#
# Kills (by recorded pid only; SIGKILL, or SIGTERM first with --keep-logs) the
# watchdog, kube-controller-manager, kube-apiserver and etcd, then removes
# everything start.sh created in WORKDIR (pki/, etcd/, run/, kubeconfig, env,
# and logs/ unless --keep-logs or HT_KEEP_LOGS=1), and WORKDIR itself if it is
# then empty. Safe to run twice, and on a WORKDIR that does not exist.
set -euo pipefail

KEEP_LOGS="${HT_KEEP_LOGS:-0}"
if [ "${1:-}" = "--keep-logs" ]; then KEEP_LOGS=1; shift; fi
if [ "$#" -ne 1 ]; then
    echo "usage: $0 [--keep-logs] WORKDIR" >&2
    exit 2
fi
[ -d "$1" ] || exit 0
W="$(cd "$1" && pwd)"

# Pids recorded by start.sh that still belong to a process started for this
# WORKDIR (their command line names WORKDIR: guards against pid reuse).
ours() {
    local f="$W/run/$1.pid" pid
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$W"; then
        echo "$pid"
    fi
}

# True while PID runs (a zombie waiting to be reaped by init counts as gone).
running() {
    local st
    st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

# terminate SIGNAL NAME...: send SIGNAL, wait up to 5s, then SIGKILL.
terminate() {
    local sig="$1" n p alive pids=()
    shift
    for n in "$@"; do
        p="$(ours "$n")"
        [ -n "$p" ] && pids+=("$p")
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
        alive=0
        for p in "${pids[@]}"; do running "$p" && alive=1; done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

# The watchdog runs this script itself (exec) when it fires: don't kill it then.
if [ "${HT_FROM_WATCHDOG:-0}" != 1 ]; then
    terminate TERM watchdog
fi
if [ "$KEEP_LOGS" = 1 ]; then
    # Graceful, so that the kept logs are complete: clients first, then etcd
    # (etcd waits for connected clients). Takes ~3-4s.
    terminate TERM kube-controller-manager kube-apiserver
    terminate TERM etcd
else
    # Everything is thrown away anyway: SIGKILL is instant.
    terminate KILL kube-controller-manager kube-apiserver etcd
fi

rm -rf "$W/pki" "$W/etcd" "$W/run" "$W/kubeconfig" "$W/env" "$W/env.tmp"
if [ "$KEEP_LOGS" != 1 ]; then
    rm -rf "$W/logs"
fi
rmdir "$W" 2>/dev/null || true
