//! The Stable Diffusion 1.x/2.x loop, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`: encode the prompts (and negative prompts for
//! classifier-free guidance), start from seeded noise or from a noised encoding of an
//! input image, denoise with the chosen scheduler, decode with the VAE (or return the
//! latents).
//!
//! Components are held in `Arc`s so a cache can share them between pipelines; the
//! scheduler is built per request from the checkpoint's config plus overrides. The text
//! encoder, UNet and VAE run in the pipeline's dtype; latents and all scheduler arithmetic
//! stay in f32, converted at the model boundaries. Random draws come from a
//! [`NoiseSource`] in diffusers' order: initial latents (or, for image-to-image, the VAE's
//! latent sample and then the noise added to it), then any noise the scheduler draws.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use crate::pipelines::diffusion::{self, DecodeOptions, RunShape};
use crate::pipelines::family::{Phase, Progress};
use crate::pipelines::lora::{self, ActiveAdapters, Adapter};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::scheduler::{Scheduler, SchedulerConfig};
use crate::pipelines::torch_rng::TorchCpuGenerator;
use crate::pipelines::{ClipTokenizer, InComponent, PipelineError, TextEncoder, Unet, Vae};

const COMPONENT: &str = "pipeline";
/// Token sequence length of the CLIP text encoders SD 1.x and 2.x use.
pub const MAX_TOKENS: usize = 77;

/// A loaded Stable Diffusion pipeline.
#[derive(Debug, Clone)]
pub struct StableDiffusionPipeline {
    pub tokenizer: Arc<ClipTokenizer>,
    pub text_encoder: Arc<TextEncoder>,
    pub unet: Arc<Unet>,
    pub vae: Arc<Vae>,
    /// The checkpoint's own scheduler config (its class is the default scheduler).
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// LoRAs, run as branches beside the text encoder's and the UNet's layers.
    pub adapters: Vec<Adapter>,
}

/// One text-to-image or image-to-image request.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub prompts: Vec<String>,
    /// Used for every prompt; `None` means the empty prompt.
    pub negative_prompt: Option<String>,
    pub num_inference_steps: usize,
    /// Classifier-free guidance is used when this is above 1.
    pub guidance_scale: f64,
    /// Defaults to the UNet's sample size times the VAE scale factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_images_per_prompt: usize,
    /// Seeds every random draw [`StableDiffusionPipeline::generate`] makes.
    pub seed: u64,
    /// Initial latents (prompts * images per prompt, channels, height / scale, width / scale).
    /// Not allowed together with `init_image`.
    pub latents: Option<Tensor>,
    /// Scheduler class name; `None` uses the checkpoint's.
    pub scheduler_type: Option<String>,
    /// Scheduler config keys to override.
    pub scheduler_overrides: Map<String, Value>,
    /// Image-to-image: f32 images (1 or one per prompt, 3, H, W) in [0, 1]. The output has
    /// their size; `height` and `width`, if given, must match it.
    pub init_image: Option<Tensor>,
    /// Image-to-image: how much of the schedule to run, in [0, 1] (1 starts from pure
    /// noise, small values keep more of the image).
    pub strength: f64,
    /// Return the final latents (N, latent channels, h, w) instead of decoded images.
    pub output_latents: bool,
    /// Decode one image at a time (diffusers' `enable_slicing`): the same images, the
    /// decoder's activations for one image at a time.
    pub vae_slicing: bool,
    /// Decode in overlapping tiles (diffusers' `enable_tiling`), so large images fit.
    pub vae_tiling: bool,
    /// `cross_attention_kwargs={"scale": s}`: the factor on every LoRA's weight.
    pub lora_scale: f64,
}

