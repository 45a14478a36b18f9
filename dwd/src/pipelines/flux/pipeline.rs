//! The FLUX.1 loop, as diffusers' `FluxPipeline`, `FluxImg2ImgPipeline` and
//! `FluxFillPipeline` run it: CLIP's
//! pooled output and T5's states for the prompt; seeded noise drawn as unpacked latents
//! (images, 16, h, w) and packed into 2x2-patch tokens (image to image: the image's shifted
//! and scaled VAE sample, noised to the first step `strength` keeps); a flow-match schedule
//! shifted for the image's token count; for Fill, the masked image's VAE sample and the
//! mask, packed beside the latents as the fill model's extra input channels;
//! one transformer call per step (two with true classifier-free guidance); the packed
//! latents unpacked, unscaled, shifted and decoded.
//!
//! FLUX.1-dev embeds `guidance_scale` in the model; schnell has no guidance embedder and
//! ignores it (with a notice). Random draws come from a [`NoiseSource`] in diffusers' order:
//! the initial latents (image to image and fill: the VAE's posterior sample, then the added
//! noise; fill: then the masked image's posterior sample), then whatever the scheduler
//! draws (`stochastic_sampling`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::transformer::{FluxInputs, FluxTransformer};
use crate::pipelines::diffusion::{self, DecodeOptions};
use crate::pipelines::family::{Phase, Progress};
use crate::pipelines::lora::{self, ActiveAdapters, Adapter};
use crate::pipelines::noise::NoiseSource;
use crate::pipelines::placement::Placed;
use crate::pipelines::scheduler::{
    calculate_shift, first_kept_step, linspace, FlowMatchEulerDiscreteScheduler, FlowSchedule,
    SchedulerConfig,
};
use crate::pipelines::{
    ClipTokenizer, InComponent, PipelineError, T5Encoder, T5Tokenizer, TextEncoder, Vae,
};

const COMPONENT: &str = "pipeline";
/// diffusers' `default_sample_size`: 128 latent pixels, 1024 image pixels.
const DEFAULT_SAMPLE_SIZE: usize = 128;
/// The `max_shift` FLUX's `calculate_shift` uses where the scheduler config has none.
const FLUX_MAX_SHIFT: f64 = 1.15;
/// CLIP's prompt length in FLUX (`tokenizer_max_length`).
const CLIP_MAX_LENGTH: usize = 77;

/// A loaded FLUX pipeline.
#[derive(Debug, Clone)]
pub struct FluxPipeline {
    pub tokenizer: Arc<ClipTokenizer>,
    pub text_encoder: Arc<TextEncoder>,
    pub tokenizer_2: Arc<T5Tokenizer>,
    /// T5, resident or (model offload) placed on the device only while it encodes.
    pub text_encoder_2: Placed<T5Encoder>,
    /// Resident or (model offload) placed on the device only while it denoises.
    pub transformer: Placed<FluxTransformer>,
    pub vae: Arc<Vae>,
    /// The checkpoint's scheduler config.
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// Sequential offload: the offloaded transformer's blocks are built on the device each
    /// only while it runs.
    pub stream_blocks: bool,
    /// LoRAs, run as branches beside CLIP's and the transformer's layers.
    pub adapters: Vec<Adapter>,
}

/// One request, with diffusers' defaults filled in by the caller.
#[derive(Debug, Clone)]
pub struct FluxArgs {
    pub prompts: Vec<String>,
    /// T5's prompt; the CLIP prompt when absent.
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// Real classifier-free guidance, with `negative_prompt`, above 1.
    pub true_cfg_scale: f64,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    /// The schedule's sigmas; FLUX's `linspace(1, 1/n, n)` when absent.
    pub sigmas: Option<Vec<f64>>,
    pub guidance_scale: f64,
    pub num_images_per_prompt: usize,
    /// Initial noise, packed (images, tokens, 64) or unpacked (images, 16, h, w).
    pub latents: Option<Tensor>,
    /// Image to image: f32 images (N, 3, H, W) in [0, 1], already `height` x `width`.
    pub image: Option<Tensor>,
    /// Image to image: how much of the schedule runs (diffusers' default 0.6).
    pub strength: f64,
    /// Fill: f32 images (N, 3, H, W) in [0, 1], the size of `image`; where the mask (as
    /// PIL's grayscale, at least half bright) is white, the image is repainted.
    pub mask_image: Option<Tensor>,
    pub max_sequence_length: usize,
    pub scheduler_overrides: Map<String, Value>,
    pub output_latents: bool,
    pub decode: DecodeOptions,
    /// `joint_attention_kwargs={"scale": s}`: the factor on every LoRA's weight.
    pub lora_scale: f64,
}

