#!/usr/bin/env bash
# Cost as work grows (#13 item 5): the hot room and idle connections at
# growing connection counts, each beside the floor probe where it applies.
#
#   tests/bench/sweep.sh [--no-build] [--results DIR] [--connections "N1 N2 …"]
#                        [--rate R] [--seconds S] [--plot]
#
# For each N (default 1000 2000 5000 10000 18000; the open-file limit of
# 20 000 leaves the gateway 18 976 websockets):
#   floor  the floor probe (tests/bench/floor) with N connections, one step
#          of R triggers/s (default 10: below saturation, where CPU per
#          delivery measures cost, not batching) for S seconds (default 10),
#          128-B data; sender on core 0, reader on core 1;
#   hot    a fresh release gateway (memory broker) pinned to core 0, the
#          bench on core 1: N connections in one room, the same step;
#   idle   a fresh gateway: the idle preset at N connections (2 rooms each,
#          `scenario idle --scale N/20000`): bytes per connection.
# Writes DIR/sweep.csv (kind,connections,cpu_us_per_delivery,p99_ms,
# deliveries_per_second,bytes_per_connection,bench_bound) and, with --plot,
# DIR/sweep.png (matplotlib from a venv under ~/.cache/high-templar/,
# installed from PyPI on first use). Exit status 1 when a run was not
# correct (loss, duplicates, failed connections).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

counts="1000 2000 5000 10000 18000"
rate=10
seconds=10
results=""
build=1
plot=0
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) counts=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --plot) plot=1; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "sweep.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
results=${results:-target/bench-results/sweep-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$results"
if [ "$build" = 1 ]; then
  cargo build -q --release -p high-templar-gateway -p high-templar-bench
fi
gateway=target/release/high-templar-gateway bench=target/release/high-templar-bench
floor_dir=$(floor_build)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
pids=()
cleanup() { local p; for p in "${pids[@]}"; do stop_pid "$p"; done; }
trap cleanup EXIT
token=sweep-token

# gateway_up NAME: a fresh gateway on core 0 with the bench's backend; sets gw, port.
gateway_up() {
  local bport
  bport=$(free_port)
  taskset -c 1 "$bench" serve-backend --listen "127.0.0.1:$bport" >"$results/backend-$1.log" 2>&1 &
  pids+=($!)
  printf 'limits:\n  maxConnections: 200000\nshutdown:\n  drainDelaySeconds: 0\n  closeWindowSeconds: 1\n' \
    >"$results/gateway.yaml"
  port=$(free_port)
  HT_LOG=warn taskset -c 0 "$gateway" serve --config "$results/gateway.yaml" --listen "127.0.0.1:$port" \
    --backend-url "http://127.0.0.1:$bport/" --trigger-token "$token" >"$results/gateway-$1.log" 2>&1 &
  gw=$!
  pids+=("$gw")
  for _ in $(seq 1 200); do http_ok "$port" /readyz 127.0.0.1 && return 0; sleep 0.05; done
  echo "sweep.sh: gateway $1 did not become ready" >&2
  return 1
}
down() { cleanup; pids=(); }

csv="$results/sweep.csv"
echo "kind,connections,cpu_us_per_delivery,p99_ms,deliveries_per_second,bytes_per_connection,bench_bound" >"$csv"
rc=0
for n in $counts; do
  echo "sweep: $n connections"
  if floor_run "$floor_dir" "$results/floor-$n" "$n" 0 1 --rates "$rate" --duration "$seconds" --payload-bytes 128; then
    python3 - "$results/floor-$n.json" "$n" >>"$csv" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["steps"][0]
print(f"floor,{sys.argv[2]},{s['sender_cpu_us_per_delivery']},{s['latency_ms']['p99']},{s['deliveries_per_second']},,false")
PY
  else
    echo "sweep: floor at $n connections failed (see $results/floor-$n.txt)" >&2; rc=1
  fi
  gateway_up "hot-$n"
  if taskset -c 1 "$bench" run --url "ws://127.0.0.1:$port/ws/" --trigger-token "$token" --server-pid "$gw" \
    -n "$n" --rooms hot=1 --rate "$rate" --duration "$seconds" --payload-bytes 128 --quiet --json \
    >"$results/hot-$n.json" 2>"$results/hot-$n.txt"; then
    python3 - "$results/hot-$n.json" "$n" >>"$csv" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["runs"][0]
s = run["steps"][0]
print(f"hot,{sys.argv[2]},{s['server_cpu_us_per_delivery']},{s['latency_ms']['p99']},{s['deliveries_per_second']},"
      f"{run['server']['bytes_per_connection']},{str(s['bench_bound']).lower()}")
PY
  else
    echo "sweep: hot at $n connections was not correct (see $results/hot-$n.txt)" >&2; rc=1
  fi
  down
  gateway_up "idle-$n"
  scale=$(python3 -c "print($n / 20000)")
  if taskset -c 1 "$bench" scenario idle --scale "$scale" --url "ws://127.0.0.1:$port/ws/" --server-pid "$gw" \
    --quiet --json >"$results/idle-$n.json" 2>"$results/idle-$n.txt"; then
    python3 - "$results/idle-$n.json" "$n" >>"$csv" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["runs"][0]
print(f"idle,{sys.argv[2]},,,,{run['server']['bytes_per_connection']},false")
PY
  else
    echo "sweep: idle at $n connections was not correct (see $results/idle-$n.txt)" >&2; rc=1
  fi
  down
done
cat "$csv"
if [ "$plot" = 1 ]; then
  venv=$HOME/.cache/high-templar/plot-venv
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q "matplotlib==3.10.*"
  fi
  "$venv/bin/python" tests/bench/plot_sweep.py "$csv" "$results/sweep.png"
  echo "sweep: plot in $results/sweep.png"
fi
echo "sweep: results in $results"
exit "$rc"
