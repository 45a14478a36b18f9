//! Where the random numbers of a generation come from: the initial latents, the VAE's
//! latent sample in image-to-image, the noise img2img adds, and the noise stochastic
//! schedulers (Euler ancestral, LCM) add between steps.
//!
//! Everything is drawn through [`NoiseSource`] in the order diffusers draws it: a seed
//! draws through torch's own generator ([`super::torch_rng::TorchCpuGenerator`]), so it
//! gives the noise diffusers draws from that seed, and a recorded sequence of draws can be
//! replayed to reproduce a reference run exactly.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};

use super::{InComponent, PipelineError};

const COMPONENT: &str = "noise";

/// A stream of standard normal noise tensors.
pub trait NoiseSource {
    /// The next draw: standard normal noise of `shape`, f32 on the CPU.
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError>;
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
