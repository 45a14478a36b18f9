//! The SD 3 loop, as diffusers' `StableDiffusion3Pipeline` and
//! `StableDiffusion3Img2ImgPipeline` run it: the prompt through CLIP-L and CLIP-G
//! (penultimate states side by side, zero-padded to T5's width) joined along the tokens
//! with T5's states (zeros when there is no T5), and their projected pooled outputs side by
//! side; seeded noise (image to image: the image's shifted, scaled VAE sample noised to the
//! first kept step); the flow-match schedule, shifted statically (and, as diffusers does,
//! starting from an already shifted `sigma_min`); classifier-free guidance with the
//! negative prompt first, optionally skip-layer guidance; decode after unscaling and
//! shifting.
//!
//! Random draws come from a [`NoiseSource`] in diffusers' order: the initial latents (image
//! to image: the VAE's posterior sample, then the added noise), then what the scheduler
//! draws.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::transformer::{Sd3Inputs, Sd3Transformer};
use crate::pipelines::diffusion::{self, DecodeOptions};
use crate::pipelines::family::{Phase, Progress};
use crate::pipelines::lora::{self, ActiveAdapters, Adapter};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::placement::Placed;
use crate::pipelines::scheduler::{
    calculate_shift, first_kept_step, FlowMatchEulerDiscreteScheduler, FlowSchedule,
    SchedulerConfig,
};
use crate::pipelines::{
    ClipTokenizer, InComponent, PipelineError, T5Encoder, T5Tokenizer, TextEncoder, Vae,
};

const COMPONENT: &str = "pipeline";
/// CLIP's prompt length (`tokenizer_max_length`).
const CLIP_MAX_LENGTH: usize = 77;
/// The `max_shift` SD 3's `calculate_shift` uses where the scheduler config has none.
const SD3_MAX_SHIFT: f64 = 1.16;

/// A CLIP tokenizer with its encoder.
#[derive(Debug, Clone)]
pub struct Clip {
    pub tokenizer: Arc<ClipTokenizer>,
    pub encoder: Arc<TextEncoder>,
}

/// T5's tokenizer with its encoder.
#[derive(Debug, Clone)]
pub struct T5 {
    pub tokenizer: Arc<T5Tokenizer>,
    /// Resident, or (offload) placed on the device only while it encodes.
    pub encoder: Placed<T5Encoder>,
}

/// A loaded SD 3 pipeline.
#[derive(Debug, Clone)]
pub struct StableDiffusion3Pipeline {
    pub clip_l: Clip,
    pub clip_g: Clip,
    /// `None`: the folder or the workflow leaves T5 out; zeros take its place.
    pub t5: Option<T5>,
    /// Resident, or (offload) placed on the device only while it denoises.
    pub transformer: Placed<Sd3Transformer>,
    pub vae: Arc<Vae>,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// Sequential offload: the offloaded transformer's blocks are built on the device each
    /// only while it runs.
    pub stream_blocks: bool,
    /// The LoRAs this pipeline was assembled with (`loras`), in list order.
    pub adapters: Vec<Adapter>,
}

/// The three prompts (and the three negatives) of one request.
#[derive(Debug, Clone, Default)]
pub struct Sd3Texts {
    pub prompts: Vec<String>,
    pub prompt_2: Option<String>,
    pub prompt_3: Option<String>,
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub negative_prompt_3: Option<String>,
}

/// Skip-layer guidance (SD 3.5 medium): which blocks the extra call leaves out, how much it
/// counts, and the part of the schedule it runs in.
#[derive(Debug, Clone)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f64,
    pub start: f64,
    pub stop: f64,
}

/// One request, with diffusers' defaults filled in by the caller.
#[derive(Debug, Clone)]
pub struct Sd3Args {
    pub texts: Sd3Texts,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    pub sigmas: Option<Vec<f64>>,
    pub guidance_scale: f64,
    pub num_images_per_prompt: usize,
    pub latents: Option<Tensor>,
    pub max_sequence_length: usize,
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// Image to image: f32 images (N, 3, H, W) in [0, 1], already `height` x `width`.
    pub image: Option<Tensor>,
    pub strength: f64,
    pub scheduler_overrides: Map<String, Value>,
    pub output_latents: bool,
    pub decode: DecodeOptions,
    /// `joint_attention_kwargs={"scale": s}`: every LoRA's weight times this.
    pub lora_scale: f64,
}

