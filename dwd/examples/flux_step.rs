//! One FLUX transformer step, timed: the per-step figure compared with diffusers in
//! `scripts/bench-flux-step.sh`. Loads only the transformer of a pipeline folder, then runs
//! its forward pass on batch 1 (FLUX.1-dev embeds the guidance scale: no guidance batch)
//! with fixed inputs: 512 T5 tokens (T5's default `max_sequence_length`), CLIP's pooled
//! embedding, the packed latents of a square image, timestep 1.0 (the first step's) and
//! guidance 3.5.
//!
//! Usage: flux_step MODEL_DIR IMAGE_SIZE STEPS [f32|f16|bf16] [cpu|cuda]
//! (IMAGE_SIZE in pixels, a multiple of 16: a 512x512 image is 64x64 latents, packed in
//! 2x2 patches into 32x32 = 1024 tokens). Prints one JSON line per step, then a summary
//! with the load time and peak RSS.

mod common;

use std::time::Instant;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};
use common::{check_finite, median, ramp, TimingArgs};
use dwd::memory::peak_resident_set_bytes;
use dwd::pipelines::flux::{FluxInputs, FluxTransformer};

/// T5's tokens per prompt, as the FLUX pipelines pad them by default.
const TEXT_TOKENS: usize = 512;
/// Pixels per side of one packed token: 8 per latent, 2x2 latents per token.
const PIXELS_PER_TOKEN: usize = 16;

/// The fixed tensor inputs of one call, in the model's dtype.
struct Inputs {
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    txt_ids: Vec<[f32; 3]>,
    img_ids: Vec<[f32; 3]>,
}

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    // `TimingArgs` calls the second argument a latent size; here it is the image's.
    let TimingArgs {
        model,
        latent_size: image_size,
        count: steps,
        dtype,
        device,
    } = TimingArgs::parse("usage: flux_step MODEL_DIR IMAGE_SIZE STEPS [f32|f16|bf16] [cpu|cuda]")?;
    if image_size == 0 || !image_size.is_multiple_of(PIXELS_PER_TOKEN) {
        bail!("IMAGE_SIZE must be a positive multiple of {PIXELS_PER_TOKEN}, not {image_size}");
    }

    let started = Instant::now();
    let transformer = FluxTransformer::load(&model.join("transformer"), dtype, &device)?;
    device.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_after_load = peak_resident_set_bytes();

    let inputs = fixed_inputs(&transformer, image_size / PIXELS_PER_TOKEN, dtype, &device)?;
    let guidance = transformer.has_guidance().then_some(3.5);
    let mut step_ms = Vec::with_capacity(steps);
    for step in 0..steps {
        let started = Instant::now();
        let velocity = transformer.forward(&FluxInputs {
            hidden_states: &inputs.hidden_states,
            encoder_hidden_states: &inputs.encoder_hidden_states,
            pooled_projections: &inputs.pooled_projections,
            timestep: 1.0,
            guidance,
            txt_ids: &inputs.txt_ids,
            img_ids: &inputs.img_ids,
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

/// Reproducible inputs for a square grid of `side` x `side` image tokens: what matters
/// here is the shapes. `scripts/flux_step_torch.py` makes the same ones.
fn fixed_inputs(
    transformer: &FluxTransformer,
    side: usize,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Inputs> {
    let config = transformer.config();
    let tensor =
        |shape: &[usize]| -> anyhow::Result<Tensor> { Ok(ramp(shape, device)?.to_dtype(dtype)?) };
    Ok(Inputs {
        hidden_states: tensor(&[1, side * side, config.in_channels])?,
        encoder_hidden_states: tensor(&[1, TEXT_TOKENS, config.joint_attention_dim])?,
        pooled_projections: tensor(&[1, config.pooled_projection_dim])?,
        txt_ids: vec![[0.0; 3]; TEXT_TOKENS],
        img_ids: image_ids(side),
    })
}

/// `[0, row, column]` of every token of the packed grid, row by row.
fn image_ids(side: usize) -> Vec<[f32; 3]> {
    (0..side * side)
        .map(|i| [0.0, (i / side) as f32, (i % side) as f32])
        .collect()
}
