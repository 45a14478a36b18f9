//! `DwTestNoisePipeline`, a family only test builds have: it loads no weights, reports
//! progress for each of its `num_inference_steps` and returns the noise it draws, mapped
//! into [0, 1]. Added through the registries alone, it proves the family seam: it runs
//! through `dwctl run`, the daemon's queue, engine and writer without any of them knowing
//! it.

use std::sync::Arc;

use candle_core::Tensor;
use protocol::workflow::OutputType;

use super::family::{Family, Output, Parts, Phase, Pipeline, Progress, Request, RunHost};
use super::{InComponent, PipelineError};

pub struct TestNoise;

impl Family for TestNoise {
    fn schema(&self) -> &'static protocol::families::Family {
        &protocol::families::test_noise::FAMILY
    }

    fn assemble(&self, _parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError> {
        Ok(Arc::new(NoisePipeline))
    }
}

struct NoisePipeline;

impl NoisePipeline {
    fn shape(request: &Request) -> [usize; 4] {
        let prompts = request.arguments.prompts().len().max(1);
        let images = prompts * request.integer("num_images_per_prompt", 1);
        [
            images,
            3,
            request.integer("height", 8),
            request.integer("width", 8),
        ]
    }
}

impl Pipeline for NoisePipeline {
    fn default_scheduler(&self) -> Option<&str> {
        None
    }

    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError> {
        Ok(Self::shape(request).iter().product::<usize>() as u64 * 4)
    }

    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError> {
        let total = request.integer("num_inference_steps", 2);
        for step in 0..total {
            (host.progress)(Progress {
                phase: Phase::Denoising,
                step,
                total,
            })?;
        }
        let noise: Tensor = host.noise.next(&Self::shape(request))?;
        let unit = noise
            .affine(0.25, 0.5)
            .and_then(|t| t.clamp(0f32, 1f32))
            .in_component("test noise")?;
        Ok(match request.arguments.output_type() {
            OutputType::Latent => Output::Latents(unit),
            OutputType::Image => Output::Images(unit),
        })
    }
}