impl Default for Sd3Args {
    fn default() -> Self {
        Sd3Args {
            texts: Sd3Texts::default(),
            height: None,
            width: None,
            num_inference_steps: 28,
            sigmas: None,
            guidance_scale: 7.0,
            num_images_per_prompt: 1,
            latents: None,
            max_sequence_length: 256,
            skip_layer_guidance: None,
            image: None,
            strength: 0.6,
            scheduler_overrides: Map::new(),
            output_latents: false,
            decode: DecodeOptions::default(),
            lora_scale: 1.0,
        }
    }
}

/// The transformer's text conditioning, a row per image (negatives first under CFG).
pub struct Sd3Conditioning {
    /// (rows, 77 + T5 tokens, joint_attention_dim).
    pub prompt_embeds: Tensor,
    /// (rows, CLIP-L projection + CLIP-G projection).
    pub pooled_prompt_embeds: Tensor,
}

impl StableDiffusion3Pipeline {
    /// Total size of the loaded weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.clip_l.encoder.bytes()
            + self.clip_g.encoder.bytes()
            + self.t5.as_ref().map_or(0, |t5| t5.encoder.model().bytes())
            + self.transformer.model().bytes()
            + self.vae.bytes()
    }

    /// The latent shape of a request: (images, channels, height / 8, width / 8); sides must
    /// be multiples of 16 (the VAE's 8 times the transformer's 2x2 patches), as diffusers
    /// requires.
    pub fn latent_shape(&self, args: &Sd3Args) -> Result<[usize; 4], PipelineError> {
        let scale = self.vae.scale_factor();
        let multiple = scale * self.transformer.model().config().patch_size;
        let default = self.transformer.model().config().sample_size * scale;
        let side = |name: &str, value: Option<usize>| -> Result<usize, PipelineError> {
            let value = value.unwrap_or(default);
            match value > 0 && value.is_multiple_of(multiple) {
                true => Ok(value / scale),
                false => Err(PipelineError::invalid(
                    name,
                    format!(
                        "{value} is not a positive multiple of {multiple}; try {}",
                        (value / multiple).max(1) * multiple
                    ),
                )),
            }
        };
        let images = args.texts.prompts.len() * args.num_images_per_prompt;
        let channels = self.transformer.model().config().in_channels;
        Ok([
            images,
            channels,
            side("height", args.height)?,
            side("width", args.width)?,
        ])
    }

    /// About the most memory a run takes beyond the weights: a transformer call on the
    /// guided batch (the joined sequence's activations and one head's scores at a time per
    /// row) or the decode.
    pub fn activation_bytes(&self, args: &Sd3Args) -> Result<u64, PipelineError> {
        let [images, _, h, w] = self.latent_shape(args)?;
        let config = self.transformer.model().config();
        let element = match self.device.is_cpu() {
            true => 4,
            false => self.dtype.size_in_bytes() as u64,
        };
        let patch = config.patch_size;
        let tokens =
            ((h / patch) * (w / patch) + CLIP_MAX_LENGTH + args.max_sequence_length) as u64;
        let rows = match args.guidance_scale > 1.0 {
            true => 2 * images,
            false => images,
        } as u64;
        let width = config.inner_dim() as u64;
        let scores = config.num_attention_heads as u64 * tokens * tokens * 4;
        let step = rows * (tokens * 12 * width * element + scores);
        let decode = match args.output_latents {
            true => 0,
            false => {
                let scale = self.vae.scale_factor();
                self.vae.decode_activation_bytes(
                    images,
                    h * scale,
                    w * scale,
                    element as usize,
                    args.decode.slicing,
                    args.decode.tiling,
                )
            }
        };
        // Under offload on a GPU, one of T5 and the transformer joins them there; streamed,
        // the transformer a block at a time.
        let transformer = match self.stream_blocks {
            true => self.transformer.placed_bytes() / config.num_layers.max(1) as u64,
            false => self.transformer.placed_bytes(),
        };
        let t5 = self.t5.as_ref().map_or(0, |t5| t5.encoder.placed_bytes());
        let placed = match self.device.is_cpu() {
            true => 0,
            false => t5.max(transformer),
        };
        Ok(step.max(decode) + placed)
    }

    /// Runs the whole pipeline: f32 images (N, 3, H, W) in [0, 1] on the CPU, each prompt's
    /// images together; or with `output_latents` the final latents.
    pub fn generate(
        &self,
        args: &Sd3Args,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        validate(args)?;
        let shape = self.latent_shape(args)?;
        let guided = args.guidance_scale > 1.0;
        diffusion::report_phase(on_progress, Phase::Encoding)?;
        let positive = self.encode_prompt(&positive_texts(&args.texts), args)?;
        let conditioning = match guided {
            true => {
                let negative = self.encode_prompt(&negative_texts(&args.texts), args)?;
                Some(joined(&negative, &positive)?)
            }
            false => None,
        };
        let (mut scheduler, first) = self.scheduler(args, shape)?;
        let latents = match &args.image {
            Some(image) => self.image_latents(image, shape, (&scheduler, first), noise)?,
            None => diffusion::initial_noise(args.latents.as_ref(), shape, noise)?
                .to_device(&self.device)
                .in_component(COMPONENT)?,
        };
        let adapters = self.adapters_on("transformer", args.lora_scale)?;
        let transformer =
            self.transformer
                .place(&self.device, "transformer", self.stream_blocks)?;
        let run = Run {
            transformer: &transformer,
            positive: &positive,
            guided: conditioning.as_ref(),
            guidance_scale: args.guidance_scale,
            skip: args.skip_layer_guidance.as_ref(),
            adapters: adapters.as_ref(),
        };
        let latents = self.denoise((&mut scheduler, first), &run, latents, noise, on_progress)?;
        drop(transformer);
        if args.output_latents {
            return latents.to_device(&Device::Cpu).in_component(COMPONENT);
        }
        diffusion::report_phase(on_progress, Phase::Decoding)?;
        let shift = self.vae.config().shift_factor.unwrap_or(0.0);
        let unscaled = ((latents / self.vae.scaling_factor()).and_then(|z| z + shift))
            .in_component(COMPONENT)?;
        diffusion::decode_unscaled(&self.vae, &unscaled, args.decode)
    }

    /// diffusers' `encode_prompt` for one set of texts (`[prompt, prompt_2, prompt_3]` per
    /// row): CLIP-L's and CLIP-G's penultimate states side by side, zero-padded to T5's width,
    /// then T5's states (or zeros) after them; the projected pooled outputs side by side;
    /// each row repeated for its images.
    pub fn encode_prompt(
        &self,
        texts: &[[String; 3]],
        args: &Sd3Args,
    ) -> Result<Sd3Conditioning, PipelineError> {
        let clip = |clip: &Clip, index: usize| -> Result<(Tensor, Tensor), PipelineError> {
            let component = ["text_encoder", "text_encoder_2"][index];
            let ids = texts
                .iter()
                .map(|t| clip.tokenizer.encode_padded(&t[index], CLIP_MAX_LENGTH))
                .collect::<Result<Vec<_>, _>>()?;
            let adapters = self.adapters_on(component, args.lora_scale)?;
            let output = lora::with_adapters(adapters.as_ref(), || clip.encoder.encode_all(&ids))?;
            let pooled = output.text_embeds.ok_or_else(|| {
                PipelineError::invalid(
                    component,
                    "has no text_projection: SD 3 needs CLIPTextModelWithProjection",
                )
            })?;
            Ok((output.penultimate, pooled))
        };
        let (l_states, l_pooled) = clip(&self.clip_l, 0)?;
        let (g_states, g_pooled) = clip(&self.clip_g, 1)?;
        let t5_states = self.t5_states(texts, args)?;
        let joint = self.transformer.model().config().joint_attention_dim;
        let join = || -> candle_core::Result<(Tensor, Tensor)> {
            let clip_states = Tensor::cat(&[&l_states, &g_states], 2)?.to_dtype(DType::F32)?;
            let clip_width = clip_states.dim(2)?;
            let padded = clip_states.pad_with_zeros(2, 0, joint.saturating_sub(clip_width))?;
            let states = Tensor::cat(&[padded, t5_states.to_dtype(DType::F32)?], 1)?;
            let pooled = Tensor::cat(&[&l_pooled, &g_pooled], 1)?.to_dtype(DType::F32)?;
            let repeat = |xs: &Tensor| diffusion::repeat_rows(xs, args.num_images_per_prompt);
            Ok((repeat(&states)?, repeat(&pooled)?))
        };
        let (prompt_embeds, pooled_prompt_embeds) = join().in_component(COMPONENT)?;
        Ok(Sd3Conditioning {
            prompt_embeds,
            pooled_prompt_embeds,
        })
    }

    /// The LoRA branches of one component (`text_encoder`, `text_encoder_2` or
    /// `transformer`) for a run, each adapter at its weight times `scale`.
    fn adapters_on(
        &self,
        component: &str,
        scale: f64,
    ) -> Result<Option<Arc<ActiveAdapters>>, PipelineError> {
        let (modules, dtype) = match component {
            "text_encoder" => (
                self.clip_l.encoder.lora_modules(),
                self.clip_l.encoder.dtype(),
            ),
            "text_encoder_2" => (
                self.clip_g.encoder.lora_modules(),
                self.clip_g.encoder.dtype(),
            ),
            _ => {
                let transformer = self.transformer.model();
                (transformer.lora_modules(), transformer.dtype())
            }
        };
        ActiveAdapters::build(
            component,
            modules,
            &self.adapters,
            scale,
            (dtype, &self.device),
        )
    }

    /// T5's states of each row's third text, or zeros of T5's shape without a T5.
    fn t5_states(&self, texts: &[[String; 3]], args: &Sd3Args) -> Result<Tensor, PipelineError> {
        let Some(t5) = &self.t5 else {
            let joint = self.transformer.model().config().joint_attention_dim;
            let shape = (texts.len(), args.max_sequence_length, joint);
            return Tensor::zeros(shape, DType::F32, &self.device).in_component(COMPONENT);
        };
        let ids = texts
            .iter()
            .map(|t| t5.tokenizer.encode_padded(&t[2], args.max_sequence_length))
            .collect::<Result<Vec<_>, _>>()?;
        t5.encoder.on(&self.device, "text_encoder_3")?.encode(&ids)
    }

    /// The flow-match scheduler with the step's overrides, set to the run's steps (shifted
    /// by `mu` only where the config asks for dynamic shifting); and the first step to run.
    fn scheduler(
        &self,
        args: &Sd3Args,
        [_, _, h, w]: [usize; 4],
    ) -> Result<(FlowMatchEulerDiscreteScheduler, usize), PipelineError> {
        let config = self.scheduler.with_overrides(&args.scheduler_overrides)?;
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config)?;
        let mu = match scheduler.uses_dynamic_shifting() {
            true => {
                let patch = self.transformer.model().config().patch_size;
                Some(calculate_shift(
                    (h / patch) * (w / patch),
                    &config,
                    SD3_MAX_SHIFT,
                )?)
            }
            false => None,
        };
        let steps = args
            .sigmas
            .as_ref()
            .map_or(args.num_inference_steps, Vec::len);
        scheduler.set_timesteps(&FlowSchedule {
            num_inference_steps: steps,
            sigmas: args.sigmas.clone(),
            mu,
        })?;
        let first = match args.image {
            None => 0,
            Some(_) => first_kept_step(steps, args.strength)?,
        };
        Ok((scheduler, first))
    }

    /// Image to image's start: the images' posterior sample, shifted and scaled, repeated to
    /// the batch, noised to the first kept step's sigma.
    fn image_latents(
        &self,
        images: &Tensor,
        shape: [usize; 4],
        (scheduler, first): (&FlowMatchEulerDiscreteScheduler, usize),
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let scale = self.vae.scale_factor();
        let want = (shape[2] * scale, shape[3] * scale);
        let latents = diffusion::shifted_image_latents(
            &self.vae,
            images,
            (want, "StableDiffusion3Img2ImgPipeline"),
            &self.device,
            noise,
        )?;
        let latents = diffusion::tile_to_batch(&latents, shape[0])?;
        let added = noise
            .next(latents.dims())?
            .to_device(&self.device)
            .in_component(COMPONENT)?;
        scheduler.scale_noise(&latents, &added, first)
    }

    /// Every kept step of the schedule.
    fn denoise(
        &self,
        (scheduler, first): (&mut FlowMatchEulerDiscreteScheduler, usize),
        run: &Run<'_>,
        mut latents: Tensor,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - first;
        for (index, &timestep) in timesteps.iter().enumerate().skip(first) {
            on_progress(Progress {
                phase: Phase::Denoising,
                step: index - first,
                total,
            })?;
            let step = (index - first, total);
            let velocity = self.predict(run, &latents, timestep as f32, step)?;
            let stepped = scheduler.step(&velocity, index, &latents, noise)?;
            // diffusers keeps the latents in the model's dtype between steps.
            latents = stepped
                .to_dtype(self.dtype)
                .and_then(|xs| xs.to_dtype(DType::F32))
                .in_component(COMPONENT)?;
        }
        Ok(latents)
    }

    /// One velocity: guided as `uncond + scale * (text - uncond)`, plus skip-layer guidance
    /// `(text - skipped) * slg_scale` on the steps strictly between its start and stop.
    fn predict(
        &self,
        run: &Run<'_>,
        latents: &Tensor,
        timestep: f32,
        (i, steps): (usize, usize),
    ) -> Result<Tensor, PipelineError> {
        let call = |conditioning: &Sd3Conditioning, latents: &Tensor, skip: &[usize]| {
            let rows = latents.dim(0).in_component(COMPONENT)?;
            lora::with_adapters(run.adapters, || {
                run.transformer.forward(&Sd3Inputs {
                    hidden_states: latents,
                    encoder_hidden_states: &conditioning.prompt_embeds,
                    pooled_projections: &conditioning.pooled_prompt_embeds,
                    timesteps: &vec![timestep; rows],
                    skip_layers: skip,
                })
            })
        };
        let Some(guided) = run.guided else {
            return call(run.positive, latents, &[]);
        };
        let doubled = Tensor::cat(&[latents, latents], 0).in_component(COMPONENT)?;
        let prediction = call(guided, &doubled, &[])?;
        let (guided_prediction, text) =
            diffusion::apply_guidance(&prediction, run.guidance_scale).in_component(COMPONENT)?;
        let Some(skip) = run.skip.filter(|s| {
            let n = steps as f64;
            (i as f64) > n * s.start && (i as f64) < n * s.stop
        }) else {
            return Ok(guided_prediction);
        };
        let skipped = call(run.positive, latents, &skip.layers)?;
        let extra = (text - skipped).and_then(|d| d * skip.scale);
        extra
            .and_then(|extra| guided_prediction + extra)
            .in_component(COMPONENT)
    }
}

