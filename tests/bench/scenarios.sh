#!/usr/bin/env bash
# Runs the benchmark scenarios of tests/bench against a freshly started
# release gateway for each, and writes one JSON result per scenario.
#
#   tests/bench/scenarios.sh [options] [scenario…]
#
# scenarios     any of: idle floor hot sparse wildcard storm churn admission
#               (default: all). floor is the floor probe (tests/bench/floor):
#               a minimal C sender and reader doing hot's fan-out on raw
#               epoll; it runs just before hot whenever hot runs, and hot's
#               report then shows its figures beside the gateway's, as
#               ratios
# --scale F     passed to every scenario (default 1 = the full sizes; 0.01
#               runs each in seconds)
# --results DIR where results go (default target/bench-results/<UTC time>)
# --broker B    memory (default) or amqp: the gateway's broker
# --publish P   http (default) or amqp: how the bench publishes triggers
#               (amqp implies --broker amqp)
# --amqp-url U  RabbitMQ (default amqp://guest:guest@127.0.0.1:5672/%2f,
#               or HTB_AMQP_URL)
# --no-build    use the release binaries already in target/release
# --no-floor    do not run the floor probe (hot's report has no ratios)
# --no-write-through  the gateway with fanout.writeThrough false (every
#               delivery queued for its session's task), to compare
# --netns       run the gateway in its own network namespace behind a veth
#               pair instead of on loopback (needs root and iproute2's ip;
#               memory broker only), with receive packet steering so the
#               bench's receive work runs on the bench's core: see below
# -- ARGS…      extra arguments for every bench invocation
#
# admission (a reconnect storm) runs two gateways side by side, both with
# backend.admission {maxConcurrent: 32, maxQueued: 256, maxWaitSeconds: 5},
# one with backend.coalesce false (the storm of distinct credentials), one
# with true (the storm of shared ones), against the bench's own backend
# (--serve-backend: 32 calls at once, 20 ms each), which counts the calls
# it gets at once. HTB_ADMISSION_MAX_CONCURRENT, HTB_ADMISSION_MAX_QUEUED,
# HTB_ADMISSION_MAX_WAIT change the gateways' settings.
#
# The gateway runs pinned to core 0 (taskset -c 0), the bench and its
# bundled backend to core 1, so they do not steal each other's CPU. Both
# get as many open files as the hard limit allows. Everything started here
# is stopped on exit. Exit status: 0 when every scenario ran and was
# correct, 1 otherwise.
#
# The floor probe runs hot's shape (connections, rates, seconds per step,
# payload, from `high-templar-bench floor-spec --scale F`) with its sender
# on the gateway's core and its reader on the bench's, and writes
# floor.json (and floor.txt, floor-sender.log); the C sources are compiled
# with cc into target/bench-floor/<hash>/ once. It runs on loopback only:
# with --netns it is skipped.
#
# On loopback the kernel does the receiver's TCP work on the sender's core,
# so the bench's receive processing of every delivery is billed to the
# gateway's core. --netns emulates two hosts instead: namespace htb-gw-PID
# holds the gateway on 10.203.0.1 (veth htbg-PID); the host side (veth
# htbh-PID) has 10.203.0.2 (the bundled backend listens there) and
# 10.203.0.3 … 10.203.0.18 (the bench's source addresses). RPS steers
# packets arriving on the host side (gateway → bench) to core 1 and those
# arriving on the gateway side (bench → gateway) to core 0. The namespace
# and the veth pair are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

all=(idle floor hot sparse wildcard storm churn admission)
scale=1
results=""
broker=memory
publish=http
amqp_url="${HTB_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
build=1
netns=0
floor=1
write_through=true
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
    --netns) netns=1; shift ;;
    --) shift; extra=("$@"); break ;;
    --no-floor) floor=0; shift ;;
    --no-write-through) write_through=false; shift ;;
    -h|--help) sed -n '2,58p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    idle|floor|hot|sparse|wildcard|storm|churn|admission) scenarios+=("$1"); shift ;;
    *) echo "scenarios.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
[ "$publish" = amqp ] && broker=amqp
# The floor goes just before hot (unless named already, or --no-floor);
# it runs on loopback, so not with --netns.
if [ "$netns" = 1 ] && [ "$floor" = 1 ]; then
  echo "scenarios: --netns: the floor probe runs on loopback only: skipping it (hot's report has no ratios)" >&2
  floor=0
