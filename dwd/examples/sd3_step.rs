//! One SD3 transformer step, timed: the per-step figure compared with diffusers in
//! `scripts/bench-transformer-step.sh`. Loads only the transformer of a pipeline folder,
//! then runs its forward pass as the pipeline's classifier-free guidance does, on batch 2
//! (negative and positive prompt), with fixed inputs: 77 CLIP + 256 T5 tokens (SD 3's
//! default `max_sequence_length`), the pooled CLIP-L ⊕ CLIP-G embedding, the latents of
//! a square image and timestep 1000 (the first step's).
//!
//! Usage: sd3_step MODEL_DIR IMAGE_SIZE STEPS [f32|f16|bf16] [cpu|cuda]
//! (IMAGE_SIZE in pixels, a multiple of 16: a 1024x1024 image is 128x128 latents, 64x64 =
//! 4096 patches of 2x2). Prints one JSON line per step, then a summary with the load time
//! and peak RSS.

mod common;

use std::time::Instant;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use common::{check_finite, median, ramp, TimingArgs};
use dwd::memory::peak_resident_set_bytes;
use dwd::pipelines::stable_diffusion_3::{Sd3Inputs, Sd3Transformer};

/// CLIP's 77 tokens followed by T5's 256.
const TEXT_TOKENS: usize = 77 + 256;
/// Negative and positive prompt, as classifier-free guidance batches them.
const BATCH: usize = 2;
/// Pixels per side of one patch: 8 per latent, 2x2 latents per patch.
const PIXELS_PER_PATCH: usize = 16;
/// Pixels per latent.
const PIXELS_PER_LATENT: usize = 8;

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    // `TimingArgs` calls the second argument a latent size; here it is the image's.
    let TimingArgs {
        model,
        latent_size: image_size,
        count: steps,
        dtype,
        device,
    } = TimingArgs::parse("usage: sd3_step MODEL_DIR IMAGE_SIZE STEPS [f32|f16|bf16] [cpu|cuda]")?;
    if image_size == 0 || !image_size.is_multiple_of(PIXELS_PER_PATCH) {
        bail!("IMAGE_SIZE must be a positive multiple of {PIXELS_PER_PATCH}, not {image_size}");
    }

    let started = Instant::now();
    let transformer = Sd3Transformer::load(&model.join("transformer"), dtype, &device)?;
    device.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_after_load = peak_resident_set_bytes();

    let [hidden_states, encoder_hidden_states, pooled_projections] =
        fixed_inputs(&transformer, image_size / PIXELS_PER_LATENT, dtype, &device)?;
    let timesteps = [1000.0; BATCH];
    let mut step_ms = Vec::with_capacity(steps);
    for step in 0..steps {
        let started = Instant::now();
        let velocity = transformer.forward(&Sd3Inputs {
            hidden_states: &hidden_states,
            encoder_hidden_states: &encoder_hidden_states,
            pooled_projections: &pooled_projections,
            timesteps: &timesteps,
            skip_layers: &[],
        })?;
        device.synchronize()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        check_finite(&velocity)?;
        println!("{{\"step\": {step}, \"ms\": {ms:.1}}}");
        step_ms.push(ms);
    }
    let median = median(step_ms.get(1..).unwrap_or(&[]));
    println!(
        "{{\"engine\": \"candle\", \"image_size\": {image_size}, \"load_ms\": {load_ms:.0}, \
         \"first_step_ms\": {:.1}, \"warm_step_median_ms\": {median:.1}, \
         \"peak_rss_after_load\": {rss_after_load}, \"peak_rss\": {}, \"weights_bytes\": {}}}",
        step_ms.first().copied().unwrap_or(f64::NAN),
        peak_resident_set_bytes(),
        transformer.bytes()
    );
    Ok(())
}

/// Reproducible latents, text states and pooled embeddings for a square latent grid of
/// `side` x `side`: what matters here is the shapes. `scripts/transformer_step_torch.py`
/// makes the same ones.
fn fixed_inputs(
    transformer: &Sd3Transformer,
    side: usize,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<[Tensor; 3]> {
    let config = transformer.config();
    let tensor =
        |shape: &[usize]| -> anyhow::Result<Tensor> { Ok(ramp(shape, device)?.to_dtype(dtype)?) };
    Ok([
        tensor(&[BATCH, config.in_channels, side, side])?,
        tensor(&[BATCH, TEXT_TOKENS, config.joint_attention_dim])?,
        tensor(&[BATCH, config.pooled_projection_dim])?,
    ])
}
