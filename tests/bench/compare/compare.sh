#!/usr/bin/env bash
# Side-by-side benchmark: this project's Rust gateway against the original
# Python high-templar 3.1.0 (PyPI), same bench scenarios, same RabbitMQ,
# same bundled backend, same pinning; and, for idle and hot, against
# Centrifugo v6.9.1 (Go module proxy, memory engine, GOMAXPROCS=1), its own
# protocol and HTTP API. See tests/bench/compare/README.md.
#
#   tests/bench/compare/compare.sh [options] [scenario…] [-- extra bench flags]
#
# scenarios         any of: idle hot sparse wildcard storm churn (default: all)
# --scale F         passed to every scenario (default 0.05; 1 = full size,
#                   which takes the Python server a very long time)
# --results DIR     where results go (default target/bench-results/compare-<UTC>)
# --amqp-url U      RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f,
#                   or HTB_AMQP_URL)
# --exchange X      exchange both servers consume and the bench publishes to
#                   (default hightemplar-compare; declared non-durable, as
#                   3.1.0 declares it, so both servers accept it)
# --python-timeout S  cap of each Python bench run, seconds (default 300)
# --rust-timeout S  cap of each Rust bench run, seconds (default 300)
# --centrifugo-timeout S  cap of each Centrifugo bench run, seconds (default 300)
# --no-centrifugo   skip the Centrifugo peer (otherwise run for idle and hot;
#                   built once into ${HT_CACHE:-$HOME/.cache/high-templar}/
#                   centrifugo-v6.9.1/, see centrifugo.sh)
# --no-floor        skip the floor probe (tests/bench/floor), which otherwise
#                   runs just before hot, with hot's shape at --scale, and
#                   whose floor.json every side's hot run is compared with
#                   (compare.md: "Hot room beside the floor")
# --python-stock    run the unpatched 3.1.0 (the bench then cannot subscribe:
#                   3.1.0's subscribe replies carry no requestId); default:
#                   a one-function patch echoing requestId (ht_python_app.py)
# --no-probe        skip the protocol probe
# --sweep N,N,…     connection counts of the hot sweep (default 50,100,200,400)
# --no-sweep        skip the sweep (and the plot)
# --sweep-rate R    fixed trigger rate of the sweep's first step (default 50)
# --sweep-duration S  seconds of that step (default 2)
# --sweep-burst N   triggers of each sweep step; the second step sends them
#                   as fast as possible (default 100)
# --no-build        use the release binaries already in target/release
# -- ARGS…          extra arguments for every bench invocation
#
# The Python venv is cached in ${HT_CACHE:-$HOME/.cache/high-templar}/
# python-high-templar-3.1.0/venv (created when missing). Servers run pinned
# to core 0 (taskset -c 0), the bench, its backend and the probes to core 1.
# Everything started here is stopped on exit. Exit status: 0 when every
# Rust run was correct (whatever Python could do: that is recorded, with
# the reason, in compare.md), 1 when a Rust run failed or was incorrect,
# 2 on a setup failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=tests/bench/lib.sh
. "$here/../lib.sh"
cd "$here/../../.."

all=(idle hot sparse wildcard storm churn)
scale=0.05
results=""
amqp_url="${HTB_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
exchange=hightemplar-compare
python_timeout=300
rust_timeout=300
centrifugo_timeout=300
with_centrifugo=1
# The scenarios the Centrifugo peer runs (its protocol has no wildcard
# rooms, and the issue asks for these two).
centrifugo_scenarios=" idle hot "
echo_request_id=1
probe=1
floor=1
sweep=50,100,200,400
sweep_rate=50
sweep_duration=2
sweep_burst=100
build=1
scenarios=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --amqp-url) amqp_url=$2; shift 2 ;;
    --exchange) exchange=$2; shift 2 ;;
    --python-timeout) python_timeout=$2; shift 2 ;;
    --rust-timeout) rust_timeout=$2; shift 2 ;;
    --centrifugo-timeout) centrifugo_timeout=$2; shift 2 ;;
    --no-centrifugo) with_centrifugo=0; shift ;;
    --python-stock) echo_request_id=0; shift ;;
    --no-probe) probe=0; shift ;;
    --no-floor) floor=0; shift ;;
    --sweep) sweep=$2; shift 2 ;;
    --no-sweep) sweep=""; shift ;;
    --sweep-rate) sweep_rate=$2; shift 2 ;;
    --sweep-duration) sweep_duration=$2; shift 2 ;;
    --sweep-burst) sweep_burst=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$here/compare.sh" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    idle|hot|sparse|wildcard|storm|churn) scenarios+=("$1"); shift ;;
    *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
