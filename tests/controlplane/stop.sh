#!/usr/bin/env bash
# Stop a control plane started by start.sh and delete its state.
#
# Usage: stop.sh [--keep-logs] WORKDIR
#
# Kills (by recorded pid only) the watchdog, kube-controller-manager,
# kube-apiserver and etcd, then removes everything start.sh created in WORKDIR
# (pki/, etcd/, run/, kubeconfig, env, and logs/ unless --keep-logs or
# HT_KEEP_LOGS=1), and WORKDIR itself if it is then empty. Safe to run twice.
set -euo pipefail

KEEP_LOGS="${HT_KEEP_LOGS:-0}"
if [ "${1:-}" = "--keep-logs" ]; then KEEP_LOGS=1; shift; fi
if [ "$#" -ne 1 ]; then
    echo "usage: $0 [--keep-logs] WORKDIR" >&2
    exit 2
fi
[ -d "$1" ] || exit 0
W="$(cd "$1" && pwd)"

# stop_pid NAME: SIGTERM, wait up to 10s, then SIGKILL. Only if the pid still
# belongs to a process started for this WORKDIR (guards against pid reuse).
stop_pid() {
    local f="$W/run/$1.pid" pid i
    [ -s "$f" ] || return 0
    pid="$(cat "$f")"
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$W"; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [ "${HT_FROM_WATCHDOG:-0}" != 1 ]; then
    stop_pid watchdog
fi
stop_pid kube-controller-manager
stop_pid kube-apiserver
stop_pid etcd

rm -rf "$W/pki" "$W/etcd" "$W/run" "$W/kubeconfig" "$W/env" "$W/env.tmp"
if [ "$KEEP_LOGS" != 1 ]; then
    rm -rf "$W/logs"
fi
rmdir "$W" 2>/dev/null || true
