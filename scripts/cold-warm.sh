#!/usr/bin/env bash
# Cold and warm `dwctl run` of the bundled tiny workflow on a private daemon.
#
# Usage: scripts/cold-warm.sh [WARM_RUNS]   (default 10)
# Builds the release binaries, then: one cold run (the daemon starts and loads), WARM_RUNS
# warm runs with a different prompt each time, and prints each run's wall time and the
# daemon's own timings (load_ms, run_ms) with the medians of the warm runs.
set -euo pipefail
cd "$(dirname "$0")/.."
warm_runs=${1:-10}
cargo build --release --quiet
dir=$(mktemp -d)
export DWD_SOCKET="$dir/dwd.sock"
trap 'target/release/dwctl stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

run() {
    local start end
    start=$(date +%s%N)
    target/release/dwctl run examples/tiny-sd.json "prompt=$1" -o "$dir/out" --json > "$dir/last.json"
    end=$(date +%s%N)
    python3 - "$dir/last.json" "$(( (end - start) / 1000000 ))" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t, c = s["timings"], s["cache"]
print(f'{sys.argv[3]:5} wall_ms={sys.argv[2]:>5} load_ms={t["load_ms"]:>5} run_ms={t["run_ms"]:>5} '
      f'misses={c["misses"]} hits={c["hits"]}')
PY
}

echo "machine: $(nproc) cores, $(uname -m); tiny SD 1.5 fixture, 64x64, 4 DDIM steps"
run "a red fox" cold | tee "$dir/cold.txt"
for i in $(seq 1 "$warm_runs"); do
    run "a fox number $i" warm
done | tee "$dir/warm.txt"
python3 - "$dir/warm.txt" <<'PY'
import re, statistics, sys
rows = [dict(re.findall(r"(\w+)=\s*(\d+)", line)) for line in open(sys.argv[1])]
for key in ("wall_ms", "run_ms"):
    values = sorted(int(r[key]) for r in rows)
    print(f"warm median {key}: {statistics.median(values)} (range {values[0]}-{values[-1]}, n={len(values)})")
PY
