//! The Stable Diffusion XL family: `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` (img2img and the refiner) from a diffusers folder with
//! `tokenizer`/`text_encoder` (absent in a refiner), `tokenizer_2`, `text_encoder_2`,
//! `unet`, `vae` and `scheduler`.
//!
//! [`conditioning`] encodes the prompts and builds the time ids; [`pipeline`] is the
//! denoising loop; this module assembles it from the cache's components and turns a
//! [`Request`]'s typed arguments into its [`XlArgs`].

pub mod conditioning;
pub mod pipeline;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use protocol::families::ModelIndex;
use protocol::workflow::{Arguments, OutputType};

pub use conditioning::{ClipPair, MicroConditioning, PromptTexts, TextEncoders};
pub use pipeline::{FolderOptions, StableDiffusionXlPipeline, StartImage, XlArgs};

use super::diffusion::DecodeOptions;
use super::family::{Family, Output, Parts, Pipeline, Request, RunHost};
use super::{
    lora, ClipTokenizer, PipelineError, SchedulerConfig, TextEncoder, Unet, Vae, VaeConfig,
};

/// The family, as the registry lists it.
pub struct StableDiffusionXl;

impl Family for StableDiffusionXl {
    fn schema(&self) -> &'static protocol::families::Family {
        &protocol::families::stable_diffusion_xl::FAMILY
    }

    fn assemble(&self, mut parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError> {
        let adapted: &[&str] = match parts.has("text_encoder") {
            true => &["text_encoder", "text_encoder_2", "unet"],
            false => &["text_encoder_2", "unet"],
        };
        lora::check_components(&parts.adapters, adapted, "Stable Diffusion XL")?;
        let first = match (
            parts.take_optional("tokenizer")?,
            parts.take_optional("text_encoder")?,
        ) {
            (Some(tokenizer), Some(encoder)) => Some(ClipPair { tokenizer, encoder }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(PipelineError::invalid(
                    "text_encoder",
                    "and `tokenizer` come together: give both or neither",
                ))
            }
        };
        let second = ClipPair {
            tokenizer: parts.take("tokenizer_2")?,
            encoder: parts.take("text_encoder_2")?,
        };
        Ok(Arc::new(StableDiffusionXlPipeline {
            text_encoders: TextEncoders { first, second },
            unet: parts.take("unet")?,
            vae: parts.take("vae")?,
            scheduler: SchedulerConfig::load(&parts.model_dir.join("scheduler"))?,
            folder: folder_options(&parts.index),
            device: parts.device.clone(),
            dtype: parts.dtype,
            adapters: parts.adapters,
        }))
    }

    /// The VAE in float32 when the pipeline runs in float16 and its config sets
    /// `force_upcast` (SDXL's VAE overflows in float16), as diffusers' SDXL pipelines do.
    fn component_dtype(&self, name: &str, dir: &Path, dtype: DType) -> DType {
        let upcast = || VaeConfig::load(dir).is_ok_and(|config| config.force_upcast);
        match name == "vae" && dtype == DType::F16 && upcast() {
            true => DType::F32,
            false => dtype,
        }
    }
}

impl StableDiffusionXlPipeline {
    /// Loads every component from a diffusers folder (the first tokenizer and text encoder
    /// only where the folder has them), outside the daemon's cache.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        let pair = |tokenizer: &str, encoder: &str| -> Result<ClipPair, PipelineError> {
            Ok(ClipPair {
                tokenizer: Arc::new(ClipTokenizer::load(&model_dir.join(tokenizer))?),
                encoder: Arc::new(TextEncoder::load(&model_dir.join(encoder), dtype, device)?),
            })
        };
        let first = match model_dir.join("text_encoder").is_dir() {
            true => Some(pair("tokenizer", "text_encoder")?),
            false => None,
        };
        let vae_dir = model_dir.join("vae");
        let vae_dtype = StableDiffusionXl.component_dtype("vae", &vae_dir, dtype);
        Ok(Self {
            text_encoders: TextEncoders {
                first,
                second: pair("tokenizer_2", "text_encoder_2")?,
            },
            unet: Arc::new(Unet::load(&model_dir.join("unet"), dtype, device)?),
            vae: Arc::new(Vae::load(&vae_dir, vae_dtype, device)?),
            scheduler: SchedulerConfig::load(&model_dir.join("scheduler"))?,
            folder: folder_options(&ModelIndex::read(model_dir)),
            device: device.clone(),
            dtype,
            adapters: Vec::new(),
        })
    }
}

/// `force_zeros_for_empty_prompt` and `requires_aesthetics_score` from the folder's
/// `model_index.json`, with diffusers' defaults where it has none.
fn folder_options(index: &ModelIndex) -> FolderOptions {
    let defaults = FolderOptions::default();
    FolderOptions {
        force_zeros_for_empty_prompt: index
            .flag("force_zeros_for_empty_prompt")
            .unwrap_or(defaults.force_zeros_for_empty_prompt),
        requires_aesthetics_score: index
            .flag("requires_aesthetics_score")
            .unwrap_or(defaults.requires_aesthetics_score),
    }
}

