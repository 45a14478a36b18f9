//! The timestep embedding: the denoising step's timestep as sinusoids (diffusers'
//! `Timesteps`, `get_timestep_embedding`), then a two-layer MLP (`TimestepEmbedding`) whose
//! output every ResNet block adds to its features.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::pipelines::lora::AdaptableLinear;

/// Sinusoidal features of a timestep: `channels / 2` frequencies from 1 down to 1/10000,
/// as cosines then sines (`flip_sin_to_cos`) or sines then cosines.
#[derive(Debug, Clone)]
pub struct Timesteps {
    channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl Timesteps {
    pub fn new(channels: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Self {
        Self {
            channels,
            flip_sin_to_cos,
            freq_shift,
        }
    }

    /// (batch, channels) in f32, the same row for every element of the batch.
    pub fn forward(&self, timestep: f64, batch: usize, device: &Device) -> Result<Tensor> {
        let row = self.forward_values(&[timestep as f32], device)?;
        row.broadcast_as((batch, self.channels))?.contiguous()
    }

    /// (values, channels) in f32: one row of sinusoids per value.
    ///
    /// Computed in f32 in diffusers' order: exponent `-ln(10000) · i / (half - shift)`,
    /// then `exp`, then the product with the value, then `sin` and `cos`.
    pub fn forward_values(&self, values: &[f32], device: &Device) -> Result<Tensor> {
        let half = self.channels / 2;
        let denominator = (half as f64 - self.freq_shift) as f32;
        let frequencies: Vec<f32> = (0..half)
            .map(|i| (i as f32 * -(10000f64.ln() as f32) / denominator).exp())
            .collect();
        let mut rows = Vec::with_capacity(values.len() * self.channels);
        for &value in values {
            let angles: Vec<f32> = frequencies.iter().map(|f| value * f).collect();
            let sines = angles.iter().map(|angle| angle.sin());
            let cosines = angles.iter().map(|angle| angle.cos());
            let start = rows.len();
            if self.flip_sin_to_cos {
                rows.extend(cosines.chain(sines));
            } else {
                rows.extend(sines.chain(cosines));
            }
            // An odd channel count gets one zero at the end.
            rows.resize(start + self.channels, 0.0);
        }
        Tensor::from_vec(rows, (values.len(), self.channels), device)
    }
}

/// `linear_1` → SiLU → `linear_2`: the sinusoids to the time embedding the ResNet blocks
/// take (4 × the first block's channels wide).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: AdaptableLinear,
    linear_2: AdaptableLinear,
}

impl TimestepEmbedding {
    pub fn load(vb: VarBuilder, in_channels: usize, embedding_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: AdaptableLinear::load(in_channels, embedding_dim, vb.pp("linear_1"))?,
            linear_2: AdaptableLinear::load(embedding_dim, embedding_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, sinusoids: &Tensor) -> Result<Tensor> {
        let xs = candle_nn::ops::silu(&self.linear_1.forward(sinusoids)?)?;
        self.linear_2.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoids_put_cosines_first_when_flipped() {
        let device = Device::Cpu;
        let flipped = Timesteps::new(4, true, 0.0)
            .forward(2.0, 1, &device)
            .unwrap();
        let plain = Timesteps::new(4, false, 0.0)
            .forward(2.0, 1, &device)
            .unwrap();
        // Frequencies 1 and 10000^(-1/2) = 0.01.
        let want_flipped = [2f32.cos(), 0.02f32.cos(), 2f32.sin(), 0.02f32.sin()];
        let want_plain = [2f32.sin(), 0.02f32.sin(), 2f32.cos(), 0.02f32.cos()];
        for (got, want) in [(flipped, want_flipped), (plain, want_plain)] {
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn odd_channel_counts_end_in_a_zero_and_rows_repeat_per_batch() {
        let device = Device::Cpu;
        let sinusoids = Timesteps::new(5, true, 1.0)
            .forward(7.0, 3, &device)
            .unwrap();
        assert_eq!(sinusoids.dims2().unwrap(), (3, 5));
        let rows = sinusoids.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0][4], 0.0);
        assert_eq!(rows[0], rows[2]);
    }
}
