//! The FLUX.1 family: `FluxPipeline`, `FluxImg2ImgPipeline` and `FluxFillPipeline` from a
//! diffusers folder with `tokenizer`/`text_encoder`
//! (CLIP, whose pooled output conditions every block), `tokenizer_2`/`text_encoder_2` (T5,
//! whose states are the text tokens), `transformer`, `vae` (16 channels, shifted and
//! scaled latents) and `scheduler` (flow matching).
//!
//! [`transformer`] is the model, built from [`blocks`] and [`embeddings`]; [`pipeline`] is
//! the denoising loop; this module assembles it from the cache's components and turns a
//! [`Request`]'s typed arguments into its [`FluxArgs`].

pub mod blocks;
pub mod embeddings;
pub mod pipeline;
pub mod transformer;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use protocol::workflow::OutputType;

pub use pipeline::{binary_mask, pack, unpack, FluxArgs, FluxPipeline, LatentShape};
pub use transformer::{FluxConfig, FluxInputs, FluxTransformer};

use super::diffusion::DecodeOptions;
use super::family::{Family, Output, Parts, Pipeline, Request, RunHost};
use super::placement::{Offload, Placed};
use super::{
    lora, ClipTokenizer, PipelineError, SchedulerConfig, T5Encoder, T5Tokenizer, TextEncoder, Vae,
};

/// The family, as the registry lists it.
pub struct Flux;

/// The components LoRAs adapt, as diffusers' `FluxLoraLoaderMixin` loads them.
const ADAPTED: &[&str] = &["text_encoder", "transformer"];

impl Family for Flux {
    fn schema(&self) -> &'static protocol::families::Family {
        &protocol::families::flux::FAMILY
    }

    /// T5 and the transformer, FLUX's large components, go to host memory under offload
    /// and onto the device one at a time; under sequential offload the transformer's blocks
    /// each only while it runs.
    fn offloads(&self) -> bool {
        true
    }

    fn assemble(&self, mut parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError> {
        lora::check_components(&parts.adapters, ADAPTED, "FLUX.1")?;
        Ok(Arc::new(FluxPipeline {
            tokenizer: parts.take("tokenizer")?,
            text_encoder: parts.take("text_encoder")?,
            tokenizer_2: parts.take("tokenizer_2")?,
            text_encoder_2: parts.take_placed("text_encoder_2")?,
            transformer: parts.take_placed("transformer")?,
            vae: parts.take("vae")?,
            scheduler: SchedulerConfig::load(&parts.model_dir.join("scheduler"))?,
            device: parts.device.clone(),
            dtype: parts.dtype,
            stream_blocks: parts.offload == Offload::Sequential,
            adapters: parts.adapters,
        }))
    }
}

impl FluxPipeline {
    /// Loads every component from a diffusers folder, outside the daemon's cache.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        Ok(Self {
            tokenizer: Arc::new(ClipTokenizer::load(&model_dir.join("tokenizer"))?),
            text_encoder: Arc::new(TextEncoder::load(
                &model_dir.join("text_encoder"),
                dtype,
                device,
            )?),
            tokenizer_2: Arc::new(T5Tokenizer::load(&model_dir.join("tokenizer_2"))?),
            text_encoder_2: Placed::Resident(Arc::new(T5Encoder::load(
                &model_dir.join("text_encoder_2"),
                dtype,
                device,
            )?)),
            transformer: Placed::Resident(Arc::new(FluxTransformer::load(
                &model_dir.join("transformer"),
                dtype,
                device,
            )?)),
            vae: Arc::new(Vae::load(&model_dir.join("vae"), dtype, device)?),
            scheduler: SchedulerConfig::load(&model_dir.join("scheduler"))?,
            device: device.clone(),
            dtype,
            stream_blocks: false,
            adapters: Vec::new(),
        })
    }
}

impl Pipeline for FluxPipeline {
    fn default_scheduler(&self) -> Option<&str> {
        self.scheduler.class_name.as_deref()
    }

    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError> {
        FluxPipeline::activation_bytes(self, &flux_args(request))
    }

    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError> {
        let args = flux_args(request);
        let output = self.generate(&args, host.noise, host.notice, host.progress)?;
        Ok(match args.output_latents {
            true => Output::Latents(output),
            false => Output::Images(output),
        })
    }
}

/// The loop's arguments from a request, with diffusers' defaults.
fn flux_args(request: &Request) -> FluxArgs {
    let arguments = &request.arguments;
    let defaults = FluxArgs::default();
    let text = |name: &str| arguments.text(name).map(str::to_string);
    FluxArgs {
        prompts: arguments.prompts().to_vec(),
        prompt_2: text("prompt_2"),
        negative_prompt: text("negative_prompt"),
        negative_prompt_2: text("negative_prompt_2"),
        true_cfg_scale: request.number("true_cfg_scale", defaults.true_cfg_scale),
        height: arguments.integer("height"),
        width: arguments.integer("width"),
        num_inference_steps: request.integer("num_inference_steps", defaults.num_inference_steps),
        sigmas: arguments.numbers("sigmas").map(<[f64]>::to_vec),
        guidance_scale: request.number("guidance_scale", defaults.guidance_scale),
        num_images_per_prompt: request.integer("num_images_per_prompt", 1),
        latents: request.latents.clone(),
        image: request.images.get("image").cloned(),
        strength: request.number("strength", defaults.strength),
        mask_image: request.images.get("mask_image").cloned(),
        max_sequence_length: request.integer("max_sequence_length", defaults.max_sequence_length),
        scheduler_overrides: request.scheduler_overrides(),
        output_latents: arguments.output_type() == OutputType::Latent,
        decode: DecodeOptions {
            slicing: request.vae_slicing,
            tiling: request.vae_tiling,
        },
        lora_scale: request.number("joint_attention_kwargs", defaults.lora_scale),
    }
}
