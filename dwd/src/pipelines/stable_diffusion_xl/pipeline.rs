//! The SDXL loop, as diffusers' `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` run it: encode the prompts through both text encoders
//! and build the micro-conditioning time ids; start from seeded noise (text to image), from
//! a noised VAE encoding of an image, or from an earlier step's latents (the refiner after a
//! base step's `denoising_end`); denoise with the chosen scheduler and classifier-free
//! guidance (optionally rescaled); decode with the VAE in its own dtype (float32 where
//! `force_upcast` asks for it), or return the latents.
//!
//! Random draws come from a [`NoiseSource`] in diffusers' order: the initial latents (or,
//! for image to image, the VAE's latent sample and then the added noise), then whatever the
//! scheduler draws.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::conditioning::{
    time_id_rows, time_ids, EncoderAdapters, MicroConditioning, PromptTexts, TextConditioning,
    TextEncoders, TimeIdLayout,
};
use crate::pipelines::diffusion::{self, DecodeOptions, RunShape};
use crate::pipelines::family::{Phase, Progress};
use crate::pipelines::lora::{self, ActiveAdapters, Adapter};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::scheduler::{Scheduler, SchedulerConfig};
use crate::pipelines::{InComponent, PipelineError, TextTime, TextTimeConfig, Unet, Vae};

const COMPONENT: &str = "pipeline";

/// What the folder's `model_index.json` says about the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderOptions {
    /// Zero negative embeddings when no `negative_prompt` is given (diffusers' default).
    pub force_zeros_for_empty_prompt: bool,
    /// The refiner's time ids: aesthetic scores in place of the target size.
    pub requires_aesthetics_score: bool,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions {
            force_zeros_for_empty_prompt: true,
            requires_aesthetics_score: false,
        }
    }
}

/// A loaded SDXL pipeline (base or refiner).
#[derive(Debug, Clone)]
pub struct StableDiffusionXlPipeline {
    pub text_encoders: TextEncoders,
    pub unet: Arc<Unet>,
    pub vae: Arc<Vae>,
    /// The checkpoint's own scheduler config (its class is the default scheduler).
    pub scheduler: SchedulerConfig,
    pub folder: FolderOptions,
    pub device: Device,
    pub dtype: DType,
    /// The LoRAs this pipeline was assembled with (`loras`), in list order.
    pub adapters: Vec<Adapter>,
}

/// What image to image starts from.
#[derive(Debug, Clone)]
pub enum StartImage {
    /// f32 images (N, 3, H, W) in [0, 1].
    Pixels(Tensor),
    /// Latents (N, latent channels, h, w) from an earlier step, used as they are.
    Latents(Tensor),
}

/// One request, with diffusers' defaults filled in by the caller.
#[derive(Debug, Clone)]
pub struct XlArgs {
    pub texts: PromptTexts,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub num_images_per_prompt: usize,
    /// Text to image: defaults to the UNet's sample size times the VAE scale factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Text to image: initial noise (images, channels, h, w).
    pub latents: Option<Tensor>,
    /// Image to image: where it starts; `None` is text to image.
    pub image: Option<StartImage>,
    pub strength: f64,
    /// Image to image: the fraction of the schedule already run (by a base step).
    pub denoising_start: Option<f64>,
    /// The fraction of the schedule to run, leaving the rest to a refiner.
    pub denoising_end: Option<f64>,
    pub micro: MicroConditioning,
    pub scheduler_type: Option<String>,
    pub scheduler_overrides: Map<String, Value>,
    pub output_latents: bool,
    pub decode: DecodeOptions,
    /// `cross_attention_kwargs={"scale": s}`: every LoRA's weight times this.
    pub lora_scale: f64,
}

impl Default for XlArgs {
    fn default() -> Self {
        XlArgs {
            texts: PromptTexts::default(),
            num_inference_steps: 50,
            guidance_scale: 5.0,
            guidance_rescale: 0.0,
            num_images_per_prompt: 1,
            height: None,
            width: None,
            latents: None,
            image: None,
            strength: 0.3,
            denoising_start: None,
            denoising_end: None,
            micro: MicroConditioning {
                aesthetic_score: 6.0,
                negative_aesthetic_score: 2.5,
                ..MicroConditioning::default()
            },
            scheduler_type: None,
            scheduler_overrides: Map::new(),
            output_latents: false,
            decode: DecodeOptions::default(),
            lora_scale: 1.0,
        }
    }
}

/// diffusers' `denoising_value_valid`: a fraction strictly between 0 and 1; other values
/// are ignored, as diffusers ignores them.
fn valid_fraction(value: Option<f64>) -> Option<f64> {
    value.filter(|v| *v > 0.0 && *v < 1.0)
}

