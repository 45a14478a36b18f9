#!/usr/bin/env bash
# What changing LoRAs costs on a warm full-size SD 1.5-shaped model, through dwd: a base
# run, a first run with LoRA A (loads A), A at another weight (loads nothing), LoRA B
# (loads B), A and B together, and the base again; with, where a python with torch and
# diffusers is given, diffusers' load_lora_weights + set_adapters on the same model and
# files in the same invocation.
#
# Usage: scripts/bench-lora-switch.sh [SIZE] [STEPS] [RANK]   (default 256 2 32)
# Makes the model once with examples/make_sd15_random.rs (4.3 GB) and two random LoRAs of
# RANK on every attention projection of the UNet and text encoder with
# examples/make_lora_random.rs, under target/bench-models.
# Env: DW_TORCH_PYTHON  a python with torch, diffusers and peft (default python3); without
#                       them the diffusers column is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-256}
steps=${2:-2}
rank=${3:-32}
python=${DW_TORCH_PYTHON:-python3}
cargo build --release --quiet
cargo build --release --quiet -p dwd --examples
model=$PWD/target/bench-models/sd15-random
loras=$PWD/target/bench-models/sd15-loras-r$rank
[ -f "$model/unet/diffusion_pytorch_model.safetensors" ] || target/release/examples/make_sd15_random "$model"
for name in a b; do
    file=$loras/$name/pytorch_lora_weights.safetensors
    seed=$([ "$name" = a ] && echo 1 || echo 2)
    [ -f "$file" ] || target/release/examples/make_lora_random "$model" "$file" "$rank" "$seed"
done

dir=$(mktemp -d)
export DWD_SOCKET="$dir/dwd.sock"
trap 'target/release/dwctl stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
# One workflow; each run's `loras` list is given by the variable-free file written below.
write_flow() {
    cat > "$dir/flow.json" <<JSON
{"id": "sd15_lora", "seed": 1, "steps": [{"name": "main", "pipeline": {
  "configuration": {"component_type": "StableDiffusionPipeline"},
  "from_pretrained_arguments": {"model_name": "$model"},
  "loras": $1,
  "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}},
  "arguments": {"prompt": "a fox", "num_inference_steps": $steps, "height": $size, "width": $size}}}]}
JSON
}
a="{\"model_name\": \"$loras/a\", \"adapter_name\": \"a\""
b="{\"model_name\": \"$loras/b\", \"adapter_name\": \"b\""
run() {
    write_flow "$2"
    start=$(date +%s%N)
    target/release/dwctl run "$dir/flow.json" -o "$dir/out" --json --quiet > "$dir/run.json"
    end=$(date +%s%N)
    python3 - "$dir/run.json" "$(( (end - start) / 1000000 ))" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); wall = int(sys.argv[2]); t = s["timings"]
print(f"{sys.argv[3]:34} wall {wall:6} ms  load {t['load_ms']:5} ms  run {t['run_ms']:6} ms  loaded {s['cache']['misses']}")
PY
}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; SD 1.5 shapes, f32, ${size}x${size}, $steps DDIM steps; LoRAs of rank $rank ($(du -h "$loras/a/pytorch_lora_weights.safetensors" | cut -f1) each)"
echo "== through dwd"
run "base (cold: loads the model)" "[]"
run "base, warm" "[]"
run "A at 1.0 (loads A)" "[$a, \"scale\": 1.0}]"
run "A at 0.5 (loads nothing)" "[$a, \"scale\": 0.5}]"
run "B at 1.0 (loads B)" "[$b, \"scale\": 1.0}]"
run "A 0.7 + B 0.4 (loads nothing)" "[$a, \"scale\": 0.7}, $b, \"scale\": 0.4}]"
run "base again" "[]"
if "$python" -c "import torch, diffusers, peft" 2>/dev/null; then
    echo "== diffusers: load_lora_weights + set_adapters on a loaded pipeline"
    "$python" scripts/lora_switch_torch.py "$model" "$loras" "$size" "$steps"
else
    echo "diffusers comparison skipped: $python cannot import torch, diffusers and peft (set DW_TORCH_PYTHON)"
fi
