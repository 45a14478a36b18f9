#!/usr/bin/env bash
# Checks dwd on a CUDA GPU, in two parts:
# 1. the tiny reference pipeline on cuda:0 in float32 and float16, compared with diffusers'
#    images, cold and warm, with device memory before any load, after, and after `clear`;
#    SDXL's reference run in float32 and float16 and its base-then-refiner workflow; the
#    tiny FLUX.1-dev run in bf16 with `offload: "model"`, `"sequential"` and without (images,
#    placements, device memory); and
#    dwd's computation of torch's CUDA generator (examples/torch_randn) against torch;
# 2. (unless DW_FULL_SIZE=0) a full-size SD 1.5-shaped model with random weights at
#    512x512, 20 DDIM steps, float16: dwd cold and warm with device memory before load,
#    after load and after `clear`; the UNet step alone, candle against diffusers; and the
#    same run in diffusers (needs `diffusers` importable, e.g. installed from wheels; DW_TORCH=0
#    skips the PyTorch side).
#
# Run it on the GPU machine from the repository root, with the binaries built here first:
#   scripts/build-cuda.sh && cargo build --release -p dwctl -p dwd --examples
#   mkdir -p gpu-bin && cp target/cuda/release/dwd target/cuda/release/examples/unet_step \
#       target/release/dwctl target/release/examples/make_sd15_random \
#       target/release/examples/torch_randn gpu-bin/
#   (on the GPU machine)  scripts/gpu-check.sh gpu-bin
# The machine needs the NVIDIA driver and the CUDA 13 runtime libraries, which PyTorch's
# nvidia wheels carry (found through python3). It writes a report to $OUT (or ./gpu-check).
set -uo pipefail
bin=${1:-gpu-bin}
report=${OUT:-gpu-check}/gpu-check.txt
mkdir -p "$(dirname "$report")"
exec > >(tee "$report") 2>&1

libs=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
missing=$(ldd "$bin/dwd" | grep 'not found' || true)
if [ -n "$missing" ]; then echo "missing libraries:"; echo "$missing"; exit 1; fi

dir=$(mktemp -d)
export DWD_SOCKET=$dir/dwd.sock
"$bin/dwd" --device cuda:0 --socket "$DWD_SOCKET" || { cat "$dir/dwd.log"; exit 1; }
trap '"$bin/dwctl" stop; echo "== daemon log"; tail -n 30 "$dir/dwd.log"; rm -rf "$dir"' EXIT

compare() {  # compare IMAGE REFERENCE: largest 8-bit difference
    python3 - "$1" "$2" <<'PY'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1]).convert("RGB"), dtype=np.int16)
b = np.asarray(Image.open(sys.argv[2]).convert("RGB"), dtype=np.int16)
print(f"max difference from diffusers: {int(np.abs(a - b).max())} levels")
PY
}

memory() {  # the daemon's view (the driver's used/total) and nvidia-smi's
    "$bin/dwctl" status --json > "$dir/status.json" && python3 - "$dir/status.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["memory"]
used, total = m["device_used_bytes"] or 0, m["device_total_bytes"] or 0
print(f"dwd: device {used / 2**20:.0f} MiB used of {total / 2**20:.0f} MiB; "
      f"models {m['loaded_bytes'] / 2**20:.1f} MiB; budget {m['budget_bytes'] / 2**30:.1f} GiB")
PY
    echo "nvidia-smi: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
}
echo "== device memory before any load:"; memory
for dtype in torch.float32 torch.float16; do
  for scheduler in DDIMScheduler EulerDiscreteScheduler DPMSolverMultistepScheduler; do
    sed "s/\"torch.float32\"/\"$dtype\"/" examples/tiny-sd-reference.json > "$dir/flow.json"
    sed -i "s#\.\./tests/fixtures#$PWD/tests/fixtures#g" "$dir/flow.json"
    for attempt in cold warm; do
      start=$(date +%s%N)
      "$bin/dwctl" run "$dir/flow.json" scheduler=$scheduler -o "$dir/out" --json > "$dir/run.json" || { cat "$dir/run.json"; exit 1; }
      end=$(date +%s%N)
      python3 -c "import json,sys; s=json.load(open('$dir/run.json')); print('$dtype $scheduler $attempt: wall', ($end-$start)//1000000, 'ms, load', s['timings']['load_ms'], 'ms, run', s['timings']['run_ms'], 'ms, misses', s['cache']['misses'])"
    done
    compare "$dir/out/tiny_sd_reference-main.0-0.0.png" "tests/fixtures/tiny-sd15/expected_$scheduler.png"
  done
  echo "== device memory after $dtype runs:"; memory
done
echo "== SDXL: the recorded Euler run (f32, then f16 with the VAE upcast), and base then refiner"
for dtype in torch.float32 torch.float16; do
  sed "s/\"torch.float16\"/\"$dtype\"/; s#\.\./tests/fixtures#$PWD/tests/fixtures#g" examples/tiny-sdxl-reference.json > "$dir/sdxl.json"
  "$bin/dwctl" run "$dir/sdxl.json" -o "$dir/out" --json > "$dir/run.json" || { cat "$dir/run.json"; exit 1; }
  echo "SDXL $dtype: $(compare "$dir/out/tiny_sdxl_reference-main.0-0.0.png" tests/fixtures/tiny-sdxl/expected_euler.png)"
