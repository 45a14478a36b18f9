//! One VAE decode, timed: what turning the final latents into an image costs. Loads only
//! the VAE of a pipeline folder, then decodes fixed latents of batch 1, shaped
//! (latent_channels, LATENT_SIZE, LATENT_SIZE), `RUNS` times.
//!
//! Usage: vae_decode MODEL_DIR LATENT_SIZE RUNS [f32|f16|bf16] [cpu|cuda]
//! Prints one JSON line per run, then a summary with the load time, the median of the runs
//! after the first, and the peak RSS.

mod common;

use std::time::Instant;

use common::{median, ramp, TimingArgs};
use dwd::memory::peak_resident_set_bytes;
use dwd::pipelines::Vae;

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    let TimingArgs {
        model,
        latent_size,
        count: runs,
        dtype,
        device,
    } = TimingArgs::parse(
        "usage: vae_decode MODEL_DIR LATENT_SIZE RUNS [f32|f16|bf16] [cpu|cuda]",
    )?;

    let started = Instant::now();
    let vae = Vae::load(&model.join("vae"), dtype, &device)?;
    device.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;

    // Fixed, reproducible latents: what matters here is the shape.
    let shape = [1, vae.latent_channels(), latent_size, latent_size];
    let latents = ramp(&shape, &device)?.to_dtype(dtype)?;

    let mut run_ms = Vec::with_capacity(runs);
    for run in 0..runs {
        let started = Instant::now();
        let images = vae.decode(&latents)?;
        device.synchronize()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(images);
        println!("{{\"run\": {run}, \"ms\": {ms:.1}}}");
        run_ms.push(ms);
    }
    // The first run pays for first-touch allocations; the median is over the rest (or over
    // the only run).
    let median = median(if run_ms.len() > 1 {
        &run_ms[1..]
    } else {
        &run_ms
    });
    println!(
        "{{\"engine\": \"candle\", \"latent_size\": {latent_size}, \"load_ms\": {load_ms:.0}, \
         \"first_run_ms\": {:.1}, \"median_ms\": {median:.1}, \"peak_rss\": {}, \
         \"weights_bytes\": {}}}",
        run_ms.first().copied().unwrap_or(f64::NAN),
        peak_resident_set_bytes(),
        vae.bytes()
    );
    Ok(())
}
