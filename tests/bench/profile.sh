#!/usr/bin/env bash
# Profiles the hot room at one rate: a release gateway pinned to core 0, the
# bench (and its bundled backend) pinned to core 1, 5 000 connections in one
# room, one step of RATE triggers/s with 128-B data for 20 s, and
# `perf record -a -g` for 8 s in the middle of the step.
#
#   tests/bench/profile.sh RATE OUT      # writes OUT.data (perf) and OUT.txt (the bench's report)
#
# Then, e.g.:
#   perf report -i OUT.data --no-children --sort comm -g none          # who used the CPU
#   perf report -i OUT.data --no-children --comm fan-out --sort sym -g none           # the gateway's fan-out thread
#   perf report -i OUT.data --no-children --comm tokio-rt-worker --sort sym -g none   # its sessions (queued frames)
#   perf report -i OUT.data --no-children --comm bench-reader --sort sym -g none      # the bench's reader
#
# Needs perf (Debian: linux-perf) and the release binaries (cargo build
# --release -p high-templar-gateway -p high-templar-bench). Loopback only;
# everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 2 ] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
rate=$1 out=$2
command -v perf >/dev/null || { echo "profile.sh: perf is missing (apt-get install linux-perf)" >&2; exit 2; }
gateway=target/release/high-templar-gateway bench=target/release/high-templar-bench
for bin in "$gateway" "$bench"; do
  [ -x "$bin" ] || { echo "profile.sh: $bin is missing: cargo build --release -p high-templar-gateway -p high-templar-bench" >&2; exit 2; }
done
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
work=$(mktemp -d /tmp/htb-profile.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
bport=$(free_port)
taskset -c 1 "$bench" serve-backend --listen "127.0.0.1:$bport" >"$work/backend.log" 2>&1 &
pids+=($!)
port=$(free_port)
printf 'limits:\n  maxConnections: 200000\nshutdown:\n  drainDelaySeconds: 0\n  closeWindowSeconds: 1\n' >"$work/gateway.yaml"
HT_LOG=warn taskset -c 0 "$gateway" serve --config "$work/gateway.yaml" --listen "127.0.0.1:$port" \
  --backend-url "http://127.0.0.1:$bport/" --trigger-token profile-token >"$work/gateway.log" 2>&1 &
gw=$!
pids+=("$gw")
for _ in $(seq 1 200); do http_ok "$port" /readyz 127.0.0.1 && break; sleep 0.05; done
taskset -c 1 "$bench" run --url "ws://127.0.0.1:$port/ws/" --trigger-token profile-token --server-pid "$gw" \
  -n 5000 --rooms hot=1 --rate "$rate" --duration 20 --payload-bytes 128 --quiet >"$out.txt" 2>&1 &
run=$!
sleep 9
perf record -a -g -o "$out.data" -- sleep 8 >/dev/null 2>&1
wait "$run"
cat "$out.txt"
