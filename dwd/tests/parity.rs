//! Parity of the Stable Diffusion pipeline with Hugging Face diffusers/transformers on the
//! tiny SD 1.5-shaped fixture in `tests/fixtures/tiny-sd15` (see its `make_reference.py`).

mod common;
use common::{assert_close, max_abs_diff, no_progress, token_rows, Fixture};

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::{
    build_scheduler, ClipTokenizer, GenerateArgs, Phase, PipelineError, Progress, SchedulerConfig,
    StableDiffusionPipeline, TextEncoder, Unet, Vae,
};
use serde_json::{json, Map};

const CLIP_TOLERANCE: f32 = 1e-5;
const VAE_TOLERANCE: f32 = 1e-5;
// Measured 4e-6 to 1.1e-5 with exact GELU; tanh-approximated GELU gives 1.3e-4, so 1e-4
// catches that while leaving other CPUs' summation orders room.
const UNET_TOLERANCE: f32 = 1e-4;
const PIPELINE_TOLERANCE: f32 = 1e-4;

fn fixture() -> Fixture {
    Fixture::new("tiny-sd15")
}

fn pipeline() -> StableDiffusionPipeline {
    StableDiffusionPipeline::load(&fixture().model_dir(), DType::F32, &Device::Cpu).unwrap()
}

fn reference_args() -> GenerateArgs {
    let meta = fixture().json("expected.json");
    let negative = meta["negative_prompt"].as_str().unwrap();
    GenerateArgs {
        prompts: vec![meta["prompt"].as_str().unwrap().to_string()],
        negative_prompt: (!negative.is_empty()).then(|| negative.to_string()),
        num_inference_steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        scheduler_type: Some("DDIMScheduler".to_string()),
        ..GenerateArgs::default()
    }
}

#[test]
fn tokenizer_matches_clip_ids() {
    let tokenizer = ClipTokenizer::load(&fixture().model_dir().join("tokenizer")).unwrap();
    let meta = fixture().json("expected.json");
    let want = token_rows(&fixture().tensors("expected.safetensors")["clip_ids"]);
    let texts = [
        meta["negative_prompt"].as_str().unwrap(),
        meta["prompt"].as_str().unwrap(),
    ];
    for (text, want) in texts.iter().zip(&want) {
        assert_eq!(
            &tokenizer.encode_padded(text, 77).unwrap(),
            want,
            "text {text:?}"
        );
    }
}

#[test]
fn tokenizer_matches_tricky_cases() {
    let tokenizer = ClipTokenizer::load(&fixture().model_dir().join("tokenizer")).unwrap();
    let meta = fixture().json("expected.json");
    let cases = meta["tokenizer_cases"].as_array().unwrap();
    let want = token_rows(&fixture().tensors("expected.safetensors")["tok_tricky_ids"]);
    assert_eq!(cases.len(), 4);
    for (case, want) in cases.iter().zip(&want) {
        let text = case.as_str().unwrap();
        assert_eq!(
            &tokenizer.encode_padded(text, 77).unwrap(),
            want,
            "text {text:?}"
        );
    }
}

