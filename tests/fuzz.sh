#!/usr/bin/env bash
# libFuzzer targets of the gateway's parsers (fuzz/, docs/fuzzing.md).
#
#   tests/fuzz.sh [SECONDS] [TARGET...]   build, then run each target SECONDS (default 20)
#   tests/fuzz.sh build [TARGET...]       build only (e.g. in the background of the test command)
#
# Targets: client_frame room trigger bootstrap config (default: all).
# Each run starts from the target's working corpus fuzz/corpus/<target>/
# (untracked, grows across runs) plus the tracked seeds fuzz/seeds/<target>/.
# Exits non-zero if any target crashes, panics, runs out of memory or times
# out; the input is left in fuzz/artifacts/<target>/ and previewed here.
#
# Environment:
#   FUZZ_SANITIZER   none (default) or address: see docs/fuzzing.md
#   FUZZ_ARGS        extra libFuzzer flags for every target (e.g. -fork=2: both cores)
#   FUZZ_TARGET_DIR  build directory (default fuzz/target); the test command uses a cache directory
#   CARGO_FUZZ_ROOT  where cargo-fuzz is installed (default ~/.cache/high-templar/cargo-fuzz-<version>)
set -euo pipefail

# Everything runs inside main, so bash has read the whole file before it
# starts: editing this script during a run cannot break that run.
main() {
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  FUZZ="$ROOT/fuzz"
  CARGO_FUZZ_VERSION=0.13.2
  CARGO_FUZZ_ROOT=${CARGO_FUZZ_ROOT:-"${XDG_CACHE_HOME:-$HOME/.cache}/high-templar/cargo-fuzz-$CARGO_FUZZ_VERSION"}
  SANITIZER=${FUZZ_SANITIZER:-none}
  ALL_TARGETS=(client_frame room trigger bootstrap config)
  # Largest input per target: the gateway's own limits (limits.maxMessageBytes,
  # trigger.maxBodyBytes, backend.maxBodyBytes); rooms are read out of
  # triggers; config files are small.
  local -A MAX_LEN=([client_frame]=65536 [room]=1048576 [trigger]=1048576 [bootstrap]=4194304 [config]=65536)

  say() { printf 'fuzz.sh: %s\n' "$*" >&2; }
  die() { say "$*"; exit 2; }

  mode=run
  seconds=20
  if [[ $# -gt 0 ]]; then
    case $1 in
      build) mode=build; shift ;;
      -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
      *[!0-9]*|'') ;;
      *) seconds=$1; shift ;;
    esac
  fi
  targets=("$@")
  [[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")
  for t in "${targets[@]}"; do
    [[ -n ${MAX_LEN[$t]:-} ]] || die "unknown target '$t' (targets: ${ALL_TARGETS[*]})"
  done
  [[ $seconds -ge 1 ]] || die "SECONDS must be at least 1"
  case $SANITIZER in none|address) ;; *) die "FUZZ_SANITIZER must be none or address, not '$SANITIZER'" ;; esac

  # libFuzzer needs a nightly toolchain (-Zsanitizer, sancov passes).
  # A machine without one gets it from rustup (the test command installs
  # what the tests need).
  if ! cargo +nightly --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 ||
      die "the nightly Rust toolchain is missing and rustup is not installed; install Rust with rustup (https://rustup.rs)"
    say "installing the nightly Rust toolchain (once): rustup toolchain install nightly --profile minimal"
    rustup toolchain install nightly --profile minimal ||
      die "cannot install the nightly Rust toolchain; try: rustup toolchain install nightly --profile minimal"
  fi

  # cargo-fuzz, pinned, installed once into a cache directory.
  if [[ ! -x "$CARGO_FUZZ_ROOT/bin/cargo-fuzz" ]]; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION into $CARGO_FUZZ_ROOT (once, ~1-2 min)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$CARGO_FUZZ_ROOT" \
      || die "cargo install cargo-fuzz $CARGO_FUZZ_VERSION failed"
  fi
  export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"

  TRIPLE=$(rustc +nightly -vV | sed -n 's/^host: //p')
  export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$FUZZ/target}/$SANITIZER"
  BIN_DIR="$CARGO_TARGET_DIR/$TRIPLE/release"

  cd "$ROOT"
  build_args=(build -O -a --sanitizer "$SANITIZER" --target "$TRIPLE" --target-dir "$CARGO_TARGET_DIR" --fuzz-dir "$FUZZ")
  build_start=$SECONDS
  if [[ ${#targets[@]} -eq ${#ALL_TARGETS[@]} ]]; then
    cargo +nightly fuzz "${build_args[@]}"
  else
    for t in "${targets[@]}"; do cargo +nightly fuzz "${build_args[@]}" "$t"; done
  fi
  say "built ${targets[*]} (sanitizer: $SANITIZER) in $((SECONDS - build_start)) s"
  [[ $mode == run ]] || exit 0

  if [[ $SANITIZER == address ]]; then
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"
  fi

  preview() { # FILE: size, then an escaped and a hex preview of its start
    local file=$1
    printf '  %s (%s bytes)\n' "$file" "$(wc -c <"$file")"
    if command -v python3 >/dev/null; then
      python3 -c 'import sys; d = open(sys.argv[1], "rb").read(); print("  escaped:", repr(d[:2048]) + (" ..." if len(d) > 2048 else ""))' "$file"
    fi
    if command -v xxd >/dev/null; then
      head -c 512 "$file" | xxd | sed 's/^/  /'
    else
      head -c 512 "$file" | od -A x -t x1z -v | sed 's/^/  /'
    fi
  }

  failed=()
  summary=()
  read -r -a extra_args <<<"${FUZZ_ARGS:-}"
  for t in "${targets[@]}"; do
    corpus="$FUZZ/corpus/$t"
    artifacts="$FUZZ/artifacts/$t"
    log="$FUZZ/target/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    stamp=$(mktemp)
    say "running $t for $seconds s (max_len ${MAX_LEN[$t]}, log $log)"
    start=$SECONDS
    rc=0
    "$BIN_DIR/$t" \
      -artifact_prefix="$artifacts/" \
      -max_total_time="$seconds" \
      -rss_limit_mb=2048 \
      -timeout=10 \
      -max_len="${MAX_LEN[$t]}" \
      -print_final_stats=1 \
      "${extra_args[@]}" \
      "$corpus" "$FUZZ/seeds/$t" >"$log" 2>&1 || rc=$?
    elapsed=$((SECONDS - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    new=()
    while IFS= read -r -d '' f; do new+=("$f"); done \
      < <(find "$artifacts" -maxdepth 1 -type f -newer "$stamp" \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) -print0)
    rm -f "$stamp"
    if [[ $rc -ne 0 || ${#new[@]} -gt 0 ]]; then
      failed+=("$t")
      summary+=("$(printf '%-13s FAILED (exit %s) after %4s s, %s execs, %s exec/s' "$t" "$rc" "$elapsed" "${execs:-?}" "${rate:-?}")")
      say "$t FAILED (exit $rc); end of its log:"
      grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' "$log" | tail -n 60 | sed 's/^/  | /' >&2
      if [[ ${#new[@]} -gt 0 ]]; then
        say "input(s) left in place; reproduce with: $BIN_DIR/$t <file>"
        for f in "${new[@]}"; do preview "$f" >&2; done
      fi
    else
      summary+=("$(printf '%-13s ok     %4s s, %10s execs, %6s exec/s, %s, corpus %s files' \
        "$t" "$elapsed" "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$(find "$corpus" -type f | wc -l)")")
    fi
  done

  printf '\nfuzz.sh: %s s per target, sanitizer %s\n' "$seconds" "$SANITIZER"
  printf '  %s\n' "${summary[@]}"
  if [[ ${#failed[@]} -gt 0 ]]; then
    say "FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/; docs/fuzzing.md says how to turn one into a unit test)"
    exit 1
  fi
}

main "$@"