impl Default for FluxArgs {
    fn default() -> Self {
        FluxArgs {
            prompts: Vec::new(),
            prompt_2: None,
            negative_prompt: None,
            negative_prompt_2: None,
            true_cfg_scale: 1.0,
            height: None,
            width: None,
            num_inference_steps: 28,
            sigmas: None,
            guidance_scale: 3.5,
            num_images_per_prompt: 1,
            latents: None,
            image: None,
            strength: 0.6,
            mask_image: None,
            max_sequence_length: 512,
            scheduler_overrides: Map::new(),
            output_latents: false,
            decode: DecodeOptions::default(),
            lora_scale: 1.0,
        }
    }
}

/// The size of a run in latent pixels: (images, channels, height, width), unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    pub images: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentShape {
    /// Tokens per image once packed: one per 2x2 patch.
    pub fn tokens(&self) -> usize {
        (self.height / 2) * (self.width / 2)
    }

    /// Each token's 3-axis id: `[0, row, column]` of its patch.
    pub fn image_ids(&self) -> Vec<[f32; 3]> {
        let (rows, columns) = (self.height / 2, self.width / 2);
        (0..rows)
            .flat_map(|r| (0..columns).map(move |c| [0.0, r as f32, c as f32]))
            .collect()
    }
}

/// The prompt's conditioning: T5's states and CLIP's pooled output, a row per image.
struct Conditioning {
    states: Tensor,
    pooled: Tensor,
}

