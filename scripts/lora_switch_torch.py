"""diffusers' side of scripts/bench-lora-switch.sh: the same model, LoRA files and runs, with
LoRAs applied as diffusers-workflow applies them (load_lora_weights per LoRA, then
set_adapters), timing each switch and each run on one loaded pipeline.

Usage: python lora_switch_torch.py MODEL_DIR LORAS_DIR SIZE STEPS
"""

import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    model, loras, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    loaded = set()

    def run(label, adapters):
        start = time.perf_counter()
        if adapters:
            for name, _ in adapters:
                if name not in loaded:
                    pipe.load_lora_weights(f"{loras}/{name}", adapter_name=name)
                    loaded.add(name)
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
        elif loaded:
            pipe.disable_lora()
        switched = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(1)
        pipe("a fox", num_inference_steps=steps, height=size, width=size, generator=generator)
        if not adapters and loaded:
            pipe.enable_lora()
        end = time.perf_counter()
        print(f"{label:34} wall {(end - start) * 1e3:6.0f} ms  switch {(switched - start) * 1e3:5.0f} ms  "
              f"run {(end - switched) * 1e3:6.0f} ms", flush=True)

    run("base", [])
    run("base, warm", [])
    run("A at 1.0 (loads A)", [("a", 1.0)])
    run("A at 0.5", [("a", 0.5)])
    run("B at 1.0 (loads B)", [("b", 1.0)])
    run("A 0.7 + B 0.4", [("a", 0.7), ("b", 0.4)])
    run("base again", [])


if __name__ == "__main__":
    main()
