#!/usr/bin/env bash
# Every CPU benchmark behind BENCHMARKS.md, one after the other, in one command:
# tiny cold/warm, the output handoff, the full-size model through dwd and in-process
# (warm and repeated cold), one UNet step against PyTorch (when DW_TORCH_PYTHON or
# python3 has torch and diffusers), one FLUX and one SD 3 transformer step at real widths
# against PyTorch (likewise) and the 200-run memory curve. About 25 minutes on 2 cores. The GPU part is scripts/gpu-check.sh, run on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "### tiny model, cold and warm"; scripts/cold-warm.sh 10
echo "### output handoff"; cargo bench --quiet -p protocol --bench handoff
echo "### full-size model, through dwd and in-process"; scripts/bench-full-size.sh 256 2 3 3
echo "### one UNet step against PyTorch"; scripts/bench-unet-step.sh "32 64" 4
echo "### one FLUX transformer step against PyTorch"; scripts/bench-transformer-step.sh flux "512 1024" 2
echo "### one SD 3 transformer step against PyTorch"; scripts/bench-transformer-step.sh sd3 1024 2
echo "### switching LoRAs on a warm model"; scripts/bench-lora-switch.sh 256 2 32
echo "### resident memory over 200 warm runs"; scripts/memory-curve.sh 200