impl FluxPipeline {
    /// Total size of the loaded weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.text_encoder.bytes()
            + self.text_encoder_2.model().bytes()
            + self.transformer.model().bytes()
            + self.vae.bytes()
    }

    /// The unpacked latent shape of a request: diffusers' `2 * (side // 16)` per side.
    pub fn latent_shape(&self, args: &FluxArgs) -> Result<LatentShape, PipelineError> {
        let scale = self.vae.scale_factor();
        let default = DEFAULT_SAMPLE_SIZE * scale;
        let side = |name: &str, value: Option<usize>| -> Result<usize, PipelineError> {
            let value = value.unwrap_or(default);
            match 2 * (value / (scale * 2)) {
                0 => Err(PipelineError::invalid(
                    name,
                    format!(
                        "{value} is smaller than FLUX's smallest side, {}",
                        scale * 2
                    ),
                )),
                latent => Ok(latent),
            }
        };
        Ok(LatentShape {
            images: args.prompts.len() * args.num_images_per_prompt,
            channels: self.vae.latent_channels(),
            height: side("height", args.height)?,
            width: side("width", args.width)?,
        })
    }

    /// About the most memory a run takes beyond the weights: the larger of a transformer
    /// call (the joined sequence's activations and one head's attention scores at a time
    /// per row) and the decode.
    pub fn activation_bytes(&self, args: &FluxArgs) -> Result<u64, PipelineError> {
        let shape = self.latent_shape(args)?;
        let config = self.transformer.model().config();
        let element = match self.device.is_cpu() {
            true => 4,
            false => self.dtype.size_in_bytes() as u64,
        };
        let tokens = (shape.tokens() + args.max_sequence_length) as u64;
        let width = config.inner_dim() as u64;
        // q, k, v, attention out, the 4x MLP and the 5x projection input of a single block.
        let per_token = 14 * width * element;
        let scores = config.num_attention_heads as u64 * tokens * tokens * 4;
        let step = shape.images as u64 * (tokens * per_token + scores);
        let decode = match args.output_latents {
            true => 0,
            false => {
                let scale = self.vae.scale_factor();
                self.vae.decode_activation_bytes(
                    shape.images,
                    shape.height * scale,
                    shape.width * scale,
                    element as usize,
                    args.decode.slicing,
                    args.decode.tiling,
                )
            }
        };
        // Under offload on a GPU, one of T5 and the transformer joins them there; streamed,
        // the transformer a block at a time (a double block weighs about two single ones).
        let blocks = (2 * config.num_layers + config.num_single_layers).max(1) as u64;
        let transformer = match self.stream_blocks {
            true => self.transformer.placed_bytes() * 2 / blocks,
            false => self.transformer.placed_bytes(),
        };
        let placed = match self.device.is_cpu() {
            true => 0,
            false => self.text_encoder_2.placed_bytes().max(transformer),
        };
        Ok(step.max(decode) + placed)
    }

    /// Runs the whole pipeline: f32 images (N, 3, H, W) in [0, 1] on the CPU, each prompt's
    /// images together; or with `output_latents` the final packed latents, as diffusers'
    /// `output_type="latent"` gives them.
    pub fn generate(
        &self,
        args: &FluxArgs,
        noise: &mut dyn NoiseSource,
        notice: &mut dyn FnMut(String),
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        validate(args)?;
        let shape = self.latent_shape(args)?;
        self.check_transformer_input(args, shape)?;
        let guidance = self.embedded_guidance(args, notice);
        let true_cfg = self.true_cfg(args, notice);
        diffusion::report_phase(on_progress, Phase::Encoding)?;
        let adapters = self.active_adapters(args.lora_scale)?;
        let texts = (args.prompts.as_slice(), args.prompt_2.as_deref());
        // Under model offload T5, then the transformer, is on the device, never both.
        let t5 = self.text_encoder_2.on(&self.device, "text_encoder_2")?;
        let positive = self.encode(texts, (args, &adapters, &t5), notice)?;
        let negative = match true_cfg {
            true => Some(self.encode_negative((args, &adapters, &t5), notice)?),
            false => None,
        };
        drop(t5);
        let (mut scheduler, first) = self.scheduler(args, shape)?;
        let latents = match &args.image {
            Some(image) if args.latents.is_none() => {
                self.image_latents(image, shape, (&scheduler, first), noise)?
            }
            _ => self.initial_latents(args, shape, noise)?,
        };
        let condition = match (&args.image, &args.mask_image) {
            (Some(image), Some(mask)) => Some(self.fill_condition(image, mask, shape, noise)?),
            _ => None,
        };
        let transformer =
            self.transformer
                .place(&self.device, "transformer", self.stream_blocks)?;
        let calls = Calls {
            transformer: &transformer,
            positive: &positive,
            negative: negative.as_ref(),
            guidance,
            true_cfg_scale: args.true_cfg_scale,
            condition: condition.as_ref(),
            txt_ids: vec![[0.0; 3]; args.max_sequence_length],
            img_ids: shape.image_ids(),
            adapters: adapters.transformer.as_ref(),
        };
        let latents = self.denoise((&mut scheduler, first), &calls, latents, noise, on_progress)?;
        drop(transformer);
        if args.output_latents {
            return latents.to_device(&Device::Cpu).in_component(COMPONENT);
        }
        diffusion::report_phase(on_progress, Phase::Decoding)?;
        let unpacked = unpack(&latents, shape).in_component(COMPONENT)?;
        let shift = self.vae.config().shift_factor.unwrap_or(0.0);
        let unscaled = ((unpacked / self.vae.scaling_factor()).and_then(|z| z + shift))
            .in_component(COMPONENT)?;
        diffusion::decode_unscaled(&self.vae, &unscaled, args.decode)
    }

    /// Image to image's starting latents for `args` (packed), drawing as a run draws: what
    /// a run denoises from, for inspection and tests.
    pub fn start_latents(
        &self,
        args: &FluxArgs,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let shape = self.latent_shape(args)?;
        let (scheduler, first) = self.scheduler(args, shape)?;
        let image = args
            .image
            .as_ref()
            .ok_or_else(|| PipelineError::invalid("image", "is needed to start from one"))?;
        self.image_latents(image, shape, (&scheduler, first), noise)
    }

    /// The transformer must take what this pipeline gives it: packed latents (4 per latent
    /// channel) and, for fill, the packed masked-image latents and the packed mask (4 per
    /// pixel of a latent's square), as FLUX.1-Fill's 384 channels are.
    fn check_transformer_input(
        &self,
        args: &FluxArgs,
        shape: LatentShape,
    ) -> Result<(), PipelineError> {
        let packed = 4 * shape.channels;
        let scale = self.vae.scale_factor();
        let fill = args.mask_image.is_some();
        let wanted = match fill {
            true => 2 * packed + 4 * scale * scale,
            false => packed,
        };
        let has = self.transformer.model().config().in_channels;
        if has == wanted {
            return Ok(());
        }
        let (class, model) = match fill {
            true => ("FluxFillPipeline", "a fill model such as FLUX.1-Fill-dev"),
            false => ("FluxPipeline and FluxImg2ImgPipeline", "a text-to-image model such as FLUX.1-dev or -schnell (FLUX.1-Fill's 384 channels go with FluxFillPipeline)"),
        };
        Err(PipelineError::invalid(
            "transformer",
            format!("takes {has} input channels; {class} gives {wanted}: use {model}"),
        ))
    }

    /// Fill's extra input: the masked image (`image * (1 - mask)` in [-1, 1]) through the
    /// VAE, shifted, scaled and packed, then the mask folded into a latent's 8x8 squares and
    /// packed, joined on the channels (diffusers' `prepare_mask_latents`).
    pub fn fill_condition(
        &self,
        image: &Tensor,
        mask: &Tensor,
        shape: LatentShape,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let (image_dims, mask_dims) = (image.dims(), mask.dims());
        if image_dims[2..] != mask_dims[2..] {
            return Err(PipelineError::invalid(
                "mask_image",
                format!(
                    "is {}x{}, the image {}x{}: they must be the same size",
                    mask_dims[3], mask_dims[2], image_dims[3], image_dims[2]
                ),
            ));
        }
        let mask = binary_mask(mask)?;
        let masked = image
            .affine(2.0, -1.0)
            .and_then(|pixels| pixels.broadcast_mul(&(1.0 - &mask)?))
            .in_component(COMPONENT)?;
        let sample =
            diffusion::posterior_sample_of_pixels(&self.vae, &masked, &self.device, noise)?;
        let shift = self.vae.config().shift_factor.unwrap_or(0.0);
        let latents = (sample - shift)
            .and_then(|z| z * self.vae.scaling_factor())
            .in_component(COMPONENT)?;
        let latents = diffusion::tile_to_batch(&latents, shape.images)?;
        let mask = diffusion::tile_to_batch(&mask, shape.images)?;
        let folded = fold_mask(&mask, shape, self.vae.scale_factor()).in_component(COMPONENT)?;
        let joined = pack(&latents).and_then(|latents| Tensor::cat(&[latents, pack(&folded)?], 2));
        joined
            .and_then(|joined| joined.to_device(&self.device))
            .in_component(COMPONENT)
    }

    /// The guidance the model embeds: FLUX.1-dev's `guidance_scale`; none for a model
    /// without a guidance embedder, which ignores the argument.
    fn embedded_guidance(&self, args: &FluxArgs, notice: &mut dyn FnMut(String)) -> Option<f32> {
        if self.transformer.model().has_guidance() {
            return Some(args.guidance_scale as f32);
        }
        if args.guidance_scale != FluxArgs::default().guidance_scale {
            notice(format!(
                "`guidance_scale` {} has no effect: this transformer has no guidance embedder (FLUX.1-schnell), so diffusers ignores it",
                args.guidance_scale
            ));
        }
        None
    }

    /// Whether true classifier-free guidance runs: `true_cfg_scale` above 1 with a
    /// `negative_prompt`, as diffusers decides it.
    fn true_cfg(&self, args: &FluxArgs, notice: &mut dyn FnMut(String)) -> bool {
        let has_negative = args.negative_prompt.is_some();
        match (args.true_cfg_scale > 1.0, has_negative) {
            (true, true) => true,
            (true, false) => {
                notice(format!(
                    "`true_cfg_scale` {} has no effect without a `negative_prompt`",
                    args.true_cfg_scale
                ));
                false
            }
            (false, true) => {
                notice(
                    "`negative_prompt` has no effect unless `true_cfg_scale` is above 1"
                        .to_string(),
                );
                false
            }
            (false, false) => false,
        }
    }

    /// diffusers' `encode_prompt`: CLIP's pooled output of each prompt, T5's states of
    /// `prompt_2` (else the prompt), each repeated for the prompt's images.
    fn encode(
        &self,
        (prompts, prompt_2): (&[String], Option<&str>),
        (args, adapters, t5): (&FluxArgs, &FluxAdapters, &T5Encoder),
        notice: &mut dyn FnMut(String),
    ) -> Result<Conditioning, PipelineError> {
        self.notice_truncation(prompts, prompt_2, args, notice)?;
        let clip_ids = prompts
            .iter()
            .map(|p| self.tokenizer.encode_padded(p, CLIP_MAX_LENGTH))
            .collect::<Result<Vec<_>, _>>()?;
        let pooled = lora::with_adapters(adapters.text_encoder.as_ref(), || {
            self.text_encoder.encode_all(&clip_ids)
        })?
        .pooled;
        let t5_ids = t5_prompts(prompts, prompt_2)
            .iter()
            .map(|p| self.tokenizer_2.encode_padded(p, args.max_sequence_length))
            .collect::<Result<Vec<_>, _>>()?;
        let states = t5.encode(&t5_ids)?;
        let repeat = |xs: &Tensor| {
            diffusion::repeat_rows(xs, args.num_images_per_prompt)
                .and_then(|xs| xs.to_dtype(self.dtype))
        };
        Ok(Conditioning {
            states: repeat(&states).in_component(COMPONENT)?,
            pooled: repeat(&pooled).in_component(COMPONENT)?,
        })
    }

    /// The negative prompt's conditioning, one per prompt as diffusers repeats it.
    fn encode_negative(
        &self,
        (args, adapters, t5): (&FluxArgs, &FluxAdapters, &T5Encoder),
        notice: &mut dyn FnMut(String),
    ) -> Result<Conditioning, PipelineError> {
        let negative = args.negative_prompt.clone().unwrap_or_default();
        let negatives = vec![negative; args.prompts.len()];
        let texts = (negatives.as_slice(), args.negative_prompt_2.as_deref());
        self.encode(texts, (args, adapters, t5), notice)
    }

    /// The LoRA branches of this run on CLIP and on the transformer, each adapter at its
    /// weight times `scale`.
    fn active_adapters(&self, scale: f64) -> Result<FluxAdapters, PipelineError> {
        Ok(FluxAdapters {
            text_encoder: ActiveAdapters::build(
                "text_encoder",
                self.text_encoder.lora_modules(),
                &self.adapters,
                scale,
                (self.text_encoder.dtype(), &self.device),
            )?,
            transformer: ActiveAdapters::build(
                "transformer",
                self.transformer.model().lora_modules(),
                &self.adapters,
                scale,
                (self.dtype, &self.device),
            )?,
        })
    }

    /// diffusers warns when a prompt is longer than an encoder reads (77 CLIP tokens,
    /// `max_sequence_length` T5 tokens, each with its end token); so does dw, saying how
    /// many tokens were left out.
    fn notice_truncation(
        &self,
        prompts: &[String],
        prompt_2: Option<&str>,
        args: &FluxArgs,
        notice: &mut dyn FnMut(String),
    ) -> Result<(), PipelineError> {
        for prompt in prompts {
            let tokens = self.tokenizer.encode_body(prompt)?.len() + 2;
            if tokens > CLIP_MAX_LENGTH {
                notice(format!("the last {} of the prompt's {tokens} CLIP tokens were left out: CLIP reads {CLIP_MAX_LENGTH}", tokens - CLIP_MAX_LENGTH));
            }
        }
        let limit = args.max_sequence_length;
        for prompt in t5_prompts(prompts, prompt_2) {
            let tokens = self.tokenizer_2.encode_body(prompt)?.len() + 1;
            if tokens > limit {
                notice(format!("the last {} of the prompt's {tokens} T5 tokens were left out: `max_sequence_length` is {limit}", tokens - limit));
            }
        }
        Ok(())
    }

    /// The caller's latents (packed as given, or packed from unpacked ones), or a draw of
    /// unpacked noise, packed.
    fn initial_latents(
        &self,
        args: &FluxArgs,
        shape: LatentShape,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let packed_dims = [shape.images, shape.tokens(), shape.channels * 4];
        let unpacked_dims = [shape.images, shape.channels, shape.height, shape.width];
        let latents = match &args.latents {
            Some(given) if given.dims() == packed_dims => given.to_dtype(DType::F32).in_component(COMPONENT)?,
            Some(given) if given.dims() == unpacked_dims => pack(&given.to_dtype(DType::F32).in_component(COMPONENT)?)
                .in_component(COMPONENT)?,
            Some(given) => {
                return Err(PipelineError::invalid(
                    "latents",
                    format!("this run takes packed latents {packed_dims:?} or unpacked {unpacked_dims:?}, got {:?}", given.dims()),
                ))
            }
            None => pack(&noise.next(&unpacked_dims)?).in_component(COMPONENT)?,
        };
        latents.to_device(&self.device).in_component(COMPONENT)
    }

    /// The flow-match scheduler with the step's overrides, set to FLUX's sigmas shifted by
    /// the image's `mu`; and the first step to run (image to image skips the steps
    /// `strength` leaves out, as diffusers' `get_timesteps` does).
    fn scheduler(
        &self,
        args: &FluxArgs,
        shape: LatentShape,
    ) -> Result<(FlowMatchEulerDiscreteScheduler, usize), PipelineError> {
        let config = self.scheduler.with_overrides(&args.scheduler_overrides)?;
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config)?;
        let flow_sigmas =
            config.other.get("use_flow_sigmas").and_then(Value::as_bool) == Some(true);
        let steps = args.num_inference_steps;
        let sigmas = match (&args.sigmas, flow_sigmas) {
            (_, true) => None,
            (Some(given), false) => Some(given.clone()),
            (None, false) => Some(linspace(1.0, 1.0 / steps as f64, steps)),
        };
        let num_inference_steps = sigmas.as_ref().map_or(steps, Vec::len);
        let mu = calculate_shift(shape.tokens(), &config, FLUX_MAX_SHIFT)?;
        scheduler.set_timesteps(&FlowSchedule {
            num_inference_steps,
            sigmas,
            mu: Some(mu),
        })?;
        let first = match args.image {
            None => 0,
            Some(_) => first_kept_step(num_inference_steps, args.strength)?,
        };
        Ok((scheduler, first))
    }

    /// Image to image's start: the posterior sample of the images, shifted and scaled
    /// (`(z - shift_factor) * scaling_factor`), repeated to the batch, noised to the first
    /// step's sigma, packed.
    fn image_latents(
        &self,
        images: &Tensor,
        shape: LatentShape,
        (scheduler, first): (&FlowMatchEulerDiscreteScheduler, usize),
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, PipelineError> {
        let scale = self.vae.scale_factor();
        let want = (shape.height * scale, shape.width * scale);
        let latents = diffusion::shifted_image_latents(
            &self.vae,
            images,
            (want, "FluxImg2ImgPipeline"),
            &self.device,
            noise,
        )?;
        let latents = diffusion::tile_to_batch(&latents, shape.images)?;
        let added = noise
            .next(latents.dims())?
            .to_device(&self.device)
            .in_component(COMPONENT)?;
        let noised = scheduler.scale_noise(&latents, &added, first)?;
        pack(&noised).in_component(COMPONENT)
    }

    /// Every step of the schedule.
    fn denoise(
        &self,
        (scheduler, first): (&mut FlowMatchEulerDiscreteScheduler, usize),
        calls: &Calls<'_>,
        mut latents: Tensor,
        noise: &mut dyn NoiseSource,
        on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let timesteps = scheduler.timesteps().to_vec();
        for (index, &timestep) in timesteps.iter().enumerate().skip(first) {
            on_progress(Progress {
                phase: Phase::Denoising,
                step: index - first,
                total: timesteps.len() - first,
            })?;
            let velocity = self.predict(calls, &latents, timestep)?;
            let stepped = scheduler.step(&velocity, index, &latents, noise)?;
            // diffusers keeps the latents in the model's dtype between steps.
            latents = stepped
                .to_dtype(self.dtype)
                .and_then(|xs| xs.to_dtype(DType::F32))
                .in_component(COMPONENT)?;
        }
        Ok(latents)
    }

    /// One velocity prediction; with true CFG, `negative + scale * (positive - negative)`.
    fn predict(
        &self,
        calls: &Calls<'_>,
        latents: &Tensor,
        timestep: f64,
    ) -> Result<Tensor, PipelineError> {
        // The pipeline passes `t / 1000` in the latents' dtype.
        let timestep = timestep as f32 / 1000.0;
        let hidden = match calls.condition {
            Some(condition) => Tensor::cat(&[latents, condition], 2).in_component(COMPONENT)?,
            None => latents.clone(),
        };
        let call = |conditioning: &Conditioning| {
            lora::with_adapters(calls.adapters, || {
                calls.transformer.forward(&FluxInputs {
                    hidden_states: &hidden,
                    encoder_hidden_states: &conditioning.states,
                    pooled_projections: &conditioning.pooled,
                    timestep,
                    guidance: calls.guidance,
                    txt_ids: &calls.txt_ids,
                    img_ids: &calls.img_ids,
                })
            })
        };
        let positive = call(calls.positive)?;
        let Some(negative) = calls.negative else {
            return Ok(positive);
        };
        let negative = call(negative)?;
        let guided = (positive - &negative)
            .and_then(|difference| difference * calls.true_cfg_scale)
            .and_then(|scaled| negative + scaled);
        guided.in_component(COMPONENT)
    }
}

