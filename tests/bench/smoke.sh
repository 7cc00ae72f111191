#!/usr/bin/env bash
# Correctness smoke test of the gateway under small loads, with the load
# generator (tests/bench): a miniature of every benchmark scenario against a
# freshly started gateway (memory broker), and one run through RabbitMQ
# (amqp broker, AMQP publisher). Asserts ONLY correctness: zero lost, zero
# duplicated, zero misrouted deliveries, every connection and subscription
# succeeded; in the reconnect storm (admission), every client connected
# after its 503 retries, with its own rooms, and the backend never had more
# calls at once than the gateway's cap. Never asserts speed. Takes about
# 15 s once built. Needs bash only (no curl, no jq), and cc for the floor
# probe (tests/bench/floor) in miniature: 50 connections, two 1-s steps,
# every connection must get every frame; and its loss check must catch
# one frame withheld on purpose (--fault-skip).
#
#   tests/bench/smoke.sh [--release] [--no-amqp] [--no-build] [--keep-logs]
#
# --release    use release binaries (default: debug, as `cargo build`)
# --no-amqp    skip the RabbitMQ run (default: it needs a RabbitMQ on
#              127.0.0.1:5672, or HTB_AMQP_URL; tests/rabbitmq.sh starts one)
# --no-build   use the binaries already in target/
# --keep-logs  keep the work directory (logs, JSON results) even on success
#
# Exit status: 0 when every run was correct, 1 otherwise (or 2 when the
# setup failed). Prints one line per run and a summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

profile=debug
amqp=1
build=1
keep=0
for arg in "$@"; do
  case "$arg" in
    --release) profile=release ;;
    --no-amqp) amqp=0 ;;
    --no-build) build=0 ;;
    --keep-logs) keep=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

amqp_url="${HTB_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
# One exchange per run, so concurrent runs never see each other's triggers;
# non-durable, so it does not outlive a RabbitMQ restart.
exchange="hightemplar-bench-smoke-$$"
token="smoke-trigger-token"
started=$(date +%s%N)

if [ "$build" = 1 ]; then
  flag=(); [ "$profile" = release ] && flag=(--release)
  echo "smoke: building ($profile)"
  cargo build -q "${flag[@]}" -p high-templar-gateway -p high-templar-bench
fi
gateway="target/$profile/high-templar-gateway"
bench="target/$profile/high-templar-bench"
for bin in "$gateway" "$bench"; do
  [ -x "$bin" ] || { echo "smoke: $bin is missing (build it, or drop --no-build)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/htb-smoke.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$keep" = 0 ] && [ "${failed:-1}" = 0 ]; then rm -rf "$work"; else echo "smoke: logs and results in $work"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM

# Enough file descriptors for both sides (root may raise the hard limit).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

wait_ready() { # port path pid what
  for _ in $(seq 1 200); do
    if http_ok "$1" "$2"; then return 0; fi
    kill -0 "$3" 2>/dev/null || { echo "smoke: $4 exited at start (see $work)" >&2; exit 2; }
    sleep 0.05
  done
  echo "smoke: $4 not ready on port $1 (see $work)" >&2; exit 2
}

backend_port=$(free_port)
"$bench" serve-backend --listen "127.0.0.1:$backend_port" >"$work/backend.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do listening "$backend_port" && break; sleep 0.05; done

# No drain delay on SIGTERM: the smoke stops its gateways at once.
cat >"$work/gateway.yaml" <<'EOF'
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 0
EOF

start_gateway() { # name extra-args...
  local name=$1; shift
  local port; port=$(free_port)
  HT_LOG=warn "$gateway" serve --config "$work/gateway.yaml" --listen "127.0.0.1:$port" \
    --backend-url "http://127.0.0.1:$backend_port/" --trigger-token "$token" "$@" >"$work/gateway-$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_ready "$port" /readyz "$pid" "gateway ($name)"
  gw_port=$port gw_pid=$pid
}