fi
ordered=()
for scenario in "${scenarios[@]}"; do
  if [ "$scenario" = floor ]; then
    # Where it was named, unless hot runs: then just before hot.
    [ "$floor" = 1 ] && [[ " ${scenarios[*]} " != *" hot "* ]] && ordered+=(floor)
    continue
  fi
  [ "$scenario" = hot ] && [ "$floor" = 1 ] && ordered+=(floor)
  ordered+=("$scenario")
done
scenarios=("${ordered[@]}")
if [ ${#scenarios[@]} = 0 ]; then
  echo "scenarios: nothing to run (floor alone with --no-floor or --netns)" >&2
  exit 2
fi
if [ "$netns" = 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "scenarios: --netns needs root (network namespace, veth pair, RPS)" >&2; exit 2; }
  command -v ip >/dev/null 2>&1 \
    || { echo "scenarios: --netns needs ip from iproute2 (apt-get install iproute2)" >&2; exit 2; }
  # The namespace has no route out: a RabbitMQ on the host's loopback is out of reach.
  [ "$broker" = memory ] \
    || { echo "scenarios: --netns runs the memory broker only (the gateway cannot reach the host's RabbitMQ)" >&2; exit 2; }
fi
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
ns=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  if [ -n "$ns" ]; then
    # Deleting one end of a veth pair deletes both; the namespace goes with
    # its last process.
    ip link del "$host_veth" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# Where the gateway listens, where the backend listens, how the gateway is
# started, and extra bench flags: loopback by default, the namespace with --netns.
gw_host=127.0.0.1
backend_host=127.0.0.1
gw_exec=()
netns_bench=()
if [ "$netns" = 1 ]; then
  subnet=10.203.0
  if [ -n "$(ip -o -4 addr show to "$subnet.0/24")" ]; then
    echo "scenarios: --netns: $subnet.0/24 is already in use on this host (another --netns run?):" >&2
    ip -o -4 addr show to "$subnet.0/24" >&2
    exit 2
  fi
  ns="htb-gw-$$"
  host_veth="htbh-$$"
  gw_veth="htbg-$$"
  echo "scenarios: --netns: namespace $ns, veth $host_veth ($subnet.2, $subnet.3-18) <-> $gw_veth ($subnet.1)"
  ip netns add "$ns" || { echo "scenarios: --netns: 'ip netns add $ns' failed" >&2; ns=""; exit 2; }
  ip link add "$host_veth" type veth peer name "$gw_veth"
  ip link set "$gw_veth" netns "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$subnet.1/24" dev "$gw_veth"
  ip -n "$ns" link set "$gw_veth" up
  ip addr add "$subnet.2/24" dev "$host_veth"
  for i in $(seq 3 18); do ip addr add "$subnet.$i/24" dev "$host_veth"; done
  ip link set "$host_veth" up
  # A new namespace starts with the kernel's defaults: give the gateway the
  # host's listen backlog limits.
  # (/proc/sys/net shows the namespace of the process reading it.)
  for key in net/core/somaxconn net/ipv4/tcp_max_syn_backlog; do
    # shellcheck disable=SC2016 # expanded by the inner shell
    ip netns exec "$ns" sh -c 'echo "$1" >"/proc/sys/$2"' sh "$(cat "/proc/sys/$key")" "$key" \
      || echo "scenarios: --netns: could not copy $key into the namespace" >&2
  done
  # RPS: gateway → bench packets (arriving on the host side) on the bench's
  # core, bench → gateway packets (arriving on the gateway side) on the
  # gateway's core. /sys shows a namespace's devices only from inside it.
  if [ ${#server_cpu[@]} -gt 0 ]; then
    rps=/sys/class/net/$host_veth/queues/rx-0/rps_cpus
    if [ -w "$rps" ]; then
      echo 2 >"$rps"
      echo "scenarios: --netns: RPS $host_veth -> core 1 (rps_cpus $(cat "$rps"))"
    else
      echo "scenarios: --netns: $rps does not exist: no RPS, gateway -> bench packets are processed on the sending core" >&2
    fi
    rps=/sys/class/net/$gw_veth/queues/rx-0/rps_cpus
    # shellcheck disable=SC2016 # expanded by the inner shell
    if ip netns exec "$ns" sh -c '[ -w "$1" ] && echo 1 >"$1"' sh "$rps"; then
      echo "scenarios: --netns: RPS $gw_veth -> core 0 (rps_cpus $(ip netns exec "$ns" cat "$rps"))"
    else
      echo "scenarios: --netns: $rps does not exist in $ns: no RPS, bench -> gateway packets are processed on the sending core" >&2
    fi
  else
    echo "scenarios: --netns: not pinning, so no RPS either" >&2
  fi
  gw_host=$subnet.1
  backend_host=$subnet.2
  gw_exec=(ip netns exec "$ns")
  netns_bench=(--source-base "$subnet.3" --source-addrs 16)
fi

# Packets dropped because a core's input backlog was full (second column
# of /proc/net/softnet_stat, one line per CPU, hexadecimal).
softnet_drops() {
  local total=0 dropped
  while read -r _ dropped _; do total=$((total + 16#$dropped)); done </proc/net/softnet_stat
  echo "$total"
}

backend_port=$(free_port)
"${bench_cpu[@]}" "$bench" serve-backend --listen "$backend_host:$backend_port" >"$results/backend.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do listening "$backend_port" "$backend_host" && break; sleep 0.05; done

token="bench-$RANDOM$RANDOM"
exchange=hightemplar
cat >"$results/gateway.yaml" <<EOF
limits:
  maxConnections: 200000
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 1
fanout:
  writeThrough: $write_through
EOF

# start_gateway NAME CONFIG BACKEND-PORT: a gateway pinned like the others,
# on a free port; sets gw (pid) and port, or returns 1 when it did not
# become ready.
start_gateway() {
  local name=$1 config=$2 bport=$3
  port=$(free_port)
  local args=(serve --config "$config" --listen "$gw_host:$port"
    --backend-url "http://$backend_host:$bport/" --trigger-token "$token")
  if [ "$broker" = amqp ]; then
    args+=(--broker amqp --exchange "$exchange")
  fi
  # ip netns exec and taskset exec what follows: $! is the gateway itself.
  HT_LOG=warn HT_AMQP_URL="$amqp_url" "${gw_exec[@]}" "${server_cpu[@]}" "$gateway" "${args[@]}" \
    >"$results/gateway-$name.log" 2>&1 &
  gw=$!
  pids+=("$gw")
  for _ in $(seq 1 200); do
    if http_ok "$port" /readyz "$gw_host"; then return 0; fi
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.05
  done
  echo "scenarios: gateway $name did not become ready (see $results/gateway-$name.log)" >&2
  stop_pid "$gw"
  return 1
}

# The admission scenario: two gateways (coalescing off, on) and the bench's
# own slow backend with 32 slots, which the bench runs (--serve-backend).
run_admission() {
  local cap=${HTB_ADMISSION_MAX_CONCURRENT:-32} queued=${HTB_ADMISSION_MAX_QUEUED:-256}
  local wait=${HTB_ADMISSION_MAX_WAIT:-5} bport gw_a port_a gw_b port_b rc=0
  bport=$(free_port)
  for coalesce in false true; do
    cat >"$results/gateway-admission-coalesce-$coalesce.yaml" <<EOF
backend:
  admission: {maxConcurrent: $cap, maxQueued: $queued, maxWaitSeconds: $wait}
  coalesce: $coalesce
limits:
  maxConnections: 200000
shutdown:
  drainDelaySeconds: 0
  closeWindowSeconds: 1
EOF
  done
  start_gateway admission "$results/gateway-admission-coalesce-false.yaml" "$bport" || return 1
  gw_a=$gw port_a=$port
  start_gateway admission-coalesce "$results/gateway-admission-coalesce-true.yaml" "$bport" \
    || { stop_pid "$gw_a"; return 1; }
  gw_b=$gw port_b=$port
  echo "scenarios: admission (scale $scale; gateways maxConcurrent $cap, maxQueued $queued, maxWaitSeconds $wait:" \
    "coalesce false on :$port_a, true on :$port_b)"
  "${bench_cpu[@]}" "$bench" scenario admission --scale "$scale" --serve-backend "$backend_host:$bport" \
    --url "ws://$gw_host:$port_a/ws/" --server-pid "$gw_a" \
    --coalesce-url "ws://$gw_host:$port_b/ws/" --coalesce-server-pid "$gw_b" \
    --max-concurrent "$cap" --json "${netns_bench[@]}" "${extra[@]}" \
    >"$results/admission.json" 2>"$results/admission.txt" || rc=$?
  grep -v '^\[bench\]' "$results/admission.txt" || true
  [ "$rc" = 0 ] || echo "scenarios: admission exited with $rc" >&2
  stop_pid "$gw_a"
  stop_pid "$gw_b"
  return "$rc"
}

# The floor probe: hot's shape, the sender on the gateway's core, the
# reader on the bench's.
floor_ok=0
run_floor() {
  if floor_hot "$bench" "$scale" "$results/floor" "$([ ${#server_cpu[@]} = 0 ] || echo 1)"; then
    cat "$results/floor.txt"
    floor_ok=1
  else
    cat "$results/floor.txt" "$results/floor-sender.log" >&2
    echo "scenarios: the floor probe failed (see $results/floor.txt, $results/floor-sender.log)" >&2
    return 1
  fi
}

status=0
for scenario in "${scenarios[@]}"; do
  if [ "$scenario" = admission ]; then
    run_admission || status=1
    continue
  fi
  if [ "$scenario" = floor ]; then
    run_floor || status=1
    continue
  fi
  port=$(free_port)
  gw_args=(serve --config "$results/gateway.yaml" --listen "$gw_host:$port"
    --backend-url "http://$backend_host:$backend_port/" --trigger-token "$token")
  if [ "$broker" = amqp ]; then
    gw_args+=(--broker amqp --exchange "$exchange")
  fi
  # ip netns exec and taskset exec what follows: $! is the gateway itself.
  HT_LOG=warn HT_AMQP_URL="$amqp_url" "${gw_exec[@]}" "${server_cpu[@]}" "$gateway" "${gw_args[@]}" \
    >"$results/gateway-$scenario.log" 2>&1 &
  gw=$!
  pids+=("$gw")
  ready=0
  for _ in $(seq 1 200); do
    if http_ok "$port" /readyz "$gw_host"; then ready=1; break; fi
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.05
  done
  if [ "$ready" = 0 ]; then
    echo "scenarios: gateway for $scenario did not become ready (see $results/gateway-$scenario.log)" >&2
    status=1
    stop_pid "$gw"
    continue
  fi
  if [ "$netns" = 1 ]; then
    if [ "$(readlink "/proc/$gw/exe")" != "$(readlink -f "$gateway")" ]; then
      echo "scenarios: pid $gw is not the gateway ($(readlink "/proc/$gw/exe")): server figures would be wrong" >&2
      status=1
      stop_pid "$gw"
      continue
    fi
    drops_before=$(softnet_drops)
  fi
  echo "scenarios: $scenario (scale $scale, broker $broker, publish $publish$([ "$netns" = 1 ] && echo ", netns $ns"))"
  rc=0
  floor_flag=()
  if [ "$scenario" = hot ] && [ "$floor_ok" = 1 ]; then
    floor_flag=(--floor "$results/floor.json")
  elif [ "$scenario" = hot ] && [ "$floor" = 1 ]; then
    echo "scenarios: hot: no floor probe result to compare with (it failed)" >&2
  fi
  HTB_AMQP_URL="$amqp_url" HTB_TRIGGER_TOKEN="$token" "${bench_cpu[@]}" "$bench" scenario "$scenario" \
    --scale "$scale" --url "ws://$gw_host:$port/ws/" --server-pid "$gw" --publish "$publish" \
    --exchange "$exchange" --json "${floor_flag[@]}" "${netns_bench[@]}" "${extra[@]}" \
    >"$results/$scenario.json" 2>"$results/$scenario.txt" || rc=$?
  grep -v '^\[bench\]' "$results/$scenario.txt" || true
  [ "$rc" = 0 ] || { echo "scenarios: $scenario exited with $rc" >&2; status=1; }
  if [ "$netns" = 1 ]; then
    drops=$(($(softnet_drops) - drops_before))
    [ "$drops" = 0 ] || echo "scenarios: $scenario: $drops packets dropped by full input backlogs (net.core.netdev_max_backlog $(cat /proc/sys/net/core/netdev_max_backlog)); TCP retransmitted them" >&2
  fi
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
