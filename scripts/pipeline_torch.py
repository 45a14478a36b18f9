"""A whole text-to-image run in diffusers, timed: the PyTorch side of scripts/gpu-check.sh.

Loads a diffusers Stable Diffusion folder, switches it to DDIM (as dwd's benchmark workflow
does) and generates one image per run, printing one JSON line per run: the first includes
the load.

Usage: python pipeline_torch.py MODEL_DIR SIZE STEPS [f32|f16] [cpu|cuda] [WARM_RUNS]
"""

import json
import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    model, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = {"f32": torch.float32, "f16": torch.float16}[sys.argv[4] if len(sys.argv) > 4 else "f32"]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    warm_runs = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_ms = (time.perf_counter() - started) * 1e3
    for run in range(warm_runs + 1):
        generator = torch.Generator(device="cpu").manual_seed(1)
        started = time.perf_counter()
        pipe("a fox", height=size, width=size, num_inference_steps=steps, generator=generator,
             output_type="np")
        sync()
        run_ms = (time.perf_counter() - started) * 1e3
        print(json.dumps({
            "engine": f"diffusers (torch {torch.__version__})",
            "kind": "cold" if run == 0 else "warm",
            "load_ms": round(load_ms) if run == 0 else 0,
            "run_ms": round(run_ms),
        }), flush=True)
    if device == "cuda":
        print(json.dumps({"peak_device_allocated_mib": torch.cuda.max_memory_allocated() // 2**20}))


if __name__ == "__main__":
    main()