impl Default for GenerateArgs {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompt: None,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            height: None,
            width: None,
            num_images_per_prompt: 1,
            seed: 0,
            latents: None,
            scheduler_type: None,
            scheduler_overrides: Map::new(),
            init_image: None,
            strength: 0.8,
            output_latents: false,
            vae_slicing: false,
            vae_tiling: false,
            lora_scale: 1.0,
        }
    }
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl StableDiffusionPipeline {
    /// Loads every component from a diffusers folder (`tokenizer/`, `text_encoder/`,
    /// `unet/`, `vae/`, `scheduler/`).
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        Ok(Self {
            tokenizer: Arc::new(ClipTokenizer::load(&model_dir.join("tokenizer"))?),
            text_encoder: Arc::new(TextEncoder::load(
                &model_dir.join("text_encoder"),
                dtype,
                device,
            )?),
            unet: Arc::new(Unet::load(&model_dir.join("unet"), dtype, device)?),
            vae: Arc::new(Vae::load(&model_dir.join("vae"), dtype, device)?),
            scheduler: SchedulerConfig::load(&model_dir.join("scheduler"))?,
            device: device.clone(),
            dtype,
            adapters: Vec::new(),
        })
    }

    /// Total size of the loaded weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.text_encoder.bytes() + self.unet.bytes() + self.vae.bytes()
    }

    /// The latent shape a request produces: (images, channels, height, width).
    pub fn latent_shape(&self, args: &GenerateArgs) -> Result<[usize; 4], PipelineError> {
        let scale = self.vae.scale_factor();
        let default_side = self.unet.sample_size() * scale;
        let image_size = match &args.init_image {
            Some(image) => {
                let (_, _, height, width) = image.dims4().in_component(COMPONENT)?;
                Some([height, width])
            }
            None => None,
        };
        let mut sides = [0; 2];
        for (index, (side, (name, requested))) in sides
            .iter_mut()
            .zip([("height", args.height), ("width", args.width)])
            .enumerate()
        {
            let value = match (image_size, requested) {
                (Some(image), Some(requested)) if image[index] != requested => {
                    return Err(PipelineError::invalid(
                        name,
                        format!(
                            "{requested} differs from the init image's {}; leave it unset",
                            image[index]
                        ),
                    ))
                }
                (Some(image), _) => image[index],
                (None, requested) => requested.unwrap_or(default_side),
            };
            if value == 0 || value % scale != 0 {
                return Err(PipelineError::invalid(
                    name,
                    format!("{value} is not a positive multiple of {scale}"),
                ));
            }
            *side = value / scale;
        }
        let images = args.prompts.len() * args.num_images_per_prompt;
        Ok([images, self.unet.in_channels(), sides[0], sides[1]])
    }

    /// About the most memory a run of `args` takes beyond the weights: the larger of a
    /// denoising step (classifier-free guidance doubles the batch) and the decode.
    pub fn activation_bytes(&self, args: &GenerateArgs) -> Result<u64, PipelineError> {
        let run = RunShape {
            latents: self.latent_shape(args)?,
            guided: args.guidance_scale > 1.0,
            output_latents: args.output_latents,
            decode: DecodeOptions {
                slicing: args.vae_slicing,
                tiling: args.vae_tiling,
            },
        };
        Ok(diffusion::activation_bytes(
            &self.unet, self.dtype, &self.vae, run,
        ))
    }

    /// Runs the whole pipeline with noise seeded from `args.seed`. Returns f32 images
    /// (N, 3, H, W) in [0, 1] on the CPU, N being prompts times images per prompt (each
    /// prompt's images together), or with `output_latents` the final latents
    /// (N, latent channels, H / scale, W / scale), f32 on the CPU.
    ///
    /// `on_progress` is called once before encoding, before every denoising step and, unless
    /// latents are returned, once before decoding; an error it returns stops the run and is
    /// returned as is. Image-to-image reports only the steps it runs.
    pub fn generate(
        &self,
        args: &GenerateArgs,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let mut noise = TorchCpuGenerator::new(args.seed);
        self.generate_with_noise(args, &mut noise, on_progress)
    }

    /// [`StableDiffusionPipeline::generate`] drawing every random tensor from `noise`
    /// instead of from `args.seed`.
    pub fn generate_with_noise(
        &self,
        args: &GenerateArgs,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        self.validate(args)?;
        let latent_shape = self.latent_shape(args)?;
        let mut scheduler = self.scheduler_for(args)?;
        scheduler.set_timesteps(args.num_inference_steps)?;
        let first_step = match &args.init_image {
            Some(_) => {
                let steps = args.num_inference_steps;
                diffusion::img2img_first_step(steps, args.strength, scheduler.as_ref())?
            }
            None => 0,
        };
        // Text-to-image starts from the given latents or from the first draw.
        let initial_latents = match &args.init_image {
            Some(_) => None,
            None => {
                let given = args.latents.as_ref();
                Some(diffusion::initial_noise(given, latent_shape, noise)?)
            }
        };
        diffusion::report_phase(on_progress, Phase::Encoding)?;
        let guided = args.guidance_scale > 1.0;
        let adapters = self.active_adapters(args.lora_scale)?;
        let text_embeddings = lora::with_adapters(adapters.text_encoder.as_ref(), || {
            self.encode_prompts(args, guided)
        })?;
        let latents = match (initial_latents, &args.init_image) {
            (Some(initial), _) => (initial * scheduler.init_noise_sigma())
                .and_then(|latents| latents.to_device(&self.device))
                .in_component(COMPONENT)?,
            (None, Some(image)) => {
                let scheduler = scheduler.as_ref();
                self.noised_image_latents(image, latent_shape, scheduler, first_step, noise)?
            }
            (None, None) => {
                return Err(PipelineError::invalid(
                    "init_image",
                    "neither initial latents nor an image to start from",
                ))
            }
        };
        let denoising = Denoising {
            scheduler: scheduler.as_mut(),
            first_step,
            text_embeddings: &text_embeddings,
            guidance_scale: args.guidance_scale,
            adapters: adapters.unet.as_ref(),
        };
        let latents = self.denoise(denoising, latents, noise, on_progress)?;
        if args.output_latents {
            return latents.to_device(&Device::Cpu).in_component(COMPONENT);
        }
        diffusion::report_phase(on_progress, Phase::Decoding)?;
        let options = DecodeOptions {
            slicing: args.vae_slicing,
            tiling: args.vae_tiling,
        };
        diffusion::decode_latents(&self.vae, &latents, options)
    }

    /// Runs the scheduler's steps from `first_step` on, with classifier-free guidance when
    /// the scale is above 1.
    fn denoise(
        &self,
        run: Denoising<'_>,
        mut latents: Tensor,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let guided = run.guidance_scale > 1.0;
        let timesteps = run.scheduler.timesteps().to_vec();
        let total = timesteps.len() - run.first_step;
        for (step_index, &timestep) in timesteps.iter().enumerate().skip(run.first_step) {
            on_progress(Progress {
                phase: Phase::Denoising,
                step: step_index - run.first_step,
                total,
            })?;
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0).in_component(COMPONENT)?
            } else {
                latents.clone()
            };
            let model_input = run
                .scheduler
                .scale_model_input(model_input, step_index)?
                .to_dtype(self.dtype)
                .in_component(COMPONENT)?;
            let prediction = lora::with_adapters(run.adapters, || {
                self.unet
                    .forward(&model_input, timestep, run.text_embeddings)
            })?
            .to_dtype(DType::F32)
            .in_component(COMPONENT)?;
            let prediction = match guided {
                true => {
                    diffusion::apply_guidance(&prediction, run.guidance_scale)
                        .in_component(COMPONENT)?
                        .0
                }
                false => prediction,
            };
            latents = run
                .scheduler
                .step(&prediction, step_index, &latents, noise)?;
        }
        Ok(latents)
    }

    /// The requested scheduler built from the checkpoint's config and the overrides.
    fn scheduler_for(&self, args: &GenerateArgs) -> Result<Box<dyn Scheduler>, PipelineError> {
        let requested = args.scheduler_type.as_deref();
        let (scheduler, _) =
            diffusion::scheduler_for(&self.scheduler, requested, &args.scheduler_overrides)?;
        Ok(scheduler)
    }

    fn validate(&self, args: &GenerateArgs) -> Result<(), PipelineError> {
        if args.prompts.is_empty() {
            return Err(PipelineError::invalid("prompts", "at least one is needed"));
        }
        if args.num_images_per_prompt == 0 {
            return Err(PipelineError::invalid(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        if args.num_inference_steps == 0 {
            return Err(PipelineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        if !args.guidance_scale.is_finite() {
            return Err(PipelineError::invalid(
                "guidance_scale",
                format!("{} is not a finite number", args.guidance_scale),
            ));
        }
        if let Some(image) = &args.init_image {
            if !(0.0..=1.0).contains(&args.strength) {
                return Err(PipelineError::invalid(
                    "strength",
                    format!("{} is not between 0 and 1", args.strength),
                ));
            }
            if args.latents.is_some() {
                return Err(PipelineError::invalid(
                    "latents",
                    "cannot be given together with init_image",
                ));
            }
            let count = match image.dims() {
                [count, 3, _, _] => *count,
                dims => {
                    return Err(PipelineError::invalid(
                        "init_image",
                        format!("expected shape [images, 3, height, width], got {dims:?}"),
                    ))
                }
            };
            if count != 1 && count != args.prompts.len() {
                return Err(PipelineError::invalid(
                    "init_image",
                    format!(
                        "{count} images for {} prompts; give one image or one per prompt",
                        args.prompts.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Image-to-image's starting latents: the VAE's latent sample of each image, scaled,
    /// repeated to the batch as diffusers repeats it (the whole set again for each further
    /// image per prompt), and noised to the first kept timestep.
    fn noised_image_latents(
        &self,
        image: &Tensor,
        shape: [usize; 4],
        scheduler: &dyn Scheduler,
        first_step: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let encoded = diffusion::encode_images(&self.vae, image, &self.device, noise)?;
        let encoded = diffusion::tile_to_batch(&encoded, shape[0])?;
        let added_noise = noise
            .next(encoded.dims())?
            .to_device(&self.device)
            .in_component(COMPONENT)?;
        scheduler.add_noise(&encoded, &added_noise, first_step)
    }

    /// The LoRA branches of this run on the text encoder and on the UNet, each adapter at
    /// its weight times `scale`.
    fn active_adapters(&self, scale: f64) -> Result<SdAdapters, PipelineError> {
        let place = (self.dtype, &self.device);
        let text_encoder_dtype = (self.text_encoder.dtype(), &self.device);
        Ok(SdAdapters {
            text_encoder: ActiveAdapters::build(
                "text_encoder",
                self.text_encoder.lora_modules(),
                &self.adapters,
                scale,
                text_encoder_dtype,
            )?,
            unet: ActiveAdapters::build(
                "unet",
                self.unet.lora_modules(),
                &self.adapters,
                scale,
                place,
            )?,
        })
    }

    /// Text embeddings in UNet batch order: with guidance, all negative rows first, then all
    /// prompt rows; each prompt repeated `num_images_per_prompt` times in a row.
    fn encode_prompts(&self, args: &GenerateArgs, guided: bool) -> Result<Tensor, PipelineError> {
        let repeat = args.num_images_per_prompt;
        let negative = args.negative_prompt.as_deref().unwrap_or("");
        let mut texts: Vec<&str> = Vec::new();
        if guided {
            texts.extend(std::iter::repeat_n(negative, args.prompts.len()));
        }
        texts.extend(args.prompts.iter().map(String::as_str));
        let token_ids = texts
            .iter()
            .map(|text| self.tokenizer.encode_padded(text, MAX_TOKENS))
            .collect::<Result<Vec<_>, _>>()?;
        let embeddings = self.text_encoder.encode(&token_ids)?;
        diffusion::repeat_rows(&embeddings, repeat).in_component("text encoder")
    }
}

/// What the denoising loop runs with.
struct Denoising<'a> {
    scheduler: &'a mut dyn Scheduler,
    /// The first timestep run (image to image skips the start of the schedule).
    first_step: usize,
    /// In UNet batch order: negative rows first when guided.
    text_embeddings: &'a Tensor,
    guidance_scale: f64,
    /// The UNet's LoRA branches for this run.
    adapters: Option<&'a Arc<ActiveAdapters>>,
}

/// A run's LoRA branches, per component.
struct SdAdapters {
    text_encoder: Option<Arc<ActiveAdapters>>,
    unet: Option<Arc<ActiveAdapters>>,
}

/// f32 images (N, 3, H, W) in [0, 1] to 8-bit RGB, rounding as diffusers does
/// (`(x * 255).round()`, ties to even) and clamping to [0, 255].
pub fn images_to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
    const PART: &str = "image conversion";
    let (count, channels, height, width) = images.dims4().in_component(PART)?;
    if channels != 3 {
        return Err(PipelineError::invalid(
            "images",
            format!("expected 3 channels, got shape {:?}", images.dims()),
        ));
    }
    let values = images
        .to_device(&Device::Cpu)
        .and_then(|images| images.to_dtype(DType::F32))
        .and_then(|images| images.permute((0, 2, 3, 1)))
        .and_then(|images| images.flatten_all())
        .and_then(|images| images.to_vec1::<f32>())
        .in_component(PART)?;
    let image_len = height * width * 3;
    Ok((0..count)
        .map(|index| RgbImage {
            width,
            height,
            pixels: values[index * image_len..(index + 1) * image_len]
                .iter()
                .map(|value| (value * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}
