# shellcheck shell=bash
# Shell helpers shared by tests/bench/smoke.sh, scenarios.sh and
# compare/compare.sh. Source it; it defines functions only.

# listening PORT [HOST]: something accepts connections on HOST:PORT
# (HOST: 127.0.0.1 by default).
listening() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# free_port: prints a loopback port nothing listens on (fails after 50 tries).
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 10000))
    listening "$port" || { echo "$port"; return 0; }
  done
  echo "no free loopback port found" >&2
  return 1
}

# http_ok PORT PATH [HOST]: GET http://HOST:PORT/PATH answers 200 (HOST:
# 127.0.0.1 by default).
http_ok() {
  (
    local host=${3:-127.0.0.1}
    exec 3<>"/dev/tcp/$host/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$host" >&3
    read -r -t 2 _ status _ <&3 || exit 1
    [ "$status" = 200 ]
  ) 2>/dev/null
}

# stop_pid PID: SIGTERM, up to 5 s to exit, then SIGKILL; reaps it.
stop_pid() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# floor_build: compiles the floor probe (tests/bench/floor/floor_sender.c,
# floor_reader.c: C11, -O2, libc only) with ${CC:-cc} into
# target/bench-floor/<hash of the sources, flags and compiler>/, unless it
# is there already; prints that directory.
floor_build() {
  local src=tests/bench/floor cc=${CC:-cc} hash dir prog
  local flags=(-std=c11 -O2 -Wall -Wextra)
  if ! command -v "$cc" >/dev/null 2>&1; then
    echo "floor: no C compiler '$cc' (apt-get install gcc, or set CC)" >&2
    return 1
  fi
  hash=$({
    cat "$src/floor_common.h" "$src/floor_sender.c" "$src/floor_reader.c"
    echo "$cc ${flags[*]}"
    "$cc" --version 2>&1 | sed -n 1p
  } | sha256sum | cut -c1-16)
  dir=target/bench-floor/$hash
  for prog in floor_sender floor_reader; do
    [ -x "$dir/$prog" ] && continue
    mkdir -p "$dir"
    if ! "$cc" "${flags[@]}" -o "$dir/$prog.tmp" "$src/$prog.c"; then
      echo "floor: compiling $src/$prog.c failed" >&2
      return 1
    fi
    mv "$dir/$prog.tmp" "$dir/$prog"
  done
  echo "$dir"
}

# floor_run DIR PREFIX N SENDER-CORE READER-CORE [SENDER-FLAG…]: runs the
# floor probe built in DIR: DIR/floor_sender on a free loopback port with
# the flags given (--rates, --duration, --payload-bytes, …) and
# DIR/floor_reader with N connections, each pinned to its core with
# taskset (- for no pinning). Writes PREFIX.json (the reader's JSON),
# PREFIX.txt (the reader's table and messages) and PREFIX-sender.log. The
# sender's pid goes into the caller's pids array while it runs (for the
# caller's cleanup). Returns 0 when both exited 0 (every connection got
# every frame), 1 otherwise.
floor_run() {
  local dir=$1 prefix=$2 n=$3 sender_core=$4 reader_core=$5 port sender rc=0
  shift 5
  local sender_pin=() reader_pin=() sources=()
  [ "$sender_core" = - ] || sender_pin=(taskset -c "$sender_core")
  [ "$reader_core" = - ] || reader_pin=(taskset -c "$reader_core")
  # One source address has ≈ 28 000 ephemeral ports.
  [ "$n" -le 25000 ] || sources=(--source-addrs $((n / 20000 + 1)))
  port=$(free_port) || return 1
  # taskset execs the sender: $! is the sender itself.
  "${sender_pin[@]}" "$dir/floor_sender" --port "$port" --connections "$n" "$@" >"$prefix-sender.log" 2>&1 &
  sender=$!
  pids+=("$sender")
  "${reader_pin[@]}" "$dir/floor_reader" --port "$port" --connections "$n" "${sources[@]}" \
    >"$prefix.json" 2>"$prefix.txt" || rc=$?
  if [ "$rc" = 0 ]; then
    # It exits once the reader closed every connection.
    wait "$sender" || rc=$?
  else
    stop_pid "$sender"
  fi
  local kept=() pid
  for pid in "${pids[@]}"; do [ "$pid" = "$sender" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
  [ "$rc" = 0 ] || return 1
}

# floor_hot BENCH SCALE PREFIX PIN: the floor probe with the hot scenario's
# shape at SCALE (from BENCH floor-spec), built by floor_build, its sender
# on core 0 and its reader on core 1 when PIN is 1 (unpinned otherwise);
# writes PREFIX.json, PREFIX.txt and PREFIX-sender.log and returns as
# floor_run does. Says what it runs on stderr.
floor_hot() {
  local bench=$1 scale=$2 prefix=$3 pin=$4 dir spec n rates seconds payload cores=(- -)
  dir=$(floor_build) || return 1
  spec=$("$bench" floor-spec --scale "$scale") || return 1
  read -r n rates seconds payload <<<"$spec"
  [ "$pin" != 1 ] || cores=(0 1)
  echo "floor (scale $scale: $n connections, $rates triggers/s, ${seconds}s each, $payload B; $dir)" >&2
  floor_run "$dir" "$prefix" "$n" "${cores[@]}" --rates "$rates" --duration "$seconds" --payload-bytes "$payload"
}