done
sed "s#\.\./tests/fixtures#$PWD/tests/fixtures#g" examples/tiny-sdxl-refiner.json > "$dir/refiner.json"
"$bin/dwctl" run "$dir/refiner.json" -o "$dir/out" --json > "$dir/run.json" || { cat "$dir/run.json"; exit 1; }
python3 -c "import json; s=json.load(open('$dir/run.json')); print('SDXL base then refiner, f16: misses', s['cache']['misses'], 'hits', s['cache']['hits'])"
echo "== FLUX offload: the tiny FLUX.1-dev run in bf16 with offload \"model\", \"sequential\", then without"
for offload in model sequential none; do
  python3 - "$PWD" "$dir/flux.json" "$offload" <<'PY'
import json, sys
root, out, offload = sys.argv[1:]
text = open(f"{root}/examples/tiny-flux-dev.json").read().replace("../tests/fixtures", f"{root}/tests/fixtures")
flow = json.loads(text)
config = flow["steps"][0]["pipeline"]["configuration"]
if offload == "none":
    config.pop("offload", None)
else:
    config["offload"] = offload
json.dump(flow, open(out, "w"))
PY
  "$bin/dwctl" clear > /dev/null
  "$bin/dwctl" run "$dir/flux.json" -o "$dir/out" --json > "$dir/run.json" || { cat "$dir/run.json"; exit 1; }
  echo "offload $offload: $(compare "$dir/out/tiny_flux_dev-txt2img.0-0.0.png" tests/fixtures/tiny-flux/expected_flux.png)"
  echo "placements logged so far: $(grep -c 'dwd::placement' "$dir/dwd.log")"; memory
done
echo "== torch's CUDA generator: dwd's host computation against torch on this GPU"
geometry=$(python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.multi_processor_count}x{p.max_threads_per_multi_processor}')")
for case in "42 10 1" "1234567890 65536 2" "7 1000000 2"; do
  set -- $case
  "$bin/torch_randn" "$1" "$2" "cuda:$geometry" "$3" > "$dir/ours.jsonl"
  python3 - "$dir/ours.jsonl" "$1" "$2" "$3" <<'PY'
import json, sys, torch
ours = [json.loads(line) for line in open(sys.argv[1])]
seed, count, draws = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator("cuda").manual_seed(seed)
for i in range(draws):
    offset = g.get_offset()
    theirs = torch.randn(count, generator=g, device="cuda").cpu()
    mine = torch.tensor(ours[i]["values"])
    print(f"seed {seed}, {count} elements, draw {i}: offset {ours[i]['offset']} vs torch {offset}, "
          f"max difference {float((mine - theirs).abs().max()):.2e}")
PY
done
"$bin/dwctl" status
"$bin/dwctl" clear
echo "== device memory after clear:"; memory
# A second load and clear: what the weights take and give back, once CUDA's first-use
# costs (kernel modules, cuBLAS workspace) are paid.
sed "s#\.\./tests/fixtures#$PWD/tests/fixtures#g" examples/tiny-sd-reference.json > "$dir/flow.json"
"$bin/dwctl" run "$dir/flow.json" -o "$dir/out" --json > /dev/null
echo "== device memory after loading again:"; memory
"$bin/dwctl" clear
echo "== device memory after the second clear:"; memory

[ "${DW_FULL_SIZE:-1}" = 1 ] || exit 0
echo "== full-size SD 1.5-shaped model, random weights (made here)"
model=$dir/sd15-random
start=$(date +%s)
"$bin/make_sd15_random" "$model" > /dev/null || exit 1
echo "made in $(( $(date +%s) - start )) s: $(du -sh "$model" | cut -f1)"
cat > "$dir/full.json" <<JSON
{"id": "sd15_random", "seed": 1, "steps": [{"name": "main", "pipeline": {
  "configuration": {"component_type": "StableDiffusionPipeline"},
  "from_pretrained_arguments": {"model_name": "$model", "torch_dtype": "torch.float16"},
  "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}},
  "arguments": {"prompt": "a fox", "num_inference_steps": 20, "height": 512, "width": 512}}}]}
JSON
used() { "$bin/dwctl" status --json | python3 -c "import json,sys; print(json.load(sys.stdin)['memory']['device_used_bytes'] // 2**20)"; }
before=$(used); echo "device memory before load: $before MiB"
for attempt in cold warm warm warm; do
  start=$(date +%s%N)
  "$bin/dwctl" run "$dir/full.json" -o "$dir/out" --json --quiet > "$dir/run.json" || { cat "$dir/run.json"; exit 1; }
  end=$(date +%s%N)
  python3 -c "import json; s=json.load(open('$dir/run.json')); t=s['timings']; print('dwd f16 512x512 20 steps $attempt: wall', ($end-$start)//1000000, 'ms, load', t['load_ms'], 'ms, run', t['run_ms'], 'ms')"
  [ "$attempt" = cold ] && echo "device memory after load: $(used) MiB"
done
"$bin/dwctl" clear
after=$(used)
echo "device memory after clear: $after MiB (before load: $before MiB; difference $((after - before)) MiB, goal at most 64)"
"$bin/dwctl" stop
echo "== one UNet step, batch 2, 64x64 latents, f16: candle, then diffusers"
"$bin/unet_step" "$model" 64 10 f16 cuda | tail -n 1
[ "${DW_TORCH:-1}" = 1 ] || exit 0
python3 scripts/unet_step_torch.py "$model" 64 10 f16 cuda | tail -n 1
echo "== the same run in diffusers (DDIM, 512x512, 20 steps, f16)"
python3 scripts/pipeline_torch.py "$model" 512 20 f16 cuda 3
