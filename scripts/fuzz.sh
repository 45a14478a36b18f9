#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (frame_decode, workflow_parse) one after the other,
# each for SECONDS_PER_TARGET seconds (default 60), and says for each how many executions
# it ran and whether it found a crash. Exits non-zero if any target crashed, naming the
# input libFuzzer saved under fuzz/artifacts/<target>/. See FUZZING.md.
#
# CI does not run this script: it takes minutes and needs cargo-fuzz. It installs
# cargo-fuzz (`cargo install cargo-fuzz --locked`) if it is missing. cargo-fuzz passes
# nightly-only flags to rustc, which a stable toolchain accepts with RUSTC_BOOTSTRAP=1.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
# Environment: FUZZ_SANITIZER (default address; `none` where AddressSanitizer cannot run).
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
sanitizer="${FUZZ_SANITIZER:-address}"
targets=(frame_decode workflow_parse)

cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it"
    cargo install cargo-fuzz --locked
fi

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT

crashed=0
summary=()
for target in "${targets[@]}"; do
    echo "== $target: building"
    cargo fuzz build --sanitizer "$sanitizer" "$target"
    echo "== $target: fuzzing for ${seconds}s"
    log="$log_dir/$target.log"
    status=0
    cargo fuzz run --sanitizer "$sanitizer" "$target" -- -max_total_time="$seconds" \
        >"$log" 2>&1 || status=$?

    # libFuzzer ends a clean run with "Done N runs in S second(s)"; otherwise the last
    # status line ("#N ...") says how far it got.
    runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    secs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log" | tail -n 1)"
    if [[ -z "$runs" ]]; then
        runs="$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$log" | tail -n 1)"
    fi
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"

    line="$target: ${runs:-an unreported number of} executions"
    if [[ -n "$secs" && "$secs" -gt 0 ]]; then
        line+=" in ${secs}s ($((runs / secs))/s)"
    fi
    if [[ $status -eq 0 ]]; then
        line+=", no crash"
    else
        crashed=1
        # Show what went wrong: the panic message, or else the sanitizer's report.
        grep -A3 'panicked at' "$log" >&2 ||
            grep -E -A20 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$log" | head -n 40 >&2 ||
            true
        if [[ -n "$artifact" ]]; then
            line+=", CRASH: input saved in $artifact"
            line+=" (replay: RUSTC_BOOTSTRAP=1 cargo fuzz run $target $artifact)"
        else
            line+=", FAILED (exit $status) without saving an input; log follows"
            tail -n 40 "$log" >&2
        fi
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$crashed"