results=${results:-target/bench-results/compare-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$results/runs" "$results/logs"
results="$(cd "$results" && pwd)"
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the source tree
log() { echo "compare: $*" >&2; }
die() { echo "compare: $*" >&2; exit 2; }

# ---------------------------------------------------------------- Python venv
ht_version=3.1.0
cache="${HT_CACHE:-$HOME/.cache/high-templar}/python-high-templar-$ht_version"
venv="$cache/venv"
requirements="high-templar==$ht_version matplotlib"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$cache/installed" 2>/dev/null)" != "$requirements" ]; then
  python=${HTC_PYTHON:-python3}
  command -v "$python" >/dev/null || die "no $python to create the venv with (set HTC_PYTHON)"
  log "creating $venv ($requirements)"
  rm -rf "$venv" "$cache/installed"
  mkdir -p "$cache"
  "$python" -m venv "$venv" || die "python -m venv failed (Debian: apt-get install python3-venv)"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $requirements \
    || die "pip install $requirements failed"
  echo "$requirements" >"$cache/installed"
fi
"$venv/bin/pip" freeze --disable-pip-version-check >"$results/python-freeze.txt" 2>/dev/null || true
"$venv/bin/python" -c 'import high_templar.main, hypercorn, aio_pika, aiohttp, matplotlib' \
  || die "the venv $venv is broken: remove it and run again"
py="$venv/bin/python"

# ---------------------------------------------------------------- binaries
if [ "$build" = 1 ]; then
  log "building release binaries"
  cargo build -q --release -p high-templar-gateway -p high-templar-bench || die "cargo build failed"
fi
gateway=$PWD/target/release/high-templar-gateway
bench=$PWD/target/release/high-templar-bench
if [ ! -x "$gateway" ] || [ ! -x "$bench" ]; then
  die "missing $gateway or $bench (run without --no-build)"
fi

# ---------------------------------------------------------------- Centrifugo
# shellcheck source=tests/bench/compare/centrifugo.sh
. "$here/centrifugo.sh"
centrifugo=""
centrifugo_key="bench-centrifugo-api-key"
if [ "$with_centrifugo" = 1 ]; then
  for scenario in "${scenarios[@]}"; do
    [[ "$centrifugo_scenarios" == *" $scenario "* ]] || continue
    centrifugo=$(centrifugo_build) || die "could not build Centrifugo $HTC_CENTRIFUGO_VERSION (or pass --no-centrifugo)"
    "$centrifugo" version >"$results/logs/centrifugo-version.txt" 2>&1 || true
    break
  done
fi

# ---------------------------------------------------------------- RabbitMQ
amqp_hostport=$(echo "$amqp_url" | sed -E 's#^amqps?://([^@/]*@)?([^/?]*).*#\2#')
amqp_host=${amqp_hostport%%:*}
amqp_port=${amqp_hostport##*:}
[ "$amqp_port" != "$amqp_hostport" ] || amqp_port=5672
listening_on() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# Called before every server start too: something else on the machine
# (another test suite) may stop RabbitMQ meanwhile.
ensure_rabbitmq() {
  listening_on "$amqp_host" "$amqp_port" && return 0
  if [ "$amqp_host:$amqp_port" = 127.0.0.1:5672 ]; then
    log "RabbitMQ is not running: starting it (tests/rabbitmq.sh)"
    tests/rabbitmq.sh >&2 || die "no RabbitMQ (tests/rabbitmq.sh failed)"
  else
    die "nothing listens on $amqp_host:$amqp_port ($amqp_url)"
  fi
}
ensure_rabbitmq

# ---------------------------------------------------------------- processes
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0)
  bench_cpu=(taskset -c 1)
