//! The pieces every latent-diffusion loop shares, as diffusers' pipelines compute them:
//! the scheduler a step asks for, classifier-free guidance (and its rescale), the
//! image-to-image start (a noised VAE encoding at the first kept timestep), and decoding
//! latents to images in [0, 1].
//!
//! Latents and scheduler arithmetic stay in f32; models run in their own dtypes, converted
//! at their boundaries.

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::family::{Phase, Progress};
use super::noise::NoiseSource;
use super::scheduler::{build_scheduler, Scheduler, SchedulerConfig};
use super::{InComponent, PipelineError, Unet, Vae};

const COMPONENT: &str = "pipeline";

/// The scheduler a step names (its checkpoint's own when it names none), built from the
/// checkpoint's config with the step's overrides; and that config, which says what the
/// scheduler was built with (`num_train_timesteps`).
pub fn scheduler_for(
    shipped: &SchedulerConfig,
    requested: Option<&str>,
    overrides: &Map<String, Value>,
) -> Result<(Box<dyn Scheduler>, SchedulerConfig), PipelineError> {
    let class_name = match (requested, &shipped.class_name) {
        (Some(requested), _) => requested,
        (None, Some(shipped)) => shipped.as_str(),
        (None, None) => {
            return Err(PipelineError::invalid(
                "scheduler_type",
                "not given and the checkpoint's scheduler config names no class",
            ))
        }
    };
    let config = shipped.with_overrides(overrides)?;
    Ok((build_scheduler(class_name, &config)?, config))
}

