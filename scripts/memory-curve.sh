#!/usr/bin/env bash
# The daemon's resident memory over many warm runs of the tiny workflow: it must stay flat.
#
# Usage: scripts/memory-curve.sh [RUNS]   (default 200)
# Prints RSS after every 10th run, then the growth from around the 10th run to the end
# (median of runs 6-15 against the median of the last 10), and fails if it is over 2%.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200}
cargo build --release --quiet
dir=$(mktemp -d)
export DWD_SOCKET="$dir/dwd.sock"
trap 'target/release/dwctl stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
: > "$dir/rss"
for i in $(seq 1 "$runs"); do
    target/release/dwctl run examples/tiny-sd.json "prompt=a fox number $i" -o "$dir/out" --json > /dev/null
    target/release/dwctl status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["memory"]["rss_bytes"])' >> "$dir/rss"
done
python3 - "$dir/rss" <<'PY'
import statistics, sys
rss = [int(line) for line in open(sys.argv[1])]
for i in range(9, len(rss), 10):
    print(f"run {i + 1:4}: RSS {rss[i] / 2**20:7.2f} MiB")
tenth = statistics.median(rss[5:15])
last = statistics.median(rss[-10:])
growth = (last - tenth) / tenth
print(f"median around the 10th run {tenth / 2**20:.2f} MiB, last 10 runs {last / 2**20:.2f} MiB: {growth * 100:+.2f}%")
sys.exit(0 if growth <= 0.02 else 1)
PY
