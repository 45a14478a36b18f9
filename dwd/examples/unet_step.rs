//! One UNet step, timed: the per-step figure compared with diffusers in
//! `scripts/bench-unet-step.sh`. Loads only the UNet of a pipeline folder, then runs its
//! forward pass on batch 2 (the classifier-free guidance batch) with fixed inputs.
//!
//! Usage: unet_step MODEL_DIR LATENT_SIZE STEPS [f32|f16|bf16] [cpu|cuda]
//! Prints one JSON line per step, then a summary with the load time and peak RSS.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use dwd::pipelines::Unet;

fn main() -> anyhow::Result<()> {
    dwd::memory::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: unet_step MODEL_DIR LATENT_SIZE STEPS [f32|f16|bf16] [cpu|cuda]";
    let model = PathBuf::from(args.get(1).context(usage)?);
    let latent_size: usize = args.get(2).context(usage)?.parse()?;
    let steps: usize = args.get(3).context(usage)?.parse()?;
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
    let unet = Unet::load(&model.join("unet"), dtype, &device)?;
    device.synchronize()?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_after_load = peak_rss_bytes();

    // Fixed, reproducible inputs: what matters here is the shapes.
    let channels = unet.in_channels();
    let cross_attention_dim = unet.config().model.cross_attention_dim;
    let latents = ramp(&[2, channels, latent_size, latent_size], &device)?.to_dtype(dtype)?;
    let context = ramp(&[2, 77, cross_attention_dim], &device)?.to_dtype(dtype)?;

    let mut step_ms = Vec::with_capacity(steps);
    for step in 0..steps {
        let started = Instant::now();
        let noise = unet.forward(&latents, 999.0 - step as f64, &context)?;
        device.synchronize()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(noise);
        println!("{{\"step\": {step}, \"ms\": {ms:.1}}}");
        step_ms.push(ms);
    }
    let mut warm: Vec<f64> = step_ms.iter().skip(1).copied().collect();
    warm.sort_by(f64::total_cmp);
    let median = warm.get(warm.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{{\"engine\": \"candle\", \"latent_size\": {latent_size}, \"load_ms\": {load_ms:.0}, \
         \"first_step_ms\": {:.1}, \"warm_step_median_ms\": {median:.1}, \
         \"peak_rss_after_load\": {rss_after_load}, \"peak_rss\": {}, \"weights_bytes\": {}}}",
        step_ms.first().copied().unwrap_or(f64::NAN),
        peak_rss_bytes(),
        unet.bytes()
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