/// The part of the schedule one request runs, and how it starts.
struct Schedule {
    scheduler: Box<dyn Scheduler>,
    /// The first and one past the last timestep index run.
    first: usize,
    end: usize,
}

impl StableDiffusionXlPipeline {
    /// Total size of the loaded weights in bytes.
    pub fn bytes(&self) -> u64 {
        let first = self.text_encoders.first.as_ref();
        first.map_or(0, |pair| pair.encoder.bytes())
            + self.text_encoders.second.encoder.bytes()
            + self.unet.bytes()
            + self.vae.bytes()
    }

    /// The latent shape a request produces: (images, channels, height, width).
    pub fn latent_shape(&self, args: &XlArgs) -> Result<[usize; 4], PipelineError> {
        let images = args.texts.prompts.len() * args.num_images_per_prompt;
        let channels = self.unet.in_channels();
        let scale = self.vae.scale_factor();
        let [height, width] = match &args.image {
            Some(StartImage::Latents(latents)) => match latents.dims() {
                [_, c, h, w] if *c == channels => [*h, *w],
                dims => {
                    return Err(PipelineError::invalid(
                        "image",
                        format!("takes latents of shape [images, {channels}, height, width] from an earlier step, got {dims:?}: that step's model makes other latents"),
                    ))
                }
            },
            Some(StartImage::Pixels(image)) => {
                let (_, _, h, w) = image.dims4().in_component(COMPONENT)?;
                [
                    checked_side("image height", h, scale)?,
                    checked_side("image width", w, scale)?,
                ]
            }
            None => {
                let default = self.unet.sample_size() * scale;
                let side = |name, value: Option<usize>| {
                    checked_side(name, value.unwrap_or(default), scale)
                };
                [side("height", args.height)?, side("width", args.width)?]
            }
        };
        Ok([images, channels, height, width])
    }

    /// About the most memory a run takes beyond the weights: the larger of a denoising step
    /// (classifier-free guidance doubles the batch) and the decode.
    pub fn activation_bytes(&self, args: &XlArgs) -> Result<u64, PipelineError> {
        let run = RunShape {
            latents: self.latent_shape(args)?,
            guided: args.guidance_scale > 1.0,
            output_latents: args.output_latents,
            decode: args.decode,
        };
        Ok(diffusion::activation_bytes(
            &self.unet, self.dtype, &self.vae, run,
        ))
    }

    /// Runs the whole pipeline. Returns f32 images (N, 3, H, W) in [0, 1] on the CPU, N
    /// being prompts times images per prompt (each prompt's images together), or with
    /// `output_latents` the final latents, f32 on the CPU.
    pub fn generate(
        &self,
        args: &XlArgs,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        validate(args)?;
        let shape = self.latent_shape(args)?;
        let mut schedule = self.schedule(args)?;
        // Text to image draws its noise first, before anything is encoded.
        let initial = match &args.image {
            Some(_) => None,
            None => Some(diffusion::initial_noise(
                args.latents.as_ref(),
                shape,
                noise,
            )?),
        };
        diffusion::report_phase(on_progress, Phase::Encoding)?;
        let guided = args.guidance_scale > 1.0;
        let adapters = self.active_adapters(args.lora_scale)?;
        let texts = self.text_encoders.encode(
            &args.texts,
            args.num_images_per_prompt,
            guided,
            self.folder.force_zeros_for_empty_prompt,
            &adapters.text_encoders,
        )?;
        let time_ids = self.time_ids(args, shape, guided)?;
        let latents = match (initial, &args.image) {
            (Some(initial), _) => (initial * schedule.scheduler.init_noise_sigma())
                .and_then(|latents| latents.to_device(&self.device))
                .in_component(COMPONENT)?,
            (None, Some(image)) => self.image_latents(image, shape, args, &schedule, noise)?,
            (None, None) => return Err(PipelineError::invalid("image", "nothing to start from")),
        };
        let conditions = Conditions {
            texts: &texts,
            time_ids: &time_ids,
            guidance_scale: args.guidance_scale,
            guidance_rescale: args.guidance_rescale,
            adapters: adapters.unet.as_ref(),
        };
        let latents = self.denoise(&mut schedule, &conditions, latents, noise, on_progress)?;
        if args.output_latents {
            return latents.to_device(&Device::Cpu).in_component(COMPONENT);
        }
        diffusion::report_phase(on_progress, Phase::Decoding)?;
        diffusion::decode_latents(&self.vae, &latents, args.decode)
    }

