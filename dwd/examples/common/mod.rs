//! What the timing examples (`unet_step`, `vae_decode`) share: their command line, the
//! fixed inputs they feed a model, and the median they report.

// Each example uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

/// `MODEL_DIR LATENT_SIZE COUNT [f32|f16|bf16] [cpu|cuda]`, parsed; `usage` is the line
/// shown when an argument is missing or wrong.
pub struct TimingArgs {
    pub model: PathBuf,
    pub latent_size: usize,
    /// How many steps or runs to time.
    pub count: usize,
    pub dtype: DType,
    pub device: Device,
}

impl TimingArgs {
    pub fn parse(usage: &str) -> anyhow::Result<Self> {
        let args: Vec<String> = std::env::args().collect();
        let model = PathBuf::from(args.get(1).context(usage.to_string())?);
        let latent_size: usize = args.get(2).context(usage.to_string())?.parse()?;
        let count: usize = args.get(3).context(usage.to_string())?.parse()?;
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
        Ok(Self {
            model,
            latent_size,
            count,
            dtype,
            device,
        })
    }
}

/// Values in [-1, 1) that vary along every axis: fixed, reproducible inputs, where what
/// matters is the shape.
pub fn ramp(shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(values, shape, device)
}

/// The median of `samples` (the upper one of an even count); NaN when there are none.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// SDXL's time ids for a square image of `side` pixels (original size, crop, target size),
/// `batch` rows: what `scripts/unet_step_torch.py` passes too.
pub fn sdxl_time_ids(side: usize, batch: usize, device: &Device) -> candle_core::Result<Tensor> {
    let side = side as f32;
    let row = [side, side, 0.0, 0.0, side, side];
    Tensor::from_vec(row.repeat(batch), (batch, row.len()), device)
}

/// Random weights can overflow; a step whose output did is no benchmark (checked after
/// the timing).
pub fn check_finite(output: &Tensor) -> anyhow::Result<()> {
    let largest = output
        .abs()?
        .to_dtype(DType::F32)?
        .max_all()?
        .to_scalar::<f32>()?;
    if !largest.is_finite() {
        bail!("the model's output is not finite (largest magnitude {largest})");
    }
    Ok(())
}
