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
