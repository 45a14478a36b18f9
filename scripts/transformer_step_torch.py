"""One FLUX or SD3 transformer step in diffusers, timed: the PyTorch side of
scripts/bench-transformer-step.sh.

Loads only the transformer of a diffusers pipeline folder and runs its forward pass with
the same fixed inputs as dwd's `examples/flux_step.rs` (FLUX: batch 1, 512 T5 tokens, the
pooled CLIP embedding, the packed latents of a square image, timestep 1.0, guidance 3.5)
or `examples/sd3_step.rs` (SD3: batch 2 for classifier-free guidance, 77 + 256 text
tokens, the pooled embedding, the latents of a square image, timestep 1000), printing the
same JSON lines.

Usage: python transformer_step_torch.py flux|sd3 MODEL_DIR IMAGE_SIZE STEPS [f32|bf16] [cpu|cuda]
"""

import json
import resource
import sys
import time

import torch

# Pixels per side of one packed token or patch: 8 per latent, 2x2 latents per token.
PIXELS_PER_TOKEN = 16


def ramp(shape, dtype, device):
    """Values in [-1, 1) that vary along every axis, as the examples' `ramp`."""
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int64)
    values = ((index * 7919) % 2000).to(torch.float32) / 1000.0 - 1.0
    return values.reshape(shape).to(device=device, dtype=dtype)


def image_ids(side, device):
    """[0, row, column] of every token of the packed grid, row by row, as the pipeline's
    _prepare_latent_image_ids makes them."""
    rows = torch.arange(side).repeat_interleave(side)
    columns = torch.arange(side).repeat(side)
    ids = torch.stack([torch.zeros(side * side, dtype=torch.int64), rows, columns], dim=1)
    return ids.to(device=device, dtype=torch.float32)


def flux(model, image_size, dtype, device):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(f"{model}/transformer", torch_dtype=dtype)
    config = transformer.config
    side = image_size // PIXELS_PER_TOKEN
    text_tokens = 512
    inputs = lambda: {
        "hidden_states": ramp([1, side * side, config.in_channels], dtype, device),
        "encoder_hidden_states": ramp([1, text_tokens, config.joint_attention_dim], dtype, device),
        "pooled_projections": ramp([1, config.pooled_projection_dim], dtype, device),
        # The pipeline passes the timestep divided by 1000 and the guidance scale as is;
        # the model multiplies both by 1000.
        "timestep": torch.full([1], 1.0, dtype=dtype, device=device),
        "guidance": torch.full([1], 3.5, dtype=dtype, device=device) if config.guidance_embeds else None,
        "txt_ids": torch.zeros(text_tokens, 3, dtype=torch.float32, device=device),
        "img_ids": image_ids(side, device),
    }
    return transformer, inputs


def sd3(model, image_size, dtype, device):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(f"{model}/transformer", torch_dtype=dtype)
    config = transformer.config
    side = image_size // 8
    batch, text_tokens = 2, 77 + 256
    inputs = lambda: {
        "hidden_states": ramp([batch, config.in_channels, side, side], dtype, device),
        "encoder_hidden_states": ramp([batch, text_tokens, config.joint_attention_dim], dtype, device),
        "pooled_projections": ramp([batch, config.pooled_projection_dim], dtype, device),
        "timestep": torch.full([batch], 1000.0, dtype=dtype, device=device),
    }
    return transformer, inputs


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("flux", "sd3"):
        sys.exit(__doc__)
    family, model, image_size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if image_size <= 0 or image_size % PIXELS_PER_TOKEN:
        sys.exit(f"IMAGE_SIZE must be a positive multiple of {PIXELS_PER_TOKEN}")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[5] if len(sys.argv) > 5 else "f32"]
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    started = time.perf_counter()
    transformer, make_inputs = {"flux": flux, "sd3": sd3}[family](model, image_size, dtype, device)
    transformer = transformer.to(device).eval()
    sync()
    load_ms = (time.perf_counter() - started) * 1e3
    rss_after_load = peak_rss_bytes()

    inputs = make_inputs()
    step_ms = []
    with torch.inference_mode():
        for step in range(steps):
            started = time.perf_counter()
            output = transformer(**inputs, return_dict=False)[0]
            sync()
            ms = (time.perf_counter() - started) * 1e3
            if not torch.isfinite(output).all():
                sys.exit("the transformer's output is not finite")
            del output
            print(json.dumps({"step": step, "ms": round(ms, 1)}), flush=True)
            step_ms.append(ms)
    warm = sorted(step_ms[1:])
    median = warm[len(warm) // 2] if warm else float("nan")
    weights = sum(p.numel() * p.element_size() for p in transformer.parameters())
    weights += sum(b.numel() * b.element_size() for b in transformer.buffers())
    print(json.dumps({
        "engine": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "image_size": image_size,
        "load_ms": round(load_ms),
        "first_step_ms": round(step_ms[0], 1),
        "warm_step_median_ms": round(median, 1),
        "peak_rss_after_load": rss_after_load,
        "peak_rss": peak_rss_bytes(),
        "weights_bytes": weights,
    }), flush=True)


if __name__ == "__main__":
    main()
