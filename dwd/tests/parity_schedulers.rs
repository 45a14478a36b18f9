//! Parity of every scheduler, of image-to-image and of latent output with Hugging Face
//! diffusers on the tiny SD 1.5-shaped fixture in `tests/fixtures/tiny-sd15` (see
//! `make_reference.py` and `make_more_references.py` there).
//!
//! Stochastic runs replay the noise diffusers drew, recorded in draw order, through
//! [`ReplayNoise`]; every replayed draw must be consumed.

mod common;
use common::{assert_close, max_abs_diff, no_progress, Fixture};

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::{
    build_scheduler, images_to_rgb8, GenerateArgs, PipelineError, Progress, ReplayNoise,
    SchedulerConfig, StableDiffusionPipeline, SUPPORTED_SCHEDULERS,
};
use serde_json::{json, Map, Value};

// Measured 4e-6 to 1.1e-5 with exact GELU; tanh-approximated GELU gives 1.3e-4, so 1e-4
// catches that while leaving other CPUs' summation orders room.
const PIPELINE_TOLERANCE: f32 = 1e-4;

fn fixture() -> Fixture {
    Fixture::new("tiny-sd15")
}

fn pipeline() -> StableDiffusionPipeline {
    StableDiffusionPipeline::load(&fixture().model_dir(), DType::F32, &Device::Cpu).unwrap()
}

fn timesteps_of(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect()
}

/// The prompt, steps and guidance of the references, starting from their latents.
fn reference_args(scheduler: &str, overrides: Map<String, Value>) -> GenerateArgs {
    let meta = fixture().json("expected.json");
    let latents = fixture().tensors("expected.safetensors")["pipe_latents"].clone();
    GenerateArgs {
        prompts: vec![meta["prompt"].as_str().unwrap().to_string()],
        negative_prompt: None,
        num_inference_steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        latents: Some(latents),
        scheduler_type: Some(scheduler.to_string()),
        scheduler_overrides: overrides,
        ..GenerateArgs::default()
    }
}

/// The scheduler's timesteps for the reference step count, from the shipped config.
fn scheduled_timesteps(scheduler: &str, overrides: &Map<String, Value>) -> Vec<f64> {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler"))
        .unwrap()
        .with_overrides(overrides)
        .unwrap();
    let mut built = build_scheduler(scheduler, &config).unwrap();
    built.set_timesteps(4).unwrap();
    built.timesteps().to_vec()
}