/// What every transformer call of a run shares.
struct Calls<'a> {
    /// The transformer, on the device for the run's steps.
    transformer: &'a FluxTransformer,
    positive: &'a Conditioning,
    negative: Option<&'a Conditioning>,
    guidance: Option<f32>,
    true_cfg_scale: f64,
    /// Fill's masked-image latents and mask, packed, joined to the latents' channels.
    condition: Option<&'a Tensor>,
    txt_ids: Vec<[f32; 3]>,
    img_ids: Vec<[f32; 3]>,
    /// The transformer's LoRA branches for this run.
    adapters: Option<&'a Arc<ActiveAdapters>>,
}

/// A run's LoRA branches, per component.
struct FluxAdapters {
    text_encoder: Option<Arc<ActiveAdapters>>,
    transformer: Option<Arc<ActiveAdapters>>,
}

/// What T5 reads: `prompt_2`, else the prompts (Python's `prompt_2 or prompt`, so an
/// empty `prompt_2` falls back too).
fn t5_prompts<'a>(prompts: &'a [String], prompt_2: Option<&'a str>) -> Vec<&'a str> {
    match prompt_2.filter(|p| !p.is_empty()) {
        Some(text) => vec![text],
        None => prompts.iter().map(String::as_str).collect(),
    }
}