failed=0
runs=0
summary=()
bench_run() { # label args...
  local label=$1; shift
  runs=$((runs + 1))
  local out="$work/$label.json" status=0
  "$bench" "$@" --url "ws://127.0.0.1:$gw_port/ws/" --server-pid "$gw_pid" --trigger-token "$token" \
    --json --quiet --drain-timeout 5 >"$out" 2>"$work/$label.txt" || status=$?
  local line
  line=$(sed -n 's/^totals: //p' "$work/$label.txt" | tail -n 1)
  if [ "$status" = 0 ] && grep -q '^correctness: OK' "$work/$label.txt"; then
    summary+=("ok    $label: $line")
  else
    failed=1
    summary+=("FAIL  $label (exit $status): ${line:-no result}")
    sed 's/^/      /' "$work/$label.txt" >&2
  fi
  echo "${summary[-1]}"
}

# The floor probe in miniature (tests/bench/floor: a C sender and reader on
# raw epoll, no gateway): 50 connections, 20 then 200 triggers/s for 1 s
# each: 220 triggers × 50 connections, every one received once, in order.
# Then the reader's loss check must fail when the sender withholds the
# first frame from one connection (--fault-skip): exactly 1 lost, 49 of 50
# connections complete, exit status 1.
# sum_field FILE KEY: the sum of every "KEY":N in FILE.
sum_field() {
  local total=0 n
  while read -r n; do total=$((total + n)); done < <(grep -o "\"$2\":[0-9]*" "$1" | cut -d: -f2 || true)
  echo "$total"
}
echo "smoke: floor probe"
runs=$((runs + 2))
if ! floor_dir=$(floor_build 2>"$work/floor-build.log"); then
  failed=1
  summary+=("FAIL  floor: build failed: $(cat "$work/floor-build.log")")
  echo "${summary[-1]}"
else
  status=0
  floor_run "$floor_dir" "$work/floor" 50 - - --rates 20,200 --duration 1 || status=$?
  expected=$(sum_field "$work/floor.json" expected)
  received=$(sum_field "$work/floor.json" received)
  complete=$({ grep -o '"complete_connections":50,' "$work/floor.json" || true; } | wc -l)
  if [ "$status" = 0 ] && grep -q '"ok":true' "$work/floor.json" && [ "$expected" = 11000 ] \
    && [ "$received" = 11000 ] && [ "$complete" = 2 ]; then
    summary+=("ok    floor: 50 connections, 2 steps, $received/$expected deliveries, 0 lost, 0 duplicated, 0 out of order")
  else
    failed=1
    summary+=("FAIL  floor (exit $status): $received/$expected deliveries (11000 expected), $complete/2 steps complete")
    sed 's/^/      /' "$work/floor.txt" "$work/floor-sender.log" >&2
  fi
  echo "${summary[-1]}"
  status=0
  floor_run "$floor_dir" "$work/floor-fault" 50 - - --rates 20 --duration 0.5 --fault-skip || status=$?
  if [ "$status" = 1 ] && grep -q '"ok":false' "$work/floor-fault.json" \
    && [ "$(sum_field "$work/floor-fault.json" lost)" = 1 ] \
    && grep -q '"complete_connections":49,' "$work/floor-fault.json"; then
    summary+=("ok    floor-fault: one withheld frame reported (1 lost, 49/50 connections complete, exit 1)")
  else
    failed=1
    summary+=("FAIL  floor-fault (exit $status): the withheld frame was not reported as exactly 1 lost")
    sed 's/^/      /' "$work/floor-fault.txt" "$work/floor-fault-sender.log" >&2
  fi
  echo "${summary[-1]}"
fi

