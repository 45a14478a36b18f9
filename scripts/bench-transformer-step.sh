#!/usr/bin/env bash
# Per-step time, load time and peak memory of a flow-matching transformer: candle (dwd's
# FluxTransformer or Sd3Transformer) against diffusers on the same random weights, side by
# side in one invocation.
#
# Usage: scripts/bench-transformer-step.sh flux|sd3 [IMAGE_SIZES] [STEPS]
#   flux: FLUX.1-dev's real widths (3072 wide, 24 heads, T5 states of 4096, guidance
#         embedder), 2 double-stream and 4 single-stream blocks (1.3B parameters, 2.6 GB in
#         bfloat16); batch 1, 512 T5 tokens; sizes default to "512 1024" (1024 and 4096
#         image tokens). Made by examples/make_flux_random.rs.
#   sd3:  SD 3.5 medium's real widths (1536 wide, 24 heads, qk_norm, T5 states of 4096,
#         pooled 2048, the 384x384 position table), 4 joint blocks, the first 2 with dual
#         attention; batch 2 (classifier-free guidance), 77 + 256 text tokens; size
#         defaults to 1024 (4096 patches). Made by examples/make_sd3_random.rs.
#   Weights are stored in bfloat16 under target/bench-models/ once and loaded as float32.
#   STEPS defaults to 2; warm steps are every step after the first, medians reported.
# Env: DW_TORCH_PYTHON  a python with torch and diffusers (default python3); without them
#                       the PyTorch column is skipped with a message. Nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
family=${1:?usage: scripts/bench-transformer-step.sh flux|sd3 [IMAGE_SIZES] [STEPS]}
case $family in
    flux) default_sizes="512 1024" ;;
    sd3) default_sizes="1024" ;;
    *) echo "unknown family $family: flux or sd3" >&2; exit 2 ;;
esac
sizes=${2:-$default_sizes}
steps=${3:-2}
model=$PWD/target/bench-models/$family-random
python=${DW_TORCH_PYTHON:-python3}
cargo build --release --quiet -p dwd --examples
weights=$model/transformer/diffusion_pytorch_model.safetensors
[ -f "$weights" ] || "target/release/examples/make_${family}_random" "$model"

have_torch=yes
if ! "$python" -c "import torch, diffusers" 2>/dev/null; then
    have_torch=
    echo "PyTorch comparison skipped: $python cannot import torch and diffusers (set DW_TORCH_PYTHON)"
fi
results=$(mktemp)
trap 'rm -f "$results"' EXIT

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# Reading the file with a warm page cache: the floor for loading it.
cat "$weights" > /dev/null
start=$(date +%s%N); cat "$weights" > /dev/null; end=$(date +%s%N)
echo "read $(du -h "$weights" | cut -f1) of transformer weights from the page cache: $(( (end - start) / 1000000 )) ms"
for size in $sizes; do
    echo "== $family, ${size}x${size} image, $steps steps"
    "target/release/examples/${family}_step" "$model" "$size" "$steps" | tee -a "$results"
    if [ -n "$have_torch" ]; then
        "$python" scripts/transformer_step_torch.py "$family" "$model" "$size" "$steps" | tee -a "$results"
    fi
done
echo "== summary"
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"engine"')]
gib = 2**30
print(f"{'engine':38} {'image':>5} {'load':>8} {'first step':>11} {'warm step':>10} {'peak RSS':>9} {'RSS/weights':>11}")
for r in rows:
    print(f"{r['engine'][:38]:38} {r['image_size']:>5} {r['load_ms']:>6} ms {r['first_step_ms']:>8.0f} ms "
          f"{r['warm_step_median_ms']:>7.0f} ms {r['peak_rss'] / gib:>7.2f} G {r['peak_rss'] / r['weights_bytes']:>10.2f}x")
for size in sorted({r["image_size"] for r in rows}):
    pair = {r["engine"].split()[0]: r for r in rows if r["image_size"] == size}
    if "candle" in pair and "torch" in pair:
        ratio = pair["candle"]["warm_step_median_ms"] / pair["torch"]["warm_step_median_ms"]
        print(f"{size}x{size}: candle/PyTorch per warm step = {ratio:.2f}x (goal <= 0.8x)")
PY