/// What every transformer call of a run shares.
struct Run<'a> {
    /// The transformer, on the device for the run's steps.
    transformer: &'a Sd3Transformer,
    positive: &'a Sd3Conditioning,
    /// `[negative, positive]` rows, under classifier-free guidance.
    guided: Option<&'a Sd3Conditioning>,
    guidance_scale: f64,
    skip: Option<&'a SkipLayerGuidance>,
    /// The transformer's LoRA branches for this run.
    adapters: Option<&'a Arc<ActiveAdapters>>,
}

/// The negative rows, then the positive ones, as diffusers batches them.
fn joined(
    negative: &Sd3Conditioning,
    positive: &Sd3Conditioning,
) -> Result<Sd3Conditioning, PipelineError> {
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0).in_component(COMPONENT);
    Ok(Sd3Conditioning {
        prompt_embeds: cat(&negative.prompt_embeds, &positive.prompt_embeds)?,
        pooled_prompt_embeds: cat(
            &negative.pooled_prompt_embeds,
            &positive.pooled_prompt_embeds,
        )?,
    })
}

/// Each prompt's three texts: `prompt_2` and `prompt_3` default to the prompt (Python's
/// `or`, so an empty one falls back too).
fn positive_texts(texts: &Sd3Texts) -> Vec<[String; 3]> {
    let or = |value: &Option<String>, fallback: &str| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| fallback.to_string())
    };
    texts
        .prompts
        .iter()
        .map(|p| [p.clone(), or(&texts.prompt_2, p), or(&texts.prompt_3, p)])
        .collect()
}

