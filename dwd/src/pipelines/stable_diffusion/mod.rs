//! The Stable Diffusion 1.x/2.x family: `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline` from a diffusers folder with `tokenizer`,
//! `text_encoder`, `unet`, `vae` and `scheduler`.
//!
//! [`pipeline`] is the denoising loop; this module assembles it from the cache's
//! components and turns a [`Request`]'s typed arguments into its [`GenerateArgs`].

pub mod pipeline;

use std::sync::Arc;

use protocol::workflow::OutputType;

pub use pipeline::{images_to_rgb8, GenerateArgs, RgbImage, StableDiffusionPipeline, MAX_TOKENS};

use super::family::{Family, Output, Parts, Pipeline, Request, RunHost};
use super::{lora, PipelineError, SchedulerConfig};

/// The family, as the registry lists it.
pub struct StableDiffusion;

/// The components LoRAs adapt, as diffusers' `StableDiffusionLoraLoaderMixin` loads them.
const ADAPTED: &[&str] = &["text_encoder", "unet"];

impl Family for StableDiffusion {
    fn schema(&self) -> &'static protocol::families::Family {
        &protocol::families::stable_diffusion::FAMILY
    }

    fn assemble(&self, mut parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError> {
        lora::check_components(&parts.adapters, ADAPTED, "Stable Diffusion")?;
        Ok(Arc::new(StableDiffusionPipeline {
            tokenizer: parts.take("tokenizer")?,
            text_encoder: parts.take("text_encoder")?,
            unet: parts.take("unet")?,
            vae: parts.take("vae")?,
            scheduler: SchedulerConfig::load(&parts.model_dir.join("scheduler"))?,
            device: parts.device.clone(),
            dtype: parts.dtype,
            adapters: parts.adapters,
        }))
    }
}

impl Pipeline for StableDiffusionPipeline {
    fn default_scheduler(&self) -> Option<&str> {
        self.scheduler.class_name.as_deref()
    }

    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError> {
        StableDiffusionPipeline::activation_bytes(self, &generate_args(request))
    }

    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError> {
        let args = generate_args(request);
        let output = self.generate_with_noise(&args, host.noise, host.progress)?;
        Ok(match args.output_latents {
            true => Output::Latents(output),
            false => Output::Images(output),
        })
    }
}

/// The loop's arguments from a request, with diffusers' defaults.
fn generate_args(request: &Request) -> GenerateArgs {
    let arguments = &request.arguments;
    let defaults = GenerateArgs::default();
    GenerateArgs {
        prompts: arguments.prompts().to_vec(),
        negative_prompt: arguments.text("negative_prompt").map(str::to_string),
        num_inference_steps: request.integer("num_inference_steps", defaults.num_inference_steps),
        guidance_scale: request.number("guidance_scale", defaults.guidance_scale),
        height: arguments.integer("height"),
        width: arguments.integer("width"),
        num_images_per_prompt: request.integer("num_images_per_prompt", 1),
        seed: 0,
        latents: request.latents.clone(),
        scheduler_type: request.scheduler_type(),
        scheduler_overrides: request.scheduler_overrides(),
        init_image: request.images.get("image").cloned(),
        strength: request.number("strength", defaults.strength),
        output_latents: arguments.output_type() == OutputType::Latent,
        vae_slicing: request.vae_slicing,
        vae_tiling: request.vae_tiling,
        lora_scale: request.number("cross_attention_kwargs", defaults.lora_scale),
    }
}