/// Text to image's starting noise: the caller's latents, checked, or the first draw.
pub fn initial_noise(
    given: Option<&Tensor>,
    shape: [usize; 4],
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, PipelineError> {
    match given {
        Some(latents) => checked_latents(latents, shape),
        None => noise.next(&shape),
    }
}

/// Reports a phase that is one step (encoding, decoding).
pub fn report_phase(
    on_progress: &mut dyn FnMut(Progress) -> Result<(), PipelineError>,
    phase: Phase,
) -> Result<(), PipelineError> {
    on_progress(Progress {
        phase,
        step: 0,
        total: 1,
    })
}

/// The caller's initial latents as f32, checked against the expected shape.
pub fn checked_latents(latents: &Tensor, shape: [usize; 4]) -> Result<Tensor, PipelineError> {
    if latents.dims() != shape {
        return Err(PipelineError::invalid(
            "latents",
            format!("expected shape {shape:?}, got {:?}", latents.dims()),
        ));
    }
    latents.to_dtype(DType::F32).in_component(COMPONENT)
}

/// `uncond + scale * (text - uncond)` on a prediction batch holding the unconditional half
/// first; also gives back the conditional half, which the rescale needs.
pub fn apply_guidance(
    prediction: &Tensor,
    guidance_scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let halves = prediction.chunk(2, 0)?;
    let (unconditional, conditional) = (&halves[0], &halves[1]);
    let guided = (unconditional + ((conditional - unconditional)? * guidance_scale)?)?;
    Ok((guided, conditional.clone()))
}

/// diffusers' `rescale_noise_cfg` (Lin et al., "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed", 3.4): the guided prediction rescaled to the per-image standard
/// deviation (unbiased, over all but the batch axis) of the conditional one, mixed with
/// the unrescaled by `rescale`.
pub fn rescale_guidance(
    guided: &Tensor,
    conditional: &Tensor,
    rescale: f64,
) -> candle_core::Result<Tensor> {
    let rescaled =
        guided.broadcast_mul(&(per_image_std(conditional)? / per_image_std(guided)?)?)?;
    (rescaled * rescale)? + (guided * (1.0 - rescale))?
}

/// The unbiased standard deviation of each batch element, shaped (batch, 1, 1, 1).
fn per_image_std(xs: &Tensor) -> candle_core::Result<Tensor> {
    let batch = xs.dim(0)?;
    let flat = xs.flatten_from(1)?;
    let count = flat.dim(1)?;
    let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let variance = (centred.sqr()?.sum_keepdim(1)? / (count.max(2) - 1) as f64)?;
    let mut shape = vec![batch];
    shape.extend(std::iter::repeat_n(1, xs.rank() - 1));
    variance.sqrt()?.reshape(shape)
}

/// Each row of `xs` repeated `repeat` times in a row (diffusers' `repeat_interleave` on the
/// batch axis: each prompt's images together).
pub fn repeat_rows(xs: &Tensor, repeat: usize) -> candle_core::Result<Tensor> {
    if repeat == 1 {
        return Ok(xs.clone());
    }
    let mut shape = xs.dims().to_vec();
    let mut repeats = vec![1; shape.len() + 1];
    repeats[1] = repeat;
    shape[0] *= repeat;
    xs.unsqueeze(1)?.repeat(repeats)?.reshape(shape)
}

/// Image to image's starting latents repeated to `batch` rows as diffusers repeats them:
/// the whole set of images again for each further image per prompt (`[a, b, a, b]`); a
/// count that does not divide the batch is refused.
pub fn tile_to_batch(latents: &Tensor, batch: usize) -> Result<Tensor, PipelineError> {
    let given = latents.dim(0).in_component(COMPONENT)?;
    if given == 0 || !batch.is_multiple_of(given) {
        return Err(PipelineError::invalid(
            "image",
            format!("{given} images cannot be repeated to {batch} (prompts times num_images_per_prompt)"),
        ));
    }
    let copies = vec![latents; batch / given];
    Tensor::cat(&copies, 0).in_component(COMPONENT)
}

/// The index of the first timestep image-to-image runs at `strength` (diffusers'
/// `get_timesteps`); a strength that keeps no step is refused.
pub fn img2img_first_step(
    steps: usize,
    strength: f64,
    scheduler: &dyn Scheduler,
) -> Result<usize, PipelineError> {
    let kept = ((steps as f64 * strength) as usize).min(steps);
    let first = (steps - kept) * scheduler.order();
    if first >= scheduler.timesteps().len() {
        return Err(PipelineError::invalid(
            "strength",
            format!(
                "{strength} keeps none of the {steps} steps; raise strength or num_inference_steps"
            ),
        ));
    }
    Ok(first)
}

/// The VAE's scaled latent sample of images (N, 3, H, W) in [0, 1], drawing the posterior's
/// noise from `noise`; run in the VAE's own dtype.
pub fn encode_images(
    vae: &Vae,
    images: &Tensor,
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, PipelineError> {
    (posterior_sample(vae, images, device, noise)? * vae.scaling_factor()).in_component(COMPONENT)
}

/// The latents of an image-to-image start in the 16-channel VAEs of FLUX and SD 3: a
/// sample of the posterior, shifted and scaled (`(z - shift_factor) * scaling_factor`).
/// `class` names the pipeline in the refusal of an image that is not `want` (height, width)
/// pixels: diffusers resizes it there, dw does not.
pub fn shifted_image_latents(
    vae: &Vae,
    images: &Tensor,
    (want, class): ((usize, usize), &str),
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, PipelineError> {
    let (_, _, h, w) = images.dims4().in_component(COMPONENT)?;
    if (h, w) != want {
        let (want_h, want_w) = want;
        return Err(PipelineError::invalid(
            "image",
            format!(
                "is {w}x{h}; {class} resizes it to width x height ({want_w}x{want_h}), which dw does not do: give `height` and `width` of the image, or resize it with `{{\"location\": ..., \"size\": {{\"width\": {want_w}, \"height\": {want_h}}}}}`"
            ),
        ));
    }
    let sample = posterior_sample(vae, images, device, noise)?;
    let shift = vae.config().shift_factor.unwrap_or(0.0);
    (sample - shift)
        .and_then(|z| z * vae.scaling_factor())
        .in_component(COMPONENT)
}

/// A sample of the VAE's latent distribution for images (N, 3, H, W) in [0, 1], before any
/// scaling, f32, drawing the posterior's noise from `noise`.
pub fn posterior_sample(
    vae: &Vae,
    images: &Tensor,
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, PipelineError> {
    // VaeImageProcessor: [0, 1] to [-1, 1].
    let pixels = images
        .to_dtype(DType::F32)
        .and_then(|image| image.affine(2.0, -1.0))
        .in_component(COMPONENT)?;
    posterior_sample_of_pixels(vae, &pixels, device, noise)
}

/// [`posterior_sample`] of pixels already in [-1, 1].
pub fn posterior_sample_of_pixels(
    vae: &Vae,
    pixels: &Tensor,
    device: &Device,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor, PipelineError> {
    let pixels = pixels
        .to_device(device)
        .and_then(|image| image.to_dtype(vae.dtype()))
        .in_component(COMPONENT)?;
    let distribution = vae.encode(&pixels)?;
    let sample_noise = noise.next(distribution.mean.dims())?;
    distribution
        .sample(&sample_noise)?
        .to_dtype(DType::F32)
        .in_component(COMPONENT)
}

/// The shape of one run, for its memory estimate.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// (images, channels, latent height, latent width).
    pub latents: [usize; 4],
    /// Classifier-free guidance doubles the UNet's batch.
    pub guided: bool,
    /// No decode when the latents are the output.
    pub output_latents: bool,
    pub decode: DecodeOptions,
}

/// About the most memory a run takes beyond the weights: the larger of a denoising step
/// and the decode, each in its model's dtype (f32 on the CPU, where everything runs so).
pub fn activation_bytes(unet: &Unet, unet_dtype: DType, vae: &Vae, run: RunShape) -> u64 {
    let [images, _, height, width] = run.latents;
    let element = |dtype: DType| match vae.device().is_cpu() {
        true => 4,
        false => dtype.size_in_bytes(),
    };
    let batch = if run.guided { 2 * images } else { images };
    let step = unet.activation_bytes(batch, height, width, element(unet_dtype));
    let scale = vae.scale_factor();
    let decode = match run.output_latents {
        true => 0,
        false => vae.decode_activation_bytes(
            images,
            height * scale,
            width * scale,
            element(vae.dtype()),
            run.decode.slicing,
            run.decode.tiling,
        ),
    };
    step.max(decode)
}

/// How final latents are decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// One image at a time (diffusers' `enable_slicing`).
    pub slicing: bool,
    /// In overlapping tiles (diffusers' `enable_tiling`).
    pub tiling: bool,
}

/// Decodes final latents into f32 images in [0, 1] on the CPU, in the VAE's own dtype.
pub fn decode_latents(
    vae: &Vae,
    latents: &Tensor,
    options: DecodeOptions,
) -> Result<Tensor, PipelineError> {
    let scaled = (latents / vae.scaling_factor()).in_component(COMPONENT)?;
    decode_unscaled(vae, &scaled, options)
}

/// Decodes latents already taken back to the VAE's own scale (divided by its scaling
/// factor, shifted where the family shifts them) into f32 images in [0, 1] on the CPU.
pub fn decode_unscaled(
    vae: &Vae,
    latents: &Tensor,
    options: DecodeOptions,
) -> Result<Tensor, PipelineError> {
    let scaled = latents.to_dtype(vae.dtype()).in_component(COMPONENT)?;
    let decode = |latents: &Tensor| match options.tiling {
        true => vae.decode_tiled(latents),
        false => vae.decode(latents),
    };
    let decoded = if options.slicing {
        let count = scaled.dim(0).in_component(COMPONENT)?;
        let images = (0..count)
            .map(|i| decode(&scaled.narrow(0, i, 1).in_component(COMPONENT)?))
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::cat(&images, 0).in_component(COMPONENT)?
    } else {
        decode(&scaled)?
    };
    to_unit_range(&decoded).in_component("vae")
}

/// VAE output in [-1, 1] to f32 images in [0, 1] on the CPU.
fn to_unit_range(decoded: &Tensor) -> candle_core::Result<Tensor> {
    let decoded = decoded.to_dtype(DType::F32)?;
    ((decoded / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .to_device(&Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' formula on a hand-computed case: per image, std(text)/std(cfg) rescales
    /// cfg, then mixes with the unrescaled by the factor.
    #[test]
    fn guidance_rescale_matches_diffusers_formula() {
        let device = Device::Cpu;
        let guided = Tensor::new(&[[1f32, 3.0], [0.0, 4.0]], &device).unwrap();
        let text = Tensor::new(&[[0f32, 1.0], [2.0, 2.0]], &device).unwrap();
        let out = rescale_guidance(&guided, &text, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Image 0: std(text) = 0.7071, std(cfg) = 1.4142, ratio 0.5: cfg*0.5*0.5 + cfg*0.5.
        assert_eq!(out[0], [0.75, 2.25]);
        // Image 1: std(text) = 0: the rescaled half vanishes.
        assert_eq!(out[1], [0.0, 2.0]);
    }

    /// diffusers' img2img `prepare_latents`: `torch.cat([init_latents] * n)`.
    #[test]
    fn image_latents_tile_to_the_batch_as_whole_sets() {
        let xs = Tensor::new(&[[1f32], [2.0]], &Device::Cpu).unwrap();
        let out = tile_to_batch(&xs, 4).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, [[1.0], [2.0], [1.0], [2.0]]);
        let error = tile_to_batch(&xs, 3).unwrap_err().to_string();
        assert!(
            error.contains("2 images cannot be repeated to 3"),
            "{error}"
        );
    }

    #[test]
    fn repeated_rows_keep_each_rows_copies_together() {
        let xs = Tensor::new(&[[1f32], [2.0]], &Device::Cpu).unwrap();
        let out = repeat_rows(&xs, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, [[1.0], [1.0], [1.0], [2.0], [2.0], [2.0]]);
    }
}