    /// The scheduler, set to the request's steps, and the part of its timesteps this run
    /// takes: image to image starts by `strength` or at `denoising_start`; `denoising_end`
    /// stops early.
    fn schedule(&self, args: &XlArgs) -> Result<Schedule, PipelineError> {
        let requested = args.scheduler_type.as_deref();
        let (mut scheduler, config) =
            diffusion::scheduler_for(&self.scheduler, requested, &args.scheduler_overrides)?;
        scheduler.set_timesteps(args.num_inference_steps)?;
        // The step's own training length, `from_config_args` included.
        let train_steps = config.num_train_timesteps.unwrap_or(1000) as f64;
        // diffusers: int(round(T - fraction * T)), Python rounding half to even.
        let cutoff = |fraction: f64| (train_steps - fraction * train_steps).round_ties_even();
        let timesteps = scheduler.timesteps().to_vec();
        let first = match (&args.image, valid_fraction(args.denoising_start)) {
            (None, _) => 0,
            (Some(_), None) => diffusion::img2img_first_step(
                args.num_inference_steps,
                args.strength,
                scheduler.as_ref(),
            )?,
            (Some(_), Some(start)) => {
                let cutoff = cutoff(start);
                let mut kept = timesteps.iter().filter(|t| **t < cutoff).count();
                if scheduler.order() == 2 && kept % 2 == 0 {
                    kept += 1;
                }
                timesteps.len().saturating_sub(kept)
            }
        };
        let end = match valid_fraction(args.denoising_end) {
            Some(fraction) => {
                let cutoff = cutoff(fraction);
                first + timesteps[first..].iter().filter(|t| **t >= cutoff).count()
            }
            None => timesteps.len(),
        };
        if first >= end {
            return Err(PipelineError::invalid(
                "num_inference_steps",
                format!(
                    "{} steps with these strength / denoising_start / denoising_end values leave no step to run",
                    args.num_inference_steps
                ),
            ));
        }
        Ok(Schedule {
            scheduler,
            first,
            end,
        })
    }

    /// The LoRA branches of this run on each text encoder and on the UNet, each adapter at
    /// its weight times `scale`.
    fn active_adapters(&self, scale: f64) -> Result<XlAdapters, PipelineError> {
        let encoders = &self.text_encoders;
        let build = |component: &str, modules, dtype| {
            ActiveAdapters::build(
                component,
                modules,
                &self.adapters,
                scale,
                (dtype, &self.device),
            )
        };
        let first = match &encoders.first {
            Some(pair) => build(
                "text_encoder",
                pair.encoder.lora_modules(),
                pair.encoder.dtype(),
            )?,
            None => None,
        };
        let second = &encoders.second.encoder;
        Ok(XlAdapters {
            text_encoders: EncoderAdapters {
                first,
                second: build("text_encoder_2", second.lora_modules(), second.dtype())?,
            },
            unet: build("unet", self.unet.lora_modules(), self.dtype)?,
        })
    }

    /// The time ids of every UNet row.
    fn time_ids(
        &self,
        args: &XlArgs,
        [images, _, height, width]: [usize; 4],
        guided: bool,
    ) -> Result<Tensor, PipelineError> {
        let scale = self.vae.scale_factor();
        let layout = match args.image {
            None => TimeIdLayout::TextToImage,
            Some(_) => TimeIdLayout::ImageToImage {
                requires_aesthetics_score: self.folder.requires_aesthetics_score,
            },
        };
        let size = (height * scale, width * scale);
        let projection_dim = self.text_encoders.projection_dim()?;
        let (positive, negative) =
            time_ids(&args.micro, layout, size, self.text_time()?, projection_dim)?;
        time_id_rows((&positive, &negative), images, guided, &self.device)
    }

    fn text_time(&self) -> Result<TextTimeConfig, PipelineError> {
        self.unet.text_time().ok_or_else(|| {
            PipelineError::invalid(
                "unet",
                "has no `addition_embed_type: \"text_time\"`: it is not an SDXL UNet",
            )
        })
    }

    /// Image to image's starting latents: given latents as they are, or the VAE's scaled
    /// latent sample of the images; repeated to the batch as diffusers repeats them (the
    /// whole set of images again for each further image per prompt); noised to the first
    /// timestep unless `denoising_start` says they already are.
    fn image_latents(
        &self,
        image: &StartImage,
        shape: [usize; 4],
        args: &XlArgs,
        schedule: &Schedule,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let encoded = match image {
            StartImage::Latents(latents) => latents
                .to_dtype(DType::F32)
                .and_then(|latents| latents.to_device(&self.device))
                .in_component(COMPONENT)?,
            StartImage::Pixels(images) => {
                diffusion::encode_images(&self.vae, images, &self.device, noise)?
            }
        };
        let latents = diffusion::tile_to_batch(&encoded, shape[0])?;
        if args.denoising_start.is_some() {
            return Ok(latents);
        }
        let added = noise
            .next(latents.dims())?
            .to_device(&self.device)
            .in_component(COMPONENT)?;
        schedule
            .scheduler
            .add_noise(&latents, &added, schedule.first)
    }