#[test]
fn text_encoder_matches_clip_out() {
    let expected = fixture().tensors("expected.safetensors");
    let encoder = TextEncoder::load(
        &fixture().model_dir().join("text_encoder"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let got = encoder.encode(&token_rows(&expected["clip_ids"])).unwrap();
    assert_close("text encoder", &got, &expected["clip_out"], CLIP_TOLERANCE);
}

#[test]
fn vae_decode_matches() {
    let expected = fixture().tensors("expected.safetensors");
    let vae = Vae::load(&fixture().model_dir().join("vae"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scale_factor(), 2);
    assert!((vae.scaling_factor() - 0.18215).abs() < 1e-12);
    let got = vae.decode(&expected["vae_z"]).unwrap();
    assert_close("vae decode", &got, &expected["vae_out"], VAE_TOLERANCE);
}

// diffusers' AutoencoderKL.enable_tiling(): tiles of sample_size/scale latents every
// three quarters of a tile, blended over a quarter tile (tests/fixtures/make_tiled_reference.py).
#[test]
fn vae_tiled_decode_matches_diffusers_enable_tiling() {
    let vae = Vae::load(&fixture().model_dir().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let want = fixture().tensors("vae_tiled.safetensors");
    let tiled = vae.decode_tiled(&want["latents"]).unwrap();
    assert_close("tiled decode", &tiled, &want["tiled"], VAE_TOLERANCE);
    let plain = vae.decode(&want["latents"]).unwrap();
    assert_close("plain decode", &plain, &want["plain"], VAE_TOLERANCE);
    let batch = vae.decode_tiled(&want["latents_batch"]).unwrap();
    assert_close("tiled batch", &batch, &want["tiled_batch"], VAE_TOLERANCE);
}

#[test]
fn vae_encode_mean_matches() {
    let expected = fixture().tensors("expected.safetensors");
    let vae = Vae::load(&fixture().model_dir().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let got = vae.encode_mean(&expected["vae_enc_in"]).unwrap();
    assert_close(
        "vae encode mean",
        &got,
        &expected["vae_enc_mean"],
        VAE_TOLERANCE,
    );
}

#[test]
fn unet_matches() {
    let expected = fixture().tensors("expected.safetensors");
    let unet = Unet::load(
        &fixture().model_dir().join("unet"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(unet.in_channels(), 4);
    assert_eq!(unet.sample_size(), 32);
    let timestep = expected["unet_t"].to_vec1::<f32>().unwrap()[0];
    assert_eq!(timestep, 501.0);
    let got = unet
        .forward(
            &expected["unet_x"],
            f64::from(timestep),
            &expected["unet_ehs"],
        )
        .unwrap();
    assert_close("unet", &got, &expected["unet_out"], UNET_TOLERANCE);
}

#[test]
fn ddim_timesteps_match() {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    assert_eq!(config.class_name.as_deref(), Some("PNDMScheduler"));
    let mut scheduler = build_scheduler("DDIMScheduler", &config).unwrap();
    scheduler.set_timesteps(4).unwrap();
    let want: Vec<f64> = fixture().json("expected.json")["pipelines"]["pipe_image_DDIMScheduler"]
        ["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(want, [751.0, 501.0, 251.0, 1.0]);
    assert_eq!(scheduler.timesteps(), want.as_slice());
}

#[test]
fn ddim_pipeline_matches() {
    let expected = fixture().tensors("expected.safetensors");
    let pipeline = pipeline();
    let args = GenerateArgs {
        latents: Some(expected["pipe_latents"].clone()),
        ..reference_args()
    };
    let mut phases = Vec::new();
    let image = pipeline
        .generate(&args, &mut |progress: Progress| {
            phases.push(progress);
            Ok(())
        })
        .unwrap();
    assert_close(
        "DDIM pipeline",
        &image,
        &expected["pipe_image_DDIMScheduler"],
        PIPELINE_TOLERANCE,
    );
    let kinds: Vec<Phase> = phases.iter().map(|progress| progress.phase).collect();
    assert_eq!(
        kinds,
        [
            Phase::Encoding,
            Phase::Denoising,
            Phase::Denoising,
            Phase::Denoising,
            Phase::Denoising,
            Phase::Decoding
        ]
    );
    assert_eq!(phases[4].step, 3);
    assert_eq!(phases[4].total, 4);

    let pixels = dwd::pipelines::images_to_rgb8(&image).unwrap();
    let want = dwd::pipelines::images_to_rgb8(&expected["pipe_image_DDIMScheduler"]).unwrap();
    assert_eq!(pixels.len(), 1);
    assert_eq!((pixels[0].width, pixels[0].height), (64, 64));
    let worst = pixels[0]
        .pixels
        .iter()
        .zip(&want[0].pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "8-bit image differs by {worst} levels");
}

#[test]
fn unknown_scheduler_lists_supported_names() {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    let error = build_scheduler("NoSuchScheduler", &config).err().unwrap();
    let message = error.to_string();
    assert!(
        matches!(error, PipelineError::Unsupported { .. }),
        "{message}"
    );
    assert!(message.contains("NoSuchScheduler"), "{message}");
    for name in dwd::pipelines::SUPPORTED_SCHEDULERS {
        assert!(message.contains(name), "{name} missing from: {message}");
    }

    // An unknown name in a request fails before any work is done, naming it.
    let args = GenerateArgs {
        scheduler_type: Some("NoSuchScheduler".to_string()),
        ..reference_args()
    };
    let mut calls = 0;
    let error = pipeline()
        .generate(&args, &mut |_| {
            calls += 1;
            Ok(())
        })
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(message.contains("NoSuchScheduler"), "{message}");
    assert!(message.contains("PNDMScheduler"), "{message}");
    assert_eq!(calls, 0);
}

#[test]
fn scheduler_overrides_apply() {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    let mut overrides = Map::new();
    overrides.insert("timestep_spacing".to_string(), json!("trailing"));
    let overridden = config.with_overrides(&overrides).unwrap();
    assert_eq!(overridden.timestep_spacing.as_deref(), Some("trailing"));
    assert_eq!(overridden.other, config.other);
    let mut scheduler = build_scheduler("DDIMScheduler", &overridden).unwrap();
    scheduler.set_timesteps(4).unwrap();
    assert_eq!(scheduler.timesteps(), [999.0, 749.0, 499.0, 249.0]);

    overrides.insert("timestep_spacing".to_string(), json!("linspace"));
    let mut scheduler =
        build_scheduler("DDIMScheduler", &config.with_overrides(&overrides).unwrap()).unwrap();
    scheduler.set_timesteps(4).unwrap();
    assert_eq!(scheduler.timesteps(), [999.0, 666.0, 333.0, 0.0]);

    overrides.insert("prediction_type".to_string(), json!("flow"));
    let error = build_scheduler("DDIMScheduler", &config.with_overrides(&overrides).unwrap())
        .err()
        .unwrap();
    assert!(error.to_string().contains("prediction_type"), "{error}");
}

#[test]
fn seed_is_reproducible() {
    let pipeline = pipeline();
    let args = GenerateArgs {
        num_inference_steps: 2,
        seed: 7,
        ..reference_args()
    };
    let first = pipeline.generate(&args, &mut no_progress()).unwrap();
    let again = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(max_abs_diff(&first, &again), 0.0);
    let other_seed = GenerateArgs { seed: 8, ..args };
    let other = pipeline.generate(&other_seed, &mut no_progress()).unwrap();
    assert!(max_abs_diff(&first, &other) > 1e-3);
}

#[test]
fn wrong_latent_shape_names_both_shapes() {
    let args = GenerateArgs {
        latents: Some(Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap()),
        ..reference_args()
    };
    let error = pipeline()
        .generate(&args, &mut no_progress())
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(message.contains("[1, 4, 32, 32]"), "{message}");
    assert!(message.contains("[1, 4, 16, 16]"), "{message}");
}

#[test]
fn size_must_be_a_multiple_of_the_vae_scale() {
    let args = GenerateArgs {
        height: Some(63),
        ..reference_args()
    };
    let error = pipeline()
        .generate(&args, &mut no_progress())
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(
        message.contains("height") && message.contains("63"),
        "{message}"
    );
}

#[test]
fn progress_error_cancels() {
    let pipeline = pipeline();
    let mut calls = 0;
    let result = pipeline.generate(&reference_args(), &mut |progress: Progress| {
        calls += 1;
        if progress.phase == Phase::Denoising && progress.step == 1 {
            Err(PipelineError::Cancelled)
        } else {
            Ok(())
        }
    });
    assert!(matches!(result, Err(PipelineError::Cancelled)));
    assert_eq!(calls, 3);
}

#[test]
fn several_images_per_prompt() {
    let pipeline = pipeline();
    let args = GenerateArgs {
        prompts: vec!["a cat".to_string(), "a dog".to_string()],
        num_images_per_prompt: 2,
        num_inference_steps: 1,
        height: Some(32),
        width: Some(48),
        ..reference_args()
    };
    let images = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(images.dims(), [4, 3, 32, 48]);
    let rgb = dwd::pipelines::images_to_rgb8(&images).unwrap();
    assert_eq!(rgb.len(), 4);
    assert_eq!(rgb[0].pixels.len(), 32 * 48 * 3);
}

#[test]
fn missing_weights_name_file_and_folder() {
    let empty = tempfile::tempdir().unwrap();
    let error = dwd::pipelines::weight_files(empty.path()).err().unwrap();
    let message = error.to_string();
    assert!(
        matches!(error, PipelineError::MissingFile { .. }),
        "{message}"
    );
    assert!(
        message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    assert!(
        message.contains(&empty.path().display().to_string()),
        "{message}"
    );
}