/// The negatives, one per prompt: `negative_prompt` (default ""), `negative_prompt_2` and
/// `_3` defaulting to it.
fn negative_texts(texts: &Sd3Texts) -> Vec<[String; 3]> {
    let first = texts.negative_prompt.clone().unwrap_or_default();
    let or = |value: &Option<String>| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| first.clone())
    };
    let row = [
        first.clone(),
        or(&texts.negative_prompt_2),
        or(&texts.negative_prompt_3),
    ];
    vec![row; texts.prompts.len()]
}

/// diffusers' `check_inputs`, for what the argument table cannot say alone.
fn validate(args: &Sd3Args) -> Result<(), PipelineError> {
    let prompts = args.texts.prompts.len();
    if prompts == 0 {
        return Err(PipelineError::invalid("prompt", "at least one is needed"));
    }
    for (name, value) in [
        ("prompt_2", &args.texts.prompt_2),
        ("prompt_3", &args.texts.prompt_3),
    ] {
        if value.is_some() && prompts > 1 {
            return Err(PipelineError::invalid(
                name,
                format!("is one text, for {prompts} prompts; diffusers needs one per prompt, so give one prompt"),
            ));
        }
    }
    if args.image.is_some() && args.latents.is_some() {
        return Err(PipelineError::invalid(
            "latents",
            "cannot be given together with `image`",
        ));
    }
    Ok(())
}