    /// Runs the scheduler's steps from `first` to `end`.
    fn denoise(
        &self,
        schedule: &mut Schedule,
        conditions: &Conditions<'_>,
        mut latents: Tensor,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let timesteps = schedule.scheduler.timesteps().to_vec();
        let total = schedule.end - schedule.first;
        let run = timesteps.iter().enumerate().take(schedule.end);
        for (step_index, &timestep) in run.skip(schedule.first) {
            on_progress(Progress {
                phase: Phase::Denoising,
                step: step_index - schedule.first,
                total,
            })?;
            let prediction = self.predict(
                schedule.scheduler.as_ref(),
                conditions,
                &latents,
                (step_index, timestep),
            )?;
            latents = schedule
                .scheduler
                .step(&prediction, step_index, &latents, noise)?;
        }
        Ok(latents)
    }

    /// One guided noise prediction at `(step_index, timestep)`.
    fn predict(
        &self,
        scheduler: &dyn Scheduler,
        conditions: &Conditions<'_>,
        latents: &Tensor,
        (step_index, timestep): (usize, f64),
    ) -> Result<Tensor, PipelineError> {
        let guided = conditions.guidance_scale > 1.0;
        let model_input = match guided {
            true => Tensor::cat(&[latents, latents], 0).in_component(COMPONENT)?,
            false => latents.clone(),
        };
        let model_input = scheduler
            .scale_model_input(model_input, step_index)?
            .to_dtype(self.dtype)
            .in_component(COMPONENT)?;
        let to_model = |xs: &Tensor| xs.to_dtype(self.dtype).in_component(COMPONENT);
        let text_embeds = to_model(&conditions.texts.pooled)?;
        let hidden = to_model(&conditions.texts.hidden)?;
        let added = TextTime {
            text_embeds: &text_embeds,
            time_ids: conditions.time_ids,
        };
        let prediction = lora::with_adapters(conditions.adapters, || {
            self.unet
                .forward_with(&model_input, timestep, &hidden, Some(added))
        })?
        .to_dtype(DType::F32)
        .in_component(COMPONENT)?;
        if !guided {
            return Ok(prediction);
        }
        let guide = || -> candle_core::Result<Tensor> {
            let (guided, conditional) =
                diffusion::apply_guidance(&prediction, conditions.guidance_scale)?;
            match conditions.guidance_rescale > 0.0 {
                true => {
                    diffusion::rescale_guidance(&guided, &conditional, conditions.guidance_rescale)
                }
                false => Ok(guided),
            }
        };
        guide().in_component(COMPONENT)
    }
}

/// What every denoising step is conditioned on.
struct Conditions<'a> {
    texts: &'a TextConditioning,
    time_ids: &'a Tensor,
    guidance_scale: f64,
    guidance_rescale: f64,
    /// The UNet's LoRA branches for this run.
    adapters: Option<&'a Arc<ActiveAdapters>>,
}

/// The LoRA branches of one run, by component.
struct XlAdapters {
    text_encoders: EncoderAdapters,
    unet: Option<Arc<ActiveAdapters>>,
}

/// A side in latent pixels, refused unless a positive multiple of the VAE's scale.
fn checked_side(name: &str, value: usize, scale: usize) -> Result<usize, PipelineError> {
    if value == 0 || !value.is_multiple_of(scale) {
        return Err(PipelineError::invalid(
            name,
            format!("{value} is not a positive multiple of {scale}"),
        ));
    }
    Ok(value / scale)
}

/// diffusers' `check_inputs`, for what the argument table cannot say alone.
fn validate(args: &XlArgs) -> Result<(), PipelineError> {
    let prompts = args.texts.prompts.len();
    if prompts == 0 {
        return Err(PipelineError::invalid("prompt", "at least one is needed"));
    }
    if args.texts.prompt_2.is_some() && prompts > 1 {
        return Err(PipelineError::invalid(
            "prompt_2",
            format!("is one text, for {prompts} prompts; diffusers needs one prompt_2 per prompt, so give one prompt"),
        ));
    }
    if args.image.is_some() && args.latents.is_some() {
        return Err(PipelineError::invalid(
            "latents",
            "cannot be given together with `image`",
        ));
    }
    if let (Some(start), Some(end)) = (
        valid_fraction(args.denoising_start),
        valid_fraction(args.denoising_end),
    ) {
        if start >= end {
            return Err(PipelineError::invalid(
                "denoising_start",
                format!("{start} cannot be larger than or equal to `denoising_end` {end}"),
            ));
        }
    }
    Ok(())
}