/// diffusers' `_pack_latents`: (b, c, h, w) to (b, h/2 * w/2, 4c), each token a 2x2 patch
/// with its channels outermost.
pub fn pack(latents: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// diffusers' `_unpack_latents`, the inverse of [`pack`].
pub fn unpack(latents: &Tensor, shape: LatentShape) -> candle_core::Result<Tensor> {
    let (b, _, packed_channels) = latents.dims3()?;
    let (h, w) = (shape.height, shape.width);
    latents
        .reshape((b, h / 2, w / 2, packed_channels / 4, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, packed_channels / 4, h, w))
}

/// diffusers' mask preprocessing (`do_convert_grayscale`, `do_binarize`, no normalising):
/// PIL's 8-bit grayscale of each RGB pixel, `(19595 R + 38470 G + 7471 B + 2^15) >> 16`,
/// then 1 where it is at least half of 255 and 0 below. (N, 1, H, W) f32 from (N, 3, H, W)
/// images in [0, 1] whose values are 8-bit levels.
pub fn binary_mask(images: &Tensor) -> Result<Tensor, PipelineError> {
    let (n, _, h, w) = images.dims4().in_component(COMPONENT)?;
    let values = images
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .in_component(COMPONENT)?;
    let plane = h * w;
    let level = |x: f32| (x * 255.0).round().clamp(0.0, 255.0) as u32;
    let mut mask = Vec::with_capacity(n * plane);
    for image in values.chunks(3 * plane) {
        for i in 0..plane {
            let (r, g, b) = (
                level(image[i]),
                level(image[plane + i]),
                level(image[2 * plane + i]),
            );
            let gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            mask.push(if gray as f32 / 255.0 >= 0.5 {
                1.0f32
            } else {
                0.0
            });
        }
    }
    Tensor::from_vec(mask, (n, 1, h, w), &Device::Cpu).in_component(COMPONENT)
}

/// diffusers' fill mask to latent resolution: (B, 1, H, W) to (B, s*s, H/s, W/s), each
/// latent pixel's s x s square of mask pixels as channels (`view(b, h, s, w, s)
/// .permute(0, 2, 4, 1, 3)`).
fn fold_mask(mask: &Tensor, shape: LatentShape, scale: usize) -> candle_core::Result<Tensor> {
    let b = mask.dim(0)?;
    let (h, w) = (shape.height, shape.width);
    mask.reshape((b, h, scale, w, scale))?
        .permute((0, 2, 4, 1, 3))?
        .reshape((b, scale * scale, h, w))
}

/// diffusers' `check_inputs`, for what the argument table cannot say alone.
fn validate(args: &FluxArgs) -> Result<(), PipelineError> {
    let prompts = args.prompts.len();
    if prompts == 0 {
        return Err(PipelineError::invalid("prompt", "at least one is needed"));
    }
    if args.prompt_2.is_some() && prompts > 1 {
        return Err(PipelineError::invalid(
            "prompt_2",
            format!("is one text, for {prompts} prompts; diffusers needs one prompt_2 per prompt, so give one prompt"),
        ));
    }
    if args.max_sequence_length > 512 {
        return Err(PipelineError::invalid(
            "max_sequence_length",
            format!(
                "{} is over 512, the most diffusers' FluxPipeline takes",
                args.max_sequence_length
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers packs `view(b, c, h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5)`: token (r, c)
    /// holds channel-major 2x2 patches.
    #[test]
    fn packing_puts_each_2x2_patch_in_one_token_and_unpacking_reverses_it() {
        let values: Vec<f32> = (0..2 * 4 * 4).map(|v| v as f32).collect();
        let latents = Tensor::from_vec(values, (1, 2, 4, 4), &Device::Cpu).expect("latents");
        let packed = pack(&latents).expect("pack");
        assert_eq!(packed.dims(), [1, 4, 8]);
        let first = packed
            .get(0)
            .and_then(|t| t.get(0))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("row");
        // Channel 0's patch (0, 1, 4, 5), then channel 1's (16, 17, 20, 21).
        assert_eq!(first, [0.0, 1.0, 4.0, 5.0, 16.0, 17.0, 20.0, 21.0]);
        let shape = LatentShape {
            images: 1,
            channels: 2,
            height: 4,
            width: 4,
        };
        let back = unpack(&packed, shape).expect("unpack");
        let same = (back - &latents)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>());
        assert_eq!(same.expect("difference"), 0.0);
    }

    /// PIL's grayscale, then diffusers' binarize at 0.5: mid-gray 128 is in, 127 out; pure
    /// red is 76 (out), pure green 150 (in).
    #[test]
    fn masks_are_pil_grayscale_binarized_at_half() {
        let level = |v: f32| v / 255.0;
        let pixels = [
            [128.0, 128.0, 128.0],
            [127.0, 127.0, 127.0],
            [255.0, 0.0, 0.0],
            [0.0, 255.0, 0.0],
        ];
        let mut planes = vec![Vec::new(); 3];
        for pixel in pixels {
            for (plane, value) in planes.iter_mut().zip(pixel) {
                plane.push(level(value));
            }
        }
        let data: Vec<f32> = planes.concat();
        let images = Tensor::from_vec(data, (1, 3, 1, 4), &Device::Cpu).expect("images");
        let mask = binary_mask(&images).expect("mask");
        assert_eq!(mask.dims(), [1, 1, 1, 4]);
        let values = mask
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values");
        assert_eq!(values, [1.0, 0.0, 0.0, 1.0]);
    }

    /// Channel `i * s + j` of latent pixel (r, c) is mask pixel (r * s + i, c * s + j).
    #[test]
    fn a_folded_mask_holds_each_latent_pixels_square_as_channels() {
        let values: Vec<f32> = (0..4 * 4).map(|v| v as f32).collect();
        let mask = Tensor::from_vec(values, (1, 1, 4, 4), &Device::Cpu).expect("mask");
        let shape = LatentShape {
            images: 1,
            channels: 16,
            height: 2,
            width: 2,
        };
        let folded = fold_mask(&mask, shape, 2).expect("fold");
        assert_eq!(folded.dims(), [1, 4, 2, 2]);
        let at = |k: usize, r: usize, c: usize| {
            folded
                .get(0)
                .and_then(|t| t.get(k))
                .and_then(|t| t.get(r))
                .and_then(|t| t.get(c))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("value")
        };
        // Latent pixel (1, 0), square element (i, j) = (1, 1): mask pixel (3, 1) = 13.
        assert_eq!(at(3, 1, 0), 13.0);
        // Latent pixel (0, 1), (i, j) = (0, 1): mask pixel (0, 3) = 3.
        assert_eq!(at(1, 0, 1), 3.0);
    }

    #[test]
    fn image_ids_number_the_patch_grid_row_major() {
        let shape = LatentShape {
            images: 1,
            channels: 16,
            height: 4,
            width: 6,
        };
        let ids = shape.image_ids();
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[0], [0.0, 0.0, 0.0]);
        assert_eq!(ids[2], [0.0, 0.0, 2.0]);
        assert_eq!(ids[3], [0.0, 1.0, 0.0]);
    }
}
