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

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The watchdog runs this script itself (exec) when it fires: don't kill it then.
if [ "${HT_FROM_WATCHDOG:-0}" != 1 ]; then
    ht_terminate TERM watchdog
fi
if [ "$KEEP_LOGS" = 1 ]; then
    # Graceful, so that the kept logs are complete: clients first, then etcd
    # (etcd waits for connected clients). Takes ~3-4s.
    ht_terminate TERM kube-controller-manager kube-apiserver
    ht_terminate TERM etcd
else
    # Everything is thrown away anyway: SIGKILL is instant.
    ht_terminate KILL kube-controller-manager kube-apiserver etcd
fi

rm -rf "$W/pki" "$W/etcd" "$W/run" "$W/kubeconfig" "$W/env" "$W/env.tmp"
if [ "$KEEP_LOGS" != 1 ]; then
    rm -rf "$W/logs"
fi
rmdir "$W" 2>/dev/null || true
