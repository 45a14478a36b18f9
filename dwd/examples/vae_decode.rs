//! One VAE decode, timed: what turning the final latents into an image costs. Loads only
//! the VAE of a pipeline folder, then decodes fixed latents of batch 1, shaped
//! (latent_channels, LATENT_SIZE, LATENT_SIZE), `RUNS` times.
//!
//! Usage: vae_decode MODEL_DIR LATENT_SIZE RUNS [f32|f16|bf16] [cpu|cuda]
//! Prints one JSON line per run, then a summary with the load time, the median of the runs
//! after the first, and the peak RSS.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use dwd::pipelines::Vae;

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vae_decode MODEL_DIR LATENT_SIZE RUNS [f32|f16|bf16] [cpu|cuda]";
    let model = PathBuf::from(args.get(1).context(usage)?);
    let latent_size: usize = args.get(2).context(usage)?.parse()?;
    let runs: usize = args.get(3).context(usage)?.parse()?;
    let dtype = match args.get(4).map(String::as_str).unwrap_or("f32") {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype {other}; {usage}"),
    };
    let device = match args.get(5).map(String::as_str).unwrap_or("cpu") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => bail!("unknown device {other}; {usage}"),
    };

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
    let mut warm: Vec<f64> = run_ms.iter().skip(1).copied().collect();
    if warm.is_empty() {
        warm = run_ms.clone();
    }
    warm.sort_by(f64::total_cmp);
    let median = warm.get(warm.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{{\"engine\": \"candle\", \"latent_size\": {latent_size}, \"load_ms\": {load_ms:.0}, \
         \"first_run_ms\": {:.1}, \"median_ms\": {median:.1}, \"peak_rss\": {}, \
         \"weights_bytes\": {}}}",
        run_ms.first().copied().unwrap_or(f64::NAN),
        peak_rss_bytes(),
        vae.bytes()
    );
    Ok(())
}

/// Values in [-1, 1) that vary along every axis.
fn ramp(shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(values, shape, device)
}

/// The process's peak resident set (VmHWM) in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