echo "smoke: memory broker"
start_gateway memory
bench_run storm scenario storm --scale 0.002
bench_run idle-user-group run --layout user-group -n 200 --hold 0.3 --rate 400 --duration 0.3 --trigger-rooms 2
bench_run hot run -n 100 --rooms hot=1 --rates 50,400 --duration 0.3
bench_run sparse run -n 100 -k 10 --rooms room=300 --wildcard-share 0.05 --rate 0 --duration 0.3 --trigger-rooms 3
bench_run wildcard run -n 100 -k 5 --rooms customer=20,warehouse=10 --trigger-wildcard-share 1 --rate 0 --duration 0.3
bench_run explicit run -n 100 -k 5 --rooms customer=20,warehouse=10 --trigger-wildcard-share 1 --expand-wildcards --rate 0 --duration 0.3
bench_run multi-space run -n 100 -k 4 --rooms customer=5,warehouse=4 --rooms user=50 --wildcard-share 0.3 --trigger-wildcard-share 0.3 --trigger-rooms 2 --rate 0 --duration 0.3
bench_run churn-slow run -n 50 --rooms hot=1 --rate 20 --payload-bytes 1024 --duration 1 --churn-rate 20 --churn-hold 0.3 --slow-clients 3

# The reconnect storm in miniature: 50 clients at once over 3 users against a
# gateway with 4 bootstrap slots and 16 queued (the rest get 503 and retry
# after Retry-After, 1-5 s), coalescing on, and the bench's own backend (4
# calls at once, 20 ms each) checking it never has more than 4 at once.
storm_backend_port=$(free_port)
cat >"$work/gateway-admission.yaml" <<'EOF'
backend:
  admission: {maxConcurrent: 4, maxQueued: 16, maxWaitSeconds: 5}
  coalesce: true
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 0
EOF
storm_port=$(free_port)
HT_LOG=warn "$gateway" serve --config "$work/gateway-admission.yaml" --listen "127.0.0.1:$storm_port" \
  --backend-url "http://127.0.0.1:$storm_backend_port/" --trigger-token "$token" >"$work/gateway-admission.log" 2>&1 &
storm_pid=$!
pids+=("$storm_pid")
wait_ready "$storm_port" /readyz "$storm_pid" "gateway (admission)"
memory_port=$gw_port memory_pid=$gw_pid
gw_port=$storm_port gw_pid=$storm_pid
bench_run admission scenario admission --scale 0.005 --variants shared --serve-backend "127.0.0.1:$storm_backend_port" \
  --backend-capacity 4 --max-concurrent 4
gw_port=$memory_port gw_pid=$memory_pid

if [ "$amqp" = 1 ]; then
  echo "smoke: amqp broker ($exchange)"
  amqp_host=$(echo "$amqp_url" | sed -E 's#^amqp://([^@/]*@)?([^:/]+)(:([0-9]+))?.*#\2 \4#')
  read -r host port <<<"$amqp_host"
  if ! (exec 3<>"/dev/tcp/$host/${port:-5672}") 2>/dev/null; then
    echo "smoke: no RabbitMQ at $host:${port:-5672} (start one with tests/rabbitmq.sh, or pass --no-amqp)" >&2
    failed=1
    summary+=("FAIL  amqp: no RabbitMQ")
  else
    HT_AMQP_URL="$amqp_url" start_gateway amqp --broker amqp --exchange "$exchange" --exchange-durable false
    export HTB_AMQP_URL="$amqp_url"
    bench_run amqp run --publish amqp --exchange "$exchange" -n 100 -k 3 --rooms customer=10,warehouse=5 \
      --wildcard-share 0.3 --trigger-wildcard-share 0.3 --rate 1000 --duration 0.3
    bench_run amqp-http run --publish http -n 50 --rooms hot=1 --rate 200 --duration 0.3
  fi
fi

elapsed_ms=$((($(date +%s%N) - started) / 1000000))
elapsed="$((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))"
echo
echo "smoke summary ($runs runs, ${elapsed}s):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" = 0 ]; then
  echo "smoke: OK"
else
  echo "smoke: FAILED"
  exit 1
fi
