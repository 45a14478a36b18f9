//! The Stable Diffusion 3 family: `StableDiffusion3Pipeline` and
//! `StableDiffusion3Img2ImgPipeline` (SD 3 medium, SD 3.5 large, large-turbo and medium)
//! from a diffusers folder with two CLIP encoders with projections, an optional T5
//! (`tokenizer_3`/`text_encoder_3`), the MMDiT `transformer`, a shifted 16-channel `vae`
//! and a flow-match `scheduler`.
//!
//! [`transformer`] is the model; [`pipeline`] the loop; this module assembles it from the
//! cache's components and turns a [`Request`]'s typed arguments into its [`Sd3Args`].

pub mod pipeline;
pub mod transformer;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use protocol::workflow::OutputType;

pub use pipeline::{
    Clip, Sd3Args, Sd3Conditioning, Sd3Texts, SkipLayerGuidance, StableDiffusion3Pipeline, T5,
};
pub use transformer::{Sd3Config, Sd3Inputs, Sd3Transformer};

use super::diffusion::DecodeOptions;
use super::family::{Family, Output, Parts, Pipeline, Request, RunHost};
use super::placement::{Offload, Placed};
use super::{
    lora, ClipTokenizer, PipelineError, SchedulerConfig, T5Encoder, T5Tokenizer, TextEncoder, Vae,
};

/// The components a LoRA adapts, as diffusers' `SD3LoraLoaderMixin` loads them (T5 takes
/// none).
const ADAPTED: &[&str] = &["text_encoder", "text_encoder_2", "transformer"];

/// The family, as the registry lists it.
pub struct StableDiffusion3;

impl Family for StableDiffusion3 {
    fn schema(&self) -> &'static protocol::families::Family {
        &protocol::families::stable_diffusion_3::FAMILY
    }

    /// T5 and the transformer, SD 3's large components, go to host memory under offload
    /// and onto the device one at a time; under sequential offload the transformer's blocks
    /// each only while it runs.
    fn offloads(&self) -> bool {
        true
    }

    fn assemble(&self, mut parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError> {
        lora::check_components(&parts.adapters, ADAPTED, "Stable Diffusion 3")?;
        let t5 = match (
            parts.take_optional("tokenizer_3")?,
            parts.take_optional_placed("text_encoder_3")?,
        ) {
            (Some(tokenizer), Some(encoder)) => Some(T5 { tokenizer, encoder }),
            // As diffusers: without `text_encoder_3`, T5's place is zeros whatever the
            // tokenizer.
            (_, None) => None,
            (None, Some(_)) => {
                return Err(PipelineError::invalid(
                    "text_encoder_3",
                    "needs `tokenizer_3` to read the prompt; give both, or set `text_encoder_3` to null",
                ))
            }
        };
        Ok(Arc::new(StableDiffusion3Pipeline {
            clip_l: Clip {
                tokenizer: parts.take("tokenizer")?,
                encoder: parts.take("text_encoder")?,
            },
            clip_g: Clip {
                tokenizer: parts.take("tokenizer_2")?,
                encoder: parts.take("text_encoder_2")?,
            },
            t5,
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

impl StableDiffusion3Pipeline {
    /// Loads every component from a diffusers folder (T5 only where the folder has it),
    /// outside the daemon's cache.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        let clip = |tokenizer: &str, encoder: &str| -> Result<Clip, PipelineError> {
            Ok(Clip {
                tokenizer: Arc::new(ClipTokenizer::load(&model_dir.join(tokenizer))?),
                encoder: Arc::new(TextEncoder::load(&model_dir.join(encoder), dtype, device)?),
            })
        };
        let t5 = match model_dir.join("text_encoder_3").is_dir() {
            true => Some(T5 {
                tokenizer: Arc::new(T5Tokenizer::load(&model_dir.join("tokenizer_3"))?),
                encoder: Placed::Resident(Arc::new(T5Encoder::load(
                    &model_dir.join("text_encoder_3"),
                    dtype,
                    device,
                )?)),
            }),
            false => None,
        };
        Ok(Self {
            clip_l: clip("tokenizer", "text_encoder")?,
            clip_g: clip("tokenizer_2", "text_encoder_2")?,
            t5,
            transformer: Placed::Resident(Arc::new(Sd3Transformer::load(
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

impl Pipeline for StableDiffusion3Pipeline {
    fn default_scheduler(&self) -> Option<&str> {
        self.scheduler.class_name.as_deref()
    }

    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError> {
        StableDiffusion3Pipeline::activation_bytes(self, &sd3_args(request))
    }

    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError> {
        let args = sd3_args(request);
        let output = self.generate(&args, host.noise, host.progress)?;
        Ok(match args.output_latents {
            true => Output::Latents(output),
            false => Output::Images(output),
        })
    }
}

/// The loop's arguments from a request, with diffusers' defaults.
fn sd3_args(request: &Request) -> Sd3Args {
    let arguments = &request.arguments;
    let defaults = Sd3Args::default();
    let text = |name: &str| arguments.text(name).map(str::to_string);
    let skip_layer_guidance =
        arguments
            .integers("skip_guidance_layers")
            .map(|layers| SkipLayerGuidance {
                layers: layers.to_vec(),
                scale: request.number("skip_layer_guidance_scale", 2.8),
                start: request.number("skip_layer_guidance_start", 0.01),
                stop: request.number("skip_layer_guidance_stop", 0.2),
            });
    Sd3Args {
        texts: Sd3Texts {
            prompts: arguments.prompts().to_vec(),
            prompt_2: text("prompt_2"),
            prompt_3: text("prompt_3"),
            negative_prompt: text("negative_prompt"),
            negative_prompt_2: text("negative_prompt_2"),
            negative_prompt_3: text("negative_prompt_3"),
        },
        height: arguments.integer("height"),
        width: arguments.integer("width"),
        num_inference_steps: request.integer("num_inference_steps", defaults.num_inference_steps),
        sigmas: arguments.numbers("sigmas").map(<[f64]>::to_vec),
        guidance_scale: request.number("guidance_scale", defaults.guidance_scale),
        num_images_per_prompt: request.integer("num_images_per_prompt", 1),
        latents: request.latents.clone(),
        max_sequence_length: request.integer("max_sequence_length", defaults.max_sequence_length),
        skip_layer_guidance,
        image: request.images.get("image").cloned(),
        strength: request.number("strength", defaults.strength),
        scheduler_overrides: request.scheduler_overrides(),
        output_latents: arguments.output_type() == OutputType::Latent,
        decode: DecodeOptions {
            slicing: request.vae_slicing,
            tiling: request.vae_tiling,
        },
        lora_scale: request.number("joint_attention_kwargs", defaults.lora_scale),
    }
}
