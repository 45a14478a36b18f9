//! One UNet step, timed: the per-step figure compared with diffusers in
//! `scripts/bench-unet-step.sh`. Loads only the UNet of a pipeline folder, then runs its
//! forward pass on batch 2 (the classifier-free guidance batch) with fixed inputs (for an
//! SDXL UNet, with a pooled embedding and the time ids of a square image as well).
//!
//! Usage: unet_step MODEL_DIR LATENT_SIZE STEPS [f32|f16|bf16] [cpu|cuda]
//! Prints one JSON line per step, then a summary with the load time and peak RSS.

mod common;

use std::time::Instant;

use common::{median, ramp, sdxl_time_ids, TimingArgs};
use dwd::memory::peak_resident_set_bytes;
use dwd::pipelines::{TextTime, Unet};

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    let TimingArgs {
        model,
        latent_size,
        count: steps,
        dtype,
        device,
    } = TimingArgs::parse(
        "usage: unet_step MODEL_DIR LATENT_SIZE STEPS [f32|f16|bf16] [cpu|cuda]",
    )?;

    let started = Instant::now();
    let unet = Unet::load(&model.join("unet"), dtype, &device)?;
    device.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_after_load = peak_resident_set_bytes();

    // Fixed, reproducible inputs: what matters here is the shapes.
    let channels = unet.in_channels();
    let cross_attention_dim = unet.config().model.cross_attention_dim;
    let latents = ramp(&[2, channels, latent_size, latent_size], &device)?.to_dtype(dtype)?;
    let context = ramp(&[2, 77, cross_attention_dim], &device)?.to_dtype(dtype)?;
    // An SDXL UNet also takes the pooled text embedding and six time ids per row.
    let added = match unet.text_time() {
        Some(text_time) => {
            let pooled_width = text_time.input_dim - 6 * text_time.time_embed_dim;
            let text_embeds = ramp(&[2, pooled_width], &device)?.to_dtype(dtype)?;
            Some((text_embeds, sdxl_time_ids(latent_size * 8, 2, &device)?))
        }
        None => None,
    };

    let mut step_ms = Vec::with_capacity(steps);
    for step in 0..steps {
        let started = Instant::now();
        let added = added.as_ref().map(|(text_embeds, time_ids)| TextTime {
            text_embeds,
            time_ids,
        });
        let noise = unet.forward_with(&latents, 999.0 - step as f64, &context, added)?;
        device.synchronize()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(noise);
        println!("{{\"step\": {step}, \"ms\": {ms:.1}}}");
        step_ms.push(ms);
    }
    let median = median(step_ms.get(1..).unwrap_or(&[]));
    println!(
        "{{\"engine\": \"candle\", \"latent_size\": {latent_size}, \"load_ms\": {load_ms:.0}, \
         \"first_step_ms\": {:.1}, \"warm_step_median_ms\": {median:.1}, \
         \"peak_rss_after_load\": {rss_after_load}, \"peak_rss\": {}, \"weights_bytes\": {}}}",
        step_ms.first().copied().unwrap_or(f64::NAN),
        peak_resident_set_bytes(),
        unet.bytes()
    );
    Ok(())
}
