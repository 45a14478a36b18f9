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

use super::torch_cuda_rng::{CudaGeometry, TorchCudaGenerator};
use super::torch_rng::TorchCpuGenerator;
use super::{InComponent, PipelineError};

const COMPONENT: &str = "noise";

/// A stream of standard normal noise tensors.
pub trait NoiseSource {
    /// The next draw: standard normal noise of `shape`, f32 on the CPU.
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError>;
}

/// Which of torch's generators seeds draw from. diffusers-workflow seeds one on the step's
/// device: a CUDA generator (Philox) on a machine with CUDA, a CPU one (MT19937) without;
/// the two give different noise for one seed, and the CUDA one depends on the GPU's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorKind {
    Cpu,
    Cuda(CudaGeometry),
}

/// What `--generator` asks for, before the device is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorSetting {
    /// The device's own: CUDA's on a GPU, the CPU's otherwise.
    Auto,
    Cpu,
    /// A GPU's: the device's (`None`) or the one named.
    Cuda(Option<CudaGeometry>),
}

impl GeneratorSetting {
    /// `auto`, `cpu`, `cuda` or `cuda:SMSxTHREADS`.
    pub fn parse(text: &str) -> Result<GeneratorSetting, String> {
        match text {
            "auto" => Ok(GeneratorSetting::Auto),
            "cpu" => Ok(GeneratorSetting::Cpu),
            "cuda" => Ok(GeneratorSetting::Cuda(None)),
            other => match other.strip_prefix("cuda:") {
                Some(geometry) => Ok(GeneratorSetting::Cuda(Some(CudaGeometry::parse(geometry)?))),
                None => Err(format!(
                    "`{other}` is not a generator; accepted: auto, cpu, cuda, cuda:SMSxTHREADS"
                )),
            },
        }
    }

    /// The generator for `device`.
    pub fn resolve(self, device: &Device) -> Result<GeneratorKind, String> {
        match (self, CudaGeometry::of_device(device)) {
            (GeneratorSetting::Cpu, _) | (GeneratorSetting::Auto, None) => Ok(GeneratorKind::Cpu),
            (GeneratorSetting::Cuda(Some(gpu)), _)
            | (GeneratorSetting::Cuda(None) | GeneratorSetting::Auto, Some(gpu)) => {
                Ok(GeneratorKind::Cuda(gpu))
            }
            (GeneratorSetting::Cuda(None), None) => Err("`cuda` draws as this machine's GPU would, and it has none: name the GPU whose noise you want, such as cuda:132x2048 (H100 SXM) or cuda:128x1536 (RTX 4090)".to_string()),
        }
    }
}

impl GeneratorKind {
    /// A generator of this kind seeded with `seed`, as `manual_seed(seed)` seeds torch's.
    pub fn seeded(self, seed: u64) -> StepGenerator {
        match self {
            GeneratorKind::Cpu => StepGenerator::Cpu(Box::new(TorchCpuGenerator::new(seed))),
            GeneratorKind::Cuda(gpu) => StepGenerator::Cuda(TorchCudaGenerator::new(seed, gpu)),
        }
    }

    /// How status and image metadata name it.
    pub fn describe(&self) -> String {
        match self {
            GeneratorKind::Cpu => "cpu".to_string(),
            GeneratorKind::Cuda(gpu) => format!(
                "cuda:{}x{}",
                gpu.multiprocessors, gpu.max_threads_per_multiprocessor
            ),
        }
    }
}

/// One step's seeded generator, shared by every run of the step.
#[derive(Debug, Clone)]
pub enum StepGenerator {
    /// Boxed: the twister's state is 2.5 KB.
    Cpu(Box<TorchCpuGenerator>),
    Cuda(TorchCudaGenerator),
}

impl NoiseSource for StepGenerator {
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError> {
        match self {
            StepGenerator::Cpu(generator) => generator.next(shape),
            StepGenerator::Cuda(generator) => generator.next(shape),
        }
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
    fn the_generator_follows_the_device_unless_told() {
        let cpu = Device::Cpu;
        let choose = |text: &str| GeneratorSetting::parse(text)?.resolve(&cpu);
        assert_eq!(choose("auto"), Ok(GeneratorKind::Cpu));
        assert_eq!(choose("cpu"), Ok(GeneratorKind::Cpu));
        assert_eq!(
            choose("cuda:128x1536"),
            Ok(GeneratorKind::Cuda(CudaGeometry {
                multiprocessors: 128,
                max_threads_per_multiprocessor: 1536
            }))
        );
        let no_gpu = choose("cuda").unwrap_err();
        assert!(no_gpu.contains("cuda:132x2048"), "{no_gpu}");
        let bad = choose("cuda:lots").unwrap_err();
        assert!(bad.contains("`lots` is not a GPU geometry"), "{bad}");
        let unknown = choose("mps").unwrap_err();
        assert!(unknown.contains("accepted: auto, cpu, cuda"), "{unknown}");
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
