#!/usr/bin/env bash
# Cold and warm runs of a full-size SD 1.5-shaped model (random weights), through the daemon
# and in-process, side by side, with the daemon's peak RSS.
#
# Usage: scripts/bench-full-size.sh [SIZE] [STEPS] [WARM_RUNS] [COLD_RUNS]   (default 256 2 3 3)
# Makes the model once with examples/make_sd15_random.rs into target/bench-models (4.3 GB).
# The daemon's own accounting gives its cost: wall time minus `timings.run_ms`.
# Cold runs start from a fresh daemon (and a fresh process in-process); the page cache is
# dropped first where this machine allows it.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-256}
steps=${2:-2}
warm=${3:-3}
cold_runs=${4:-3}
cargo build --release --quiet
cargo build --release --quiet -p dwd --examples
model=$PWD/target/bench-models/sd15-random
[ -f "$model/unet/diffusion_pytorch_model.safetensors" ] || target/release/examples/make_sd15_random "$model"

dir=$(mktemp -d)
export DWD_SOCKET="$dir/dwd.sock"
trap 'target/release/dwctl stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
cat > "$dir/flow.json" <<JSON
{"id": "sd15_random", "seed": 1, "steps": [{"name": "main", "pipeline": {
  "configuration": {"component_type": "StableDiffusionPipeline"},
  "from_pretrained_arguments": {"model_name": "$model"},
  "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}},
  "arguments": {"prompt": "a fox", "num_inference_steps": $steps, "height": $size, "width": $size}}}]}
JSON
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "(page cache dropped)" || echo "(page cache kept: not allowed here)"; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; model: SD 1.5 shapes, f32, random; ${size}x${size}, $steps DDIM steps"
echo "== through dwd"
drop_caches
for i in $(seq 0 "$warm"); do
    start=$(date +%s%N)
    target/release/dwctl run "$dir/flow.json" -o "$dir/out" --json --quiet > "$dir/run.json"
    end=$(date +%s%N)
    python3 - "$dir/run.json" "$(( (end - start) / 1000000 ))" "$i" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); wall = int(sys.argv[2]); t = s["timings"]
kind = "cold" if sys.argv[3] == "0" else "warm"
print(f"{kind}: wall_ms={wall} load_ms={t['load_ms']} run_ms={t['run_ms']} daemon_overhead_ms={wall - t['run_ms']} misses={s['cache']['misses']}")
PY
done
pid=$(cat "$dir/dwd.lock")
echo "dwd peak RSS: $(awk '/VmHWM/ {printf "%.2f GiB", $2 / 1048576}' /proc/$pid/status)"
target/release/dwctl stop > /dev/null
echo "== in-process (no daemon)"
drop_caches
if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "in-process peak RSS: %M KiB" target/release/examples/in_process "$model" "$size" "$steps" "$warm"
else
    target/release/examples/in_process "$model" "$size" "$steps" "$warm"
    echo "(install GNU time for the in-process peak RSS)"
fi

# One cold sample says little on a VM where touching fresh memory costs seconds: repeat
# the cold run, alternating daemon and in-process, page cache dropped before each.
echo "== cold runs, alternating ($cold_runs each; wall from start to exit)"
for i in $(seq 1 "$cold_runs"); do
    drop_caches > /dev/null
    start=$(date +%s%N)
    target/release/dwctl run "$dir/flow.json" -o "$dir/out" --json --quiet > "$dir/run.json"
    end=$(date +%s%N)
    echo "dwd cold $i: wall_ms=$(( (end - start) / 1000000 ))"
    target/release/dwctl stop > /dev/null
    drop_caches > /dev/null
    start=$(date +%s%N)
    target/release/examples/in_process "$model" "$size" "$steps" 0 > /dev/null
    end=$(date +%s%N)
    echo "in-process cold $i: wall_ms=$(( (end - start) / 1000000 ))"
done
