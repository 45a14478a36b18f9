#!/usr/bin/env bash
# Per-UNet-step time, load time and peak memory: candle (dwd's UNet) against diffusers on
# the same full-size random weights, side by side in one invocation.
#
# Usage: scripts/bench-unet-step.sh [LATENT_SIZES] [STEPS]   (default "32 64" 4; SDXL "64 128" 2)
#   32x32 latents are a 256x256 image, 64x64 a 512x512 one, 128x128 a 1024x1024 one;
#   batch 2 (classifier-free guidance). Warm steps are every step after the first; medians
#   reported.
# Env: DW_BENCH_MODEL   sd15 (default: SD 1.5's UNet, made by examples/make_sd15_random.rs)
#                       or sdxl (SDXL base's UNet, 2.6B parameters, stored in f16, made by
#                       examples/make_sdxl_unet_random.rs), into target/bench-models once.
#      DW_TORCH_PYTHON  a python with torch and diffusers (default python3); without them
#                       the PyTorch column is skipped with a message. Nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${DW_BENCH_MODEL:-sd15}
case "$kind" in
    sd15) sizes=${1:-32 64}; steps=${2:-4}; maker=make_sd15_random; model=$PWD/target/bench-models/sd15-random ;;
    sdxl) sizes=${1:-64 128}; steps=${2:-2}; maker=make_sdxl_unet_random; model=$PWD/target/bench-models/sdxl-unet ;;
    *) echo "DW_BENCH_MODEL must be sd15 or sdxl, not $kind" >&2; exit 2 ;;
esac
python=${DW_TORCH_PYTHON:-python3}
cargo build --release --quiet -p dwd --examples
unet=$model/unet/diffusion_pytorch_model.safetensors
[ -f "$unet" ] || "target/release/examples/$maker" "$model"

have_torch=yes
if ! "$python" -c "import torch, diffusers" 2>/dev/null; then
    have_torch=
    echo "PyTorch comparison skipped: $python cannot import torch and diffusers (set DW_TORCH_PYTHON)"
fi
results=$(mktemp)
trap 'rm -f "$results"' EXIT

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# Reading the file with a warm page cache: the floor for loading it.
cat "$unet" > /dev/null
start=$(date +%s%N); cat "$unet" > /dev/null; end=$(date +%s%N)
echo "read $(du -h "$unet" | cut -f1) of UNet weights from the page cache: $(( (end - start) / 1000000 )) ms"
for size in $sizes; do
    echo "== latents ${size}x${size} (a $((size * 8))x$((size * 8)) image), batch 2, $steps steps"
    target/release/examples/unet_step "$model" "$size" "$steps" | tee -a "$results"
    if [ -n "$have_torch" ]; then
        "$python" scripts/unet_step_torch.py "$model" "$size" "$steps" | tee -a "$results"
    fi
done
echo "== summary"
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"engine"')]
gib = 2**30
print(f"{'engine':38} {'latents':>7} {'load':>8} {'first step':>11} {'warm step':>10} {'peak RSS':>9} {'RSS/weights':>11}")
for r in rows:
    print(f"{r['engine'][:38]:38} {r['latent_size']:>7} {r['load_ms']:>6} ms {r['first_step_ms']:>8.0f} ms "
          f"{r['warm_step_median_ms']:>7.0f} ms {r['peak_rss'] / gib:>7.2f} G {r['peak_rss'] / r['weights_bytes']:>10.2f}x")
for size in sorted({r["latent_size"] for r in rows}):
    pair = {r["engine"].split()[0]: r for r in rows if r["latent_size"] == size}
    if "candle" in pair and "torch" in pair:
        ratio = pair["candle"]["warm_step_median_ms"] / pair["torch"]["warm_step_median_ms"]
        print(f"latents {size}: candle/PyTorch per warm step = {ratio:.2f}x")
PY
