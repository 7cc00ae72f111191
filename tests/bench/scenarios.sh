#!/usr/bin/env bash
# Runs the benchmark scenarios of tests/bench against a freshly started
# release gateway for each, and writes one JSON result per scenario.
#
#   tests/bench/scenarios.sh [options] [scenario…]
#
# scenarios     any of: idle hot sparse wildcard storm churn (default: all)
# --scale F     passed to every scenario (default 1 = the full sizes; 0.01
#               runs each in seconds)
# --results DIR where results go (default target/bench-results/<UTC time>)
# --broker B    memory (default) or amqp: the gateway's broker
# --publish P   http (default) or amqp: how the bench publishes triggers
#               (amqp implies --broker amqp)
# --amqp-url U  RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f,
#               or HTB_AMQP_URL)
# --no-build    use the release binaries already in target/release
# -- ARGS…      extra arguments for every bench invocation
#
# The gateway runs pinned to core 0 (taskset -c 0), the bench and its
# bundled backend to core 1, so they do not steal each other's CPU. Both
# get as many open files as the hard limit allows. Everything started here
# is stopped on exit. Exit status: 0 when every scenario ran and was
# correct, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

all=(idle hot sparse wildcard storm churn)
scale=1
results=""
broker=memory
publish=http
amqp_url="${HTB_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
build=1
scenarios=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --broker) broker=$2; shift 2 ;;
    --publish) publish=$2; shift 2 ;;
    --amqp-url) amqp_url=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    idle|hot|sparse|wildcard|storm|churn) scenarios+=("$1"); shift ;;
    *) echo "scenarios.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
[ "$publish" = amqp ] && broker=amqp
results=${results:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$results"

if [ "$build" = 1 ]; then
  echo "scenarios: building release binaries"
  cargo build -q --release -p high-templar-gateway -p high-templar-bench
fi
gateway=target/release/high-templar-gateway
bench=target/release/high-templar-bench

# Pin the gateway and the bench to different cores when there are two.
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0)
  bench_cpu=(taskset -c 1)
else
  echo "scenarios: fewer than 2 cores or no taskset: not pinning" >&2
  server_cpu=()
  bench_cpu=()
fi

# As many open files as allowed (root may raise the hard limit).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "scenarios: open-file limit $(ulimit -n)"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT
trap 'exit 1' INT TERM



backend_port=$(free_port)
"${bench_cpu[@]}" "$bench" serve-backend --listen "127.0.0.1:$backend_port" >"$results/backend.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do listening "$backend_port" && break; sleep 0.05; done

token="bench-$RANDOM$RANDOM"
exchange=hightemplar
cat >"$results/gateway.yaml" <<EOF
limits:
  maxConnections: 200000
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 1
EOF

status=0
for scenario in "${scenarios[@]}"; do
  port=$(free_port)
  gw_args=(serve --config "$results/gateway.yaml" --listen "127.0.0.1:$port"
    --backend-url "http://127.0.0.1:$backend_port/" --trigger-token "$token")
  if [ "$broker" = amqp ]; then
    gw_args+=(--broker amqp --exchange "$exchange")
  fi
  HT_LOG=warn HT_AMQP_URL="$amqp_url" "${server_cpu[@]}" "$gateway" "${gw_args[@]}" \
    >"$results/gateway-$scenario.log" 2>&1 &
  gw=$!
  pids+=("$gw")
  ready=0
  for _ in $(seq 1 200); do
    if http_ok "$port" /readyz; then ready=1; break; fi
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.05
  done
  if [ "$ready" = 0 ]; then
    echo "scenarios: gateway for $scenario did not become ready (see $results/gateway-$scenario.log)" >&2
    status=1
    stop_pid "$gw"
    continue
  fi
  echo "scenarios: $scenario (scale $scale, broker $broker, publish $publish)"
  rc=0
  HTB_AMQP_URL="$amqp_url" HTB_TRIGGER_TOKEN="$token" "${bench_cpu[@]}" "$bench" scenario "$scenario" \
    --scale "$scale" --url "ws://127.0.0.1:$port/ws/" --server-pid "$gw" --publish "$publish" \
    --exchange "$exchange" --json "${extra[@]}" >"$results/$scenario.json" 2>"$results/$scenario.txt" || rc=$?
  grep -v '^\[bench\]' "$results/$scenario.txt" || true
  [ "$rc" = 0 ] || { echo "scenarios: $scenario exited with $rc" >&2; status=1; }
  stop_pid "$gw"
done

echo
echo "scenarios: results in $results"
for scenario in "${scenarios[@]}"; do
  [ -s "$results/$scenario.json" ] || continue
  if command -v jq >/dev/null 2>&1; then
    printf '%-9s %s\n' "$scenario" "$(jq -c '{ok, summary}' "$results/$scenario.json" 2>/dev/null || echo '?')"
  else
    printf '%-9s %s\n' "$scenario" "$(grep -E '^correctness: ' "$results/$scenario.txt" | tail -n 1)"
  fi
done | tee "$results/summary.txt"
exit "$status"