impl Pipeline for StableDiffusionXlPipeline {
    fn default_scheduler(&self) -> Option<&str> {
        self.scheduler.class_name.as_deref()
    }

    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError> {
        StableDiffusionXlPipeline::activation_bytes(self, &xl_args(request))
    }

    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError> {
        let args = xl_args(request);
        let output = self.generate(&args, host.noise, host.progress)?;
        Ok(match args.output_latents {
            true => Output::Latents(output),
            false => Output::Images(output),
        })
    }
}

/// The loop's arguments from a request, with diffusers' defaults.
fn xl_args(request: &Request) -> XlArgs {
    let arguments = &request.arguments;
    let defaults = XlArgs::default();
    let image = match (
        request.latent_images.get("image"),
        request.images.get("image"),
    ) {
        (Some(latents), _) => Some(StartImage::Latents(latents.clone())),
        (None, Some(pixels)) => Some(StartImage::Pixels(pixels.clone())),
        (None, None) => None,
    };
    XlArgs {
        texts: prompt_texts(arguments),
        num_inference_steps: request.integer("num_inference_steps", defaults.num_inference_steps),
        guidance_scale: request.number("guidance_scale", defaults.guidance_scale),
        guidance_rescale: request.number("guidance_rescale", defaults.guidance_rescale),
        num_images_per_prompt: request.integer("num_images_per_prompt", 1),
        height: arguments.integer("height"),
        width: arguments.integer("width"),
        latents: request.latents.clone(),
        image,
        strength: request.number("strength", defaults.strength),
        denoising_start: arguments.number("denoising_start"),
        denoising_end: arguments.number("denoising_end"),
        micro: micro_conditioning(request, &defaults.micro),
        scheduler_type: request.scheduler_type(),
        scheduler_overrides: request.scheduler_overrides(),
        output_latents: arguments.output_type() == OutputType::Latent,
        decode: DecodeOptions {
            slicing: request.vae_slicing,
            tiling: request.vae_tiling,
        },
        lora_scale: request.number("cross_attention_kwargs", defaults.lora_scale),
    }
}

fn prompt_texts(arguments: &Arguments) -> PromptTexts {
    let text = |name: &str| arguments.text(name).map(str::to_string);
    PromptTexts {
        prompts: arguments.prompts().to_vec(),
        prompt_2: text("prompt_2"),
        negative_prompt: text("negative_prompt"),
        negative_prompt_2: text("negative_prompt_2"),
    }
}

fn micro_conditioning(request: &Request, defaults: &MicroConditioning) -> MicroConditioning {
    let pair = |name: &str| request.arguments.pair(name);
    MicroConditioning {
        original_size: pair("original_size"),
        crops_coords_top_left: pair("crops_coords_top_left"),
        target_size: pair("target_size"),
        negative_original_size: pair("negative_original_size"),
        negative_crops_coords_top_left: pair("negative_crops_coords_top_left"),
        negative_target_size: pair("negative_target_size"),
        aesthetic_score: request.number("aesthetic_score", defaults.aesthetic_score),
        negative_aesthetic_score: request.number(
            "negative_aesthetic_score",
            defaults.negative_aesthetic_score,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(folder: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-sdxl")
            .join(folder)
    }

    /// diffusers' SDXL pipelines decode in float32 when the VAE is float16 and its config
    /// sets `force_upcast`; dw loads that VAE in float32 from the start. Nothing else moves.
    #[test]
    fn a_force_upcast_vae_loads_in_float32_under_float16_only() {
        let vae = fixture("model/vae");
        let family = StableDiffusionXl;
        assert_eq!(family.component_dtype("vae", &vae, DType::F16), DType::F32);
        assert_eq!(
            family.component_dtype("vae", &vae, DType::BF16),
            DType::BF16
        );
        assert_eq!(family.component_dtype("vae", &vae, DType::F32), DType::F32);
        let unet = fixture("model/unet");
        assert_eq!(
            family.component_dtype("unet", &unet, DType::F16),
            DType::F16
        );
        let sd = super::super::stable_diffusion::StableDiffusion;
        assert_eq!(sd.component_dtype("vae", &vae, DType::F16), DType::F16);
    }

    #[test]
    fn folder_options_follow_model_index_with_diffusers_defaults() {
        let options = |folder: &str| folder_options(&ModelIndex::read(&fixture(folder)));
        assert_eq!(options("model"), FolderOptions::default());
        assert_eq!(
            options("refiner"),
            FolderOptions {
                force_zeros_for_empty_prompt: false,
                requires_aesthetics_score: true,
            }
        );
        assert_eq!(options("no-such-folder"), FolderOptions::default());
    }
}