else
  log "fewer than 2 cores or no taskset: not pinning"
  server_cpu=()
  bench_cpu=()
fi
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
cleanup() { # shellcheck disable=SC2317 # (called by the trap)
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# Runs a command in the background and waits for it: bash runs the INT/TERM
# trap only once the foreground command ends, but interrupts a wait.
waited() {
  "$@" &
  local pid=$!
  pids+=("$pid")
  wait "$pid"
}


cat >"$results/gateway.yaml" <<EOF
limits:
  maxConnections: 200000
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 1
EOF

server_pid=""
server_port=""
# launch_server IMPL BACKEND_PORT LOG ECHO: starts it pinned to core 0, sets
# server_pid/server_port, waits for its listener; returns 1 when it did not
# come up. ECHO: 1 patches 3.1.0's subscribe reply to echo requestId.
launch_server() {
  local impl=$1 backend=$2 logf=$3 echo=$4
  ensure_rabbitmq
  server_port=$(free_port)
  if [ "$impl" = centrifugo ]; then
    # One OS thread running Go code, like the gateway's one core: without
    # GOMAXPROCS Go sizes its scheduler by the machine's CPUs, not by the
    # affinity mask taskset sets.
    centrifugo_config "$results/logs/centrifugo-$server_port.json" "$server_port" "$centrifugo_key"
    GOMAXPROCS=1 "${server_cpu[@]}" "$centrifugo" --config "$results/logs/centrifugo-$server_port.json" \
      >"$logf" 2>&1 &
  elif [ "$impl" = rust ]; then
    HT_LOG=warn HT_AMQP_URL="$amqp_url" "${server_cpu[@]}" "$gateway" serve --config "$results/gateway.yaml" \
      --listen "127.0.0.1:$server_port" --backend-url "http://127.0.0.1:$backend/" \
      --broker amqp --exchange "$exchange" --exchange-durable false >"$logf" 2>&1 &
  else
    # The process started here is the server itself (no supervisor):
    # hypercorn --workers 0 serves in-process; taskset and env exec.
    (cd "$results/logs" && exec env PYTHONPATH="$here" CY_BINDER_INTERNAL="http://127.0.0.1:$backend/" \
      HTC_AMQP_URL="$amqp_url" HTC_EXCHANGE="$exchange" HTC_ECHO_REQUEST_ID="$echo" \
      "${server_cpu[@]}" "$venv/bin/hypercorn" --workers 0 --backlog 1024 \
      --bind "127.0.0.1:$server_port" ht_python_app:application) >"$logf" 2>&1 &
  fi
  server_pid=$!
  pids+=("$server_pid")
  local up=0
  for _ in $(seq 1 300); do
    if listening "$server_port"; then up=1; break; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.05
  done
  [ "$up" = 1 ]
}

# start_server IMPL BACKEND_PORT LOG: launch_server (patched as configured),
# then waits until a trigger gets through; returns 1 when it did not.
start_server() {
  local impl=$1 logf=$3
  launch_server "$impl" "$2" "$logf" "$echo_request_id" || return 1
  if [ "$impl" = centrifugo ]; then
    # No broker to wait for: the HTTP API publishes in-process.
    for _ in $(seq 1 200); do
      http_ok "$server_port" /health && return 0
      sleep 0.05
    done
    return 1
  fi
  if [ "$impl" = rust ]; then
    local up=0
    for _ in $(seq 1 200); do
      if http_ok "$server_port" /readyz; then up=1; break; fi
      sleep 0.05
    done
    [ "$up" = 1 ] || return 1
  fi
  # Both: a trigger published to the exchange reaches a subscriber (the
  # AMQP consumer is bound). Needs a backend that allows {"hot": …}.
  waited "${bench_cpu[@]}" "$py" "$here/probe.py" ready --url "ws://127.0.0.1:$server_port/ws/" \
    --amqp-url "$amqp_url" --exchange "$exchange" --timeout 30 >>"$logf" 2>&1
}

# status_json FILE key=value…: a small JSON object of strings/numbers.
status_json() {
  local file=$1; shift
  local first=1 kv k v
  {
    printf '{'
    for kv in "$@"; do
      k=${kv%%=*}; v=${kv#*=}
      [ "$first" = 1 ] || printf ','
      first=0
      if [[ "$v" =~ ^-?[0-9]+$ ]] || [ "$v" = true ] || [ "$v" = false ] || [ "$v" = null ]; then
        printf '"%s":%s' "$k" "$v"
      else
        v=${v//\\/\\\\}; v=${v//\"/\\\"}
        printf '"%s":"%s"' "$k" "$v"
      fi
    done
    printf '}\n'
  } >"$file"
}

# bench_side IMPL NAME BACKEND_PORT -- BENCH ARGS…: one server, one bench
# invocation; writes runs/IMPL-NAME.{json,txt,status.json} and logs/.
bench_side() {
  local impl=$1 name=$2 backend=$3; shift 4
  local base="$results/runs/$impl-$name" logf="$results/logs/$impl-$name.log"
  local cap=$rust_timeout
  [ "$impl" = python ] && cap=$python_timeout
  [ "$impl" = centrifugo ] && cap=$centrifugo_timeout
  : >"$base.json"
  if ! start_server "$impl" "$backend" "$logf"; then
    log "$impl $name: server did not become ready (see $logf)"
    status_json "$base.status.json" impl="$impl" name="$name" ready=false rc=null timed_out=false \
      server_alive=false reason="server did not become ready within 30 s (see logs/$impl-$name.log)"
    stop_pid "$server_pid"
    return 1
  fi
  local rc=0 start end
  start=$(date +%s.%N)
  local peer=(--url "ws://127.0.0.1:$server_port/ws/" --publish amqp --amqp-url "$amqp_url" --exchange "$exchange")
  if [ "$impl" = centrifugo ]; then
    peer=(--url "ws://127.0.0.1:$server_port/connection/websocket" --protocol centrifugo --publish centrifugo
      --trigger-token "$centrifugo_key")
  fi
  HTB_AMQP_URL="$amqp_url" waited timeout -k 10 "$cap" "${bench_cpu[@]}" "$bench" "$@" \
    "${peer[@]}" --server-pid "$server_pid" --json "${extra[@]}" >"$base.json" 2>"$base.txt" || rc=$?
  end=$(date +%s.%N)
  local alive=true timed_out=false reason=""
  kill -0 "$server_pid" 2>/dev/null || alive=false
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && timed_out=true
  if [ "$timed_out" = true ]; then reason="bench run capped at ${cap} s (--$impl-timeout)"
  elif [ "$alive" = false ]; then reason="the server exited during the run (see logs/$impl-$name.log)"
  elif [ "$rc" = 2 ]; then reason="the bench could not run (see runs/$impl-$name.txt)"
  fi
  status_json "$base.status.json" impl="$impl" name="$name" ready=true rc="$rc" timed_out="$timed_out" \
    server_alive="$alive" seconds="$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')" reason="$reason"
  stop_pid "$server_pid"
  log "$impl $name: exit $rc$([ -n "$reason" ] && echo " ($reason)")"
  return 0
}

# ---------------------------------------------------------------- run
backend_port=$(free_port)
"${bench_cpu[@]}" "$bench" serve-backend --listen "127.0.0.1:$backend_port" >"$results/logs/backend.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do listening "$backend_port" && break; sleep 0.05; done
listening "$backend_port" || die "the bench backend did not start (see $results/logs/backend.log)"

status=0
cat >"$results/meta.json" <<EOF
{"scale": "$scale", "scenarios": "${scenarios[*]}", "exchange": "$exchange", "amqp_url": "$amqp_url",
 "python_patch_request_id": $([ "$echo_request_id" = 1 ] && echo true || echo false),
 "python_timeout": $python_timeout, "rust_timeout": $rust_timeout, "centrifugo_timeout": $centrifugo_timeout,
 "centrifugo": "$([ -n "$centrifugo" ] && echo "$HTC_CENTRIFUGO_VERSION" || echo none)", "centrifugo_scenarios": "$centrifugo_scenarios",
 "sweep": "$sweep", "sweep_rate": "$sweep_rate", "sweep_duration": "$sweep_duration", "sweep_burst": "$sweep_burst",
 "extra_bench_args": "${extra[*]}", "started": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
 "host": "$(uname -n)", "cpus": $(nproc), "git": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)",
 "pinning": "$([ ${#server_cpu[@]} -gt 0 ] && echo 'servers taskset -c 0, bench taskset -c 1' || echo none)"}
EOF

if [ "$probe" = 1 ]; then
  # The probe serves its own backend (it answers by token and records the
  # requests); the Python server runs unpatched here.
  for impl in rust python; do
    pport=$(free_port)
    plog="$results/logs/$impl-protocol.log"
    launch_server "$impl" "$pport" "$plog" 0 || log "$impl did not start for the probe (see $plog)"
    sleep 2 # the AMQP consumer binds right after the listener opens
    log "protocol probe: $impl"
    waited timeout -k 5 150 "${bench_cpu[@]}" "$py" "$here/probe.py" protocol --url "ws://127.0.0.1:$server_port/ws/" \
      --backend-listen "127.0.0.1:$pport" --amqp-url "$amqp_url" --exchange "$exchange" \
      --label "$impl" --out "$results/protocol-$impl.json" >>"$plog" 2>&1 \
      || log "protocol probe against $impl failed (see $plog)"
    stop_pid "$server_pid"
  done
fi

# The floor probe (tests/bench/floor, see docs/performance.md "Floor
# probe"): hot's shape at --scale, its sender on the servers' core, its
# reader on the bench's; every side's hot run is then compared with it.
floor_json=""
run_floor() {
  log "floor probe before hot"
  if floor_hot "$bench" "$scale" "$results/floor" "$([ ${#server_cpu[@]} = 0 ] || echo 1)"; then
    floor_json=$results/floor.json
  else
    log "the floor probe failed (see $results/floor.txt, $results/floor-sender.log): hot is not compared with it"
  fi
}

for scenario in "${scenarios[@]}"; do
  impls=(rust python)
  [ -n "$centrifugo" ] && [[ "$centrifugo_scenarios" == *" $scenario "* ]] && impls+=(centrifugo)
  with_floor=()
  if [ "$scenario" = hot ] && [ "$floor" = 1 ]; then
    run_floor || true
    [ -z "$floor_json" ] || with_floor=(--floor "$floor_json")
  fi
  for impl in "${impls[@]}"; do
    log "$scenario: $impl (scale $scale)"
    bench_side "$impl" "$scenario" "$backend_port" -- scenario "$scenario" --scale "$scale" "${with_floor[@]}" || true
  done
done

if [ -n "$sweep" ]; then
  IFS=, read -r -a sweep_counts <<<"$sweep"
  for n in "${sweep_counts[@]}"; do
    for impl in rust python; do
      log "sweep: $impl, $n connections"
      bench_side "$impl" "sweep-$n" "$backend_port" -- run --name "hot-sweep-$n" -n "$n" --rooms hot=1 \
        --rates "$sweep_rate,0" --duration "$sweep_duration" --triggers "$sweep_burst" --payload-bytes 128 || true
    done
  done
fi

"$py" "$here/report.py" "$results" || { log "report.py failed"; exit 2; }
for scenario in "${scenarios[@]}"; do
  f="$results/runs/rust-$scenario.status.json"
  grep -q '"rc":0' "$f" 2>/dev/null || status=1
done
log "results in $results"
exit "$status"
