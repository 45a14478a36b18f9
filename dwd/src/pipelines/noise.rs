//! Where the random numbers of a generation come from: the initial latents, the VAE's
//! latent sample in image-to-image, the noise img2img adds, and the noise stochastic
//! schedulers (Euler ancestral, LCM) add between steps.
//!
//! Everything is drawn through [`NoiseSource`] in the order diffusers draws it, so a seeded
//! source gives the same images on every device and a recorded sequence of draws can be
//! replayed to reproduce a reference run exactly.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::{InComponent, PipelineError};

const COMPONENT: &str = "noise";

/// A stream of standard normal noise tensors.
pub trait NoiseSource {
    /// The next draw: standard normal noise of `shape`, f32 on the CPU.
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError>;
}

/// Noise drawn from ChaCha8 seeded with a `u64`, element by element in row-major order.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).in_component(COMPONENT)
    }
}

/// Hands out recorded tensors in order; each must have the shape asked for.
#[derive(Debug, Clone, Default)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
    drawn: usize,
}

impl ReplayNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
            drawn: 0,
        }
    }

    /// Draws not taken yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError> {
        let index = self.drawn;
        let tensor = self.queue.pop_front().ok_or_else(|| {
            PipelineError::invalid(
                "replayed noise",
                format!(
                    "draw {index} of shape {shape:?} asked for, but only {index} were recorded"
                ),
            )
        })?;
        if tensor.dims() != shape {
            return Err(PipelineError::invalid(
                "replayed noise",
                format!(
                    "draw {index} has shape {:?}, expected {shape:?}",
                    tensor.dims()
                ),
            ));
        }
        self.drawn += 1;
        tensor
            .to_dtype(DType::F32)
            .and_then(|tensor| tensor.to_device(&Device::Cpu))
            .in_component(COMPONENT)
    }
}

/// Draws noise shaped like `like` and moves it to `like`'s device as f32.
pub(crate) fn draw_like(
    noise: &mut dyn NoiseSource,
    like: &Tensor,
) -> Result<Tensor, PipelineError> {
    let drawn = noise.next(like.dims())?;
    drawn.to_device(like.device()).in_component(COMPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_repeats_per_seed() {
        let first = SeededNoise::new(3).next(&[2, 3]).unwrap();
        let again = SeededNoise::new(3).next(&[2, 3]).unwrap();
        let other = SeededNoise::new(4).next(&[2, 3]).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&first), values(&again));
        assert_ne!(values(&first), values(&other));
    }

    #[test]
    fn replay_checks_shape_and_count() {
        let tensor = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let mut replay = ReplayNoise::new([tensor]);
        assert!(replay.next(&[2, 1]).is_err());
        let mut replay =
            ReplayNoise::new([Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap()]);
        assert!(replay.next(&[1, 2]).is_ok());
        assert_eq!(replay.remaining(), 0);
        assert!(replay.next(&[1, 2]).is_err());
    }
}