/// Runs one case of `more_expected.json`, replaying its recorded noise.
fn check_more_case(case: &str) {
    let meta = fixture().json("more_expected.json");
    let tensors = fixture().tensors("more_expected.safetensors");
    let spec = &meta["cases"][case];
    let scheduler = spec["scheduler"].as_str().unwrap();
    let overrides = spec["overrides"].as_object().cloned().unwrap_or_default();
    assert_eq!(
        scheduled_timesteps(scheduler, &overrides),
        timesteps_of(&spec["timesteps"]),
        "{case} timesteps"
    );
    let draws = spec["noises"].as_u64().unwrap() as usize;
    let mut noise =
        ReplayNoise::new((0..draws).map(|k| tensors[&format!("noise_{case}_{k}")].clone()));
    let image = pipeline()
        .generate_with_noise(
            &reference_args(scheduler, overrides),
            &mut noise,
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(noise.remaining(), 0, "{case}: recorded noise left unused");
    assert_close(
        &format!("{case} pipeline"),
        &image,
        &tensors[&format!("pipe_image_{case}")],
        PIPELINE_TOLERANCE,
    );
}

/// Runs one scheduler of `expected.json` (no noise beyond the given latents).
fn check_expected_case(scheduler: &str) {
    let meta = fixture().json("expected.json");
    let key = format!("pipe_image_{scheduler}");
    let overrides = Map::new();
    assert_eq!(
        scheduled_timesteps(scheduler, &overrides),
        timesteps_of(&meta["pipelines"][&key]["timesteps"]),
        "{scheduler} timesteps"
    );
    let mut noise = ReplayNoise::new([]);
    let image = pipeline()
        .generate_with_noise(
            &reference_args(scheduler, overrides),
            &mut noise,
            &mut no_progress(),
        )
        .unwrap();
    assert_close(
        &format!("{scheduler} pipeline"),
        &image,
        &fixture().tensors("expected.safetensors")[&key],
        PIPELINE_TOLERANCE,
    );
}

#[test]
fn euler_pipeline_matches() {
    check_expected_case("EulerDiscreteScheduler");
}

#[test]
fn dpm_solver_pipeline_matches() {
    check_expected_case("DPMSolverMultistepScheduler");
}

#[test]
fn pndm_pipeline_matches() {
    check_more_case("PNDMScheduler");
}

#[test]
fn euler_ancestral_pipeline_matches_with_replayed_noise() {
    check_more_case("EulerAncestralDiscreteScheduler");
}

#[test]
fn dpm_solver_karras_pipeline_matches() {
    check_more_case("DPMSolverMultistepScheduler_karras");
}

#[test]
fn unipc_pipeline_matches() {
    check_more_case("UniPCMultistepScheduler");
}

#[test]
fn lcm_pipeline_matches_with_replayed_noise() {
    check_more_case("LCMScheduler");
}

#[test]
fn euler_trailing_pipeline_matches() {
    check_more_case("EulerDiscreteScheduler_trailing");
}

/// The init image diffusers read: `expected_DDIMScheduler.png`, the 8-bit rounding of
/// `pipe_image_DDIMScheduler`, as f32 in [0, 1] (`u8 / 255` like diffusers' image processor).
fn reference_init_image() -> Tensor {
    let reference = &fixture().tensors("expected.safetensors")["pipe_image_DDIMScheduler"];
    let rgb = images_to_rgb8(reference).unwrap().remove(0);
    let values: Vec<f32> = rgb
        .pixels
        .iter()
        .map(|level| f32::from(*level) / 255.0)
        .collect();
    Tensor::from_vec(values, (1, rgb.height, rgb.width, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap()
}

fn img2img_args() -> GenerateArgs {
    let meta = fixture().json("more_expected.json");
    let spec = &meta["cases"]["img2img"];
    GenerateArgs {
        latents: None,
        init_image: Some(reference_init_image()),
        strength: spec["strength"].as_f64().unwrap(),
        ..reference_args(spec["scheduler"].as_str().unwrap(), Map::new())
    }
}

#[test]
fn img2img_ddim_matches_with_replayed_noise() {
    let meta = fixture().json("more_expected.json");
    let tensors = fixture().tensors("more_expected.safetensors");
    let spec = &meta["cases"]["img2img"];
    assert_eq!(
        scheduled_timesteps("DDIMScheduler", &Map::new()),
        timesteps_of(&spec["timesteps"])
    );
    // The VAE's latent sample first, then the noise added at the first kept timestep.
    let mut noise = ReplayNoise::new([
        tensors["noise_img2img_0"].clone(),
        tensors["noise_img2img_1"].clone(),
    ]);
    let mut denoising_steps = Vec::new();
    let image = pipeline()
        .generate_with_noise(&img2img_args(), &mut noise, &mut |progress: Progress| {
            if progress.phase == dwd::pipelines::Phase::Denoising {
                denoising_steps.push((progress.step, progress.total));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    // strength 0.75 of 4 steps keeps the last 3.
    assert_eq!(denoising_steps, [(0, 3), (1, 3), (2, 3)]);
    assert_close(
        "img2img DDIM pipeline",
        &image,
        &tensors["img2img_image_DDIMScheduler"],
        PIPELINE_TOLERANCE,
    );
}

#[test]
fn img2img_checks_strength_and_size() {
    let pipeline = pipeline();
    for strength in [-0.1, 1.5, f64::NAN] {
        let args = GenerateArgs {
            strength,
            ..img2img_args()
        };
        let error = pipeline.generate(&args, &mut no_progress()).err().unwrap();
        assert!(error.to_string().contains("strength"), "{error}");
    }
    // 0.1 of 4 steps keeps none.
    let args = GenerateArgs {
        strength: 0.1,
        ..img2img_args()
    };
    let error = pipeline.generate(&args, &mut no_progress()).err().unwrap();
    assert!(error.to_string().contains("strength"), "{error}");
    let args = GenerateArgs {
        height: Some(32),
        ..img2img_args()
    };
    let error = pipeline.generate(&args, &mut no_progress()).err().unwrap();
    assert!(error.to_string().contains("height"), "{error}");
}

#[test]
fn img2img_seeded_repeats_images_per_prompt() {
    let args = GenerateArgs {
        num_images_per_prompt: 2,
        num_inference_steps: 2,
        strength: 1.0,
        seed: 5,
        ..img2img_args()
    };
    let pipeline = pipeline();
    let images = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(images.dims(), [2, 3, 64, 64]);
    let again = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(max_abs_diff(&images, &again), 0.0);
    // Each image gets its own added noise.
    let first = images.narrow(0, 0, 1).unwrap();
    let second = images.narrow(0, 1, 1).unwrap();
    assert!(max_abs_diff(&first, &second) > 1e-3);
}

#[test]
fn latent_output_decodes_to_the_image() {
    let pipeline = pipeline();
    let args = reference_args("DDIMScheduler", Map::new());
    let latents = pipeline
        .generate(
            &GenerateArgs {
                output_latents: true,
                ..args.clone()
            },
            &mut no_progress(),
        )
        .unwrap();
    assert_eq!(latents.dims(), [1, 4, 32, 32]);
    assert_eq!(latents.dtype(), DType::F32);
    let decoded = pipeline
        .vae
        .decode(&(latents / pipeline.vae.scaling_factor()).unwrap())
        .unwrap();
    let decoded = ((decoded / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let image = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(max_abs_diff(&decoded, &image), 0.0);
    assert_close(
        "latents decoded",
        &decoded,
        &fixture().tensors("expected.safetensors")["pipe_image_DDIMScheduler"],
        PIPELINE_TOLERANCE,
    );
}

/// Seeded stochastic schedulers: the same seed repeats, another seed differs.
fn check_seeded_stochastic(scheduler: &str) {
    let pipeline = pipeline();
    let args = GenerateArgs {
        latents: None,
        num_inference_steps: 3,
        seed: 11,
        ..reference_args(scheduler, Map::new())
    };
    let first = pipeline.generate(&args, &mut no_progress()).unwrap();
    let again = pipeline.generate(&args, &mut no_progress()).unwrap();
    assert_eq!(max_abs_diff(&first, &again), 0.0, "{scheduler}");
    let other = pipeline
        .generate(&GenerateArgs { seed: 12, ..args }, &mut no_progress())
        .unwrap();
    let diff = max_abs_diff(&first, &other);
    eprintln!("{scheduler}: seeds 11 and 12 differ by {diff:e}");
    assert!(diff > 1e-3, "{scheduler}");
}

#[test]
fn euler_ancestral_seed_is_reproducible() {
    check_seeded_stochastic("EulerAncestralDiscreteScheduler");
}

#[test]
fn lcm_seed_is_reproducible() {
    check_seeded_stochastic("LCMScheduler");
}

#[test]
fn stochastic_schedulers_draw_after_the_initial_latents() {
    // With the initial latents given, the seed still changes the ancestral noise.
    let pipeline = pipeline();
    let args = GenerateArgs {
        num_inference_steps: 2,
        seed: 1,
        ..reference_args("EulerAncestralDiscreteScheduler", Map::new())
    };
    let first = pipeline.generate(&args, &mut no_progress()).unwrap();
    let other = pipeline
        .generate(&GenerateArgs { seed: 2, ..args }, &mut no_progress())
        .unwrap();
    assert!(max_abs_diff(&first, &other) > 1e-3);
}

#[test]
fn unknown_scheduler_lists_every_supported_one() {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    let error = build_scheduler("HeunDiscreteScheduler", &config)
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(
        matches!(error, PipelineError::Unsupported { .. }),
        "{message}"
    );
    assert!(message.contains("HeunDiscreteScheduler"), "{message}");
    assert_eq!(SUPPORTED_SCHEDULERS.len(), 7);
    for name in SUPPORTED_SCHEDULERS {
        assert!(message.contains(name), "{name} missing from: {message}");
        // Every listed name builds from the shipped SD 1.5 config.
        build_scheduler(name, &config).unwrap();
    }
}

#[test]
fn bad_option_values_are_refused_naming_the_key() {
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    let cases: &[(&str, &str, Value)] = &[
        ("DDIMScheduler", "timestep_spacing", json!("sideways")),
        ("PNDMScheduler", "timestep_spacing", json!("sideways")),
        (
            "EulerDiscreteScheduler",
            "timestep_spacing",
            json!("sideways"),
        ),
        (
            "EulerAncestralDiscreteScheduler",
            "timestep_spacing",
            json!("sideways"),
        ),
        (
            "DPMSolverMultistepScheduler",
            "timestep_spacing",
            json!("sideways"),
        ),
        (
            "UniPCMultistepScheduler",
            "timestep_spacing",
            json!("sideways"),
        ),
        (
            "EulerDiscreteScheduler",
            "interpolation_type",
            json!("cubic"),
        ),
        (
            "EulerDiscreteScheduler",
            "use_exponential_sigmas",
            json!(true),
        ),
        ("EulerDiscreteScheduler", "final_sigmas_type", json!("one")),
        (
            "EulerAncestralDiscreteScheduler",
            "prediction_type",
            json!("sample"),
        ),
        (
            "DPMSolverMultistepScheduler",
            "algorithm_type",
            json!("sde-dpmsolver++"),
        ),
        ("DPMSolverMultistepScheduler", "solver_order", json!(4)),
        ("DPMSolverMultistepScheduler", "thresholding", json!(true)),
        ("UniPCMultistepScheduler", "solver_type", json!("bh3")),
        ("PNDMScheduler", "skip_prk_steps", json!(false)),
        ("PNDMScheduler", "prediction_type", json!("sample")),
        ("LCMScheduler", "beta_schedule", json!("exponential")),
        ("LCMScheduler", "prediction_type", json!("flow")),
    ];
    for (scheduler, key, value) in cases {
        let mut overrides = Map::new();
        overrides.insert(key.to_string(), value.clone());
        let error = build_scheduler(scheduler, &config.with_overrides(&overrides).unwrap())
            .err()
            .unwrap_or_else(|| panic!("{scheduler} accepted {key} = {value}"));
        let message = error.to_string();
        assert!(
            matches!(error, PipelineError::Unsupported { .. }),
            "{scheduler}: {message}"
        );
        assert!(message.contains(key), "{scheduler}: {message}");
    }
    // The same refusal reaches a request, before any work.
    let mut overrides = Map::new();
    overrides.insert("timestep_spacing".to_string(), json!("sideways"));
    let error = pipeline()
        .generate(
            &reference_args("EulerDiscreteScheduler", overrides),
            &mut no_progress(),
        )
        .err()
        .unwrap();
    assert!(error.to_string().contains("timestep_spacing"), "{error}");
}

#[test]
fn scheduler_options_change_the_schedule() {
    let mut overrides = Map::new();
    overrides.insert("use_karras_sigmas".to_string(), json!(true));
    let karras = scheduled_timesteps("EulerDiscreteScheduler", &overrides);
    // Karras sigmas give fractional timesteps between the first and last leading ones.
    assert_eq!(karras.len(), 4);
    assert!((karras[0] - 751.0).abs() < 1e-3, "{karras:?}");
    assert!(karras[1].fract() != 0.0, "{karras:?}");
    overrides.insert("timestep_spacing".to_string(), json!("linspace"));
    overrides.remove("use_karras_sigmas");
    assert_eq!(
        scheduled_timesteps("EulerDiscreteScheduler", &overrides),
        [999.0, 666.0, 333.0, 0.0]
    );
    assert_eq!(
        scheduled_timesteps("DPMSolverMultistepScheduler", &overrides),
        [999.0, 749.0, 500.0, 250.0]
    );
    // A null override removes the key, so the scheduler's own default applies.
    overrides.insert("timestep_spacing".to_string(), Value::Null);
    assert_eq!(
        scheduled_timesteps("UniPCMultistepScheduler", &overrides),
        [999.0, 749.0, 500.0, 250.0]
    );
}

#[test]
fn third_order_solvers_refine_second_order() {
    // No reference uses order 3. It must stay finite, and like any convergent family the
    // step from order 2 to 3 must change the result less than the step from 1 to 2.
    let pipeline = pipeline();
    for scheduler in ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"] {
        let run = |order: usize| {
            let mut overrides = Map::new();
            overrides.insert("solver_order".to_string(), json!(order));
            let args = GenerateArgs {
                num_inference_steps: 8,
                output_latents: true,
                ..reference_args(scheduler, overrides)
            };
            pipeline.generate(&args, &mut no_progress()).unwrap()
        };
        let (first, second, third) = (run(1), run(2), run(3));
        let (one_two, two_three) = (max_abs_diff(&first, &second), max_abs_diff(&second, &third));
        eprintln!(
            "{scheduler}: latents move {one_two:e} from order 1 to 2, {two_three:e} from 2 to 3"
        );
        assert!(two_three.is_finite() && two_three > 0.0, "{scheduler}");
        assert!(
            two_three < one_two,
            "{scheduler}: {two_three:e} >= {one_two:e}"
        );
    }
}
