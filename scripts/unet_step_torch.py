"""One UNet step in diffusers, timed: the PyTorch side of scripts/bench-unet-step.sh.

Loads only the UNet of a diffusers pipeline folder and runs its forward pass on batch 2
with the same fixed inputs as dwd's `examples/unet_step.rs`, printing the same JSON lines.

Usage: python unet_step_torch.py MODEL_DIR LATENT_SIZE STEPS [f32|f16] [cpu|cuda]
"""

import json
import resource
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def ramp(shape, dtype, device):
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int64)
    values = ((index * 7919) % 2000).to(torch.float32) / 1000.0 - 1.0
    return values.reshape(shape).to(device=device, dtype=dtype)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    model, latent_size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = {"f32": torch.float32, "f16": torch.float16}[sys.argv[4] if len(sys.argv) > 4 else "f32"]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    started = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(f"{model}/unet", torch_dtype=dtype).to(device)
    unet.eval()
    sync()
    load_ms = (time.perf_counter() - started) * 1e3
    rss_after_load = peak_rss_bytes()

    latents = ramp([2, unet.config.in_channels, latent_size, latent_size], dtype, device)
    context = ramp([2, 77, unet.config.cross_attention_dim], dtype, device)
    # An SDXL UNet also takes the pooled text embedding and six time ids per row, as
    # dwd's unet_step passes them.
    added = None
    if unet.config.addition_embed_type == "text_time":
        time_dim = unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
        side = float(latent_size * 8)
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2, device=device)
        added = {"text_embeds": ramp([2, pooled], dtype, device), "time_ids": time_ids}
    step_ms = []
    with torch.inference_mode():
        for step in range(steps):
            started = time.perf_counter()
            noise = unet(latents, 999 - step, encoder_hidden_states=context,
                         added_cond_kwargs=added).sample
            sync()
            ms = (time.perf_counter() - started) * 1e3
            del noise
            print(json.dumps({"step": step, "ms": round(ms, 1)}), flush=True)
            step_ms.append(ms)
    warm = sorted(step_ms[1:])
    median = warm[len(warm) // 2] if warm else float("nan")
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(json.dumps({
        "engine": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "latent_size": latent_size,
        "load_ms": round(load_ms),
        "first_step_ms": round(step_ms[0], 1),
        "warm_step_median_ms": round(median, 1),
        "peak_rss_after_load": rss_after_load,
        "peak_rss": peak_rss_bytes(),
        "weights_bytes": weights,
    }), flush=True)


if __name__ == "__main__":
    main()
