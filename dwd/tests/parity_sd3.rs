//! Parity of the Stable Diffusion 3 family with diffusers, on `tests/fixtures/tiny-sd3` (a
//! copy of the shared SD 3 reference; `tests/fixtures/REFERENCE.md` describes its
//! tensors): the MMDiT transformer on fixed inputs and on the first call of the recorded
//! run, the three text encoders and `encode_prompt`'s embeddings, the schedule with
//! diffusers' double shift of `sigma_min`, the VAE, and the whole 4-step CFG run.

mod common;
use common::{assert_close, no_progress, token_rows, Fixture};

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::stable_diffusion_3::{
    Sd3Args, Sd3Inputs, Sd3Texts, Sd3Transformer, StableDiffusion3Pipeline,
};
use dwd::pipelines::{
    images_to_rgb8, FlowMatchEulerDiscreteScheduler, FlowSchedule, ReplayNoise, SchedulerConfig,
    Vae,
};

/// The reference README's tolerance for denoisers is 1e-3; held tighter here.
const TRANSFORMER_TOLERANCE: f32 = 1e-4;
/// Text encoders 1e-5; whole runs 1e-3 by the README, held tighter here.
const TEXT_TOLERANCE: f32 = 1e-5;
const LATENTS_TOLERANCE: f32 = 1e-4;
const IMAGE_TOLERANCE: f32 = 1e-4;

fn fixture() -> Fixture {
    Fixture::new("tiny-sd3")
}

fn transformer() -> Sd3Transformer {
    let dir = fixture().model_dir().join("transformer");
    Sd3Transformer::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The recorded transformer call on fixed inputs: its inputs and output by name.
const FIXED_INPUTS: [&str; 5] = ["tr_x", "tr_t", "tr_ehs", "tr_pooled", "tr_out"];

fn check_transformer(model: &Sd3Transformer, [x, t, ehs, pooled, out]: [&str; 5]) {
    let reference = fixture().tensors("expected.safetensors");
    let timesteps = values(&reference[t]);
    let batch = reference[x].dim(0).unwrap();
    let timesteps = match timesteps.len() {
        1 => vec![timesteps[0]; batch],
        _ => timesteps,
    };
    let got = model
        .forward(&Sd3Inputs {
            hidden_states: &reference[x],
            encoder_hidden_states: &reference[ehs],
            pooled_projections: &reference[pooled],
            timesteps: &timesteps,
            skip_layers: &[],
        })
        .unwrap();
    assert_close(out, &got, &reference[out], TRANSFORMER_TOLERANCE);
}

#[test]
fn the_transformer_matches_diffusers_on_fixed_inputs() {
    check_transformer(&transformer(), FIXED_INPUTS);
}

/// Offload builds the transformer again from the tensors its host copy kept, whole (model
/// offload) or a block at a time as each runs (sequential); either way (here on the CPU)
/// it still matches diffusers.
#[test]
fn the_transformer_rebuilt_or_streamed_from_its_offloaded_tensors_matches_diffusers() {
    let dir = fixture().model_dir().join("transformer");
    let host = Sd3Transformer::load_host(&dir, None, DType::F32).unwrap();
    let rebuilt = host.rebuilt_on(&Device::Cpu).unwrap();
    assert_eq!(rebuilt.bytes(), transformer().bytes());
    assert_eq!(rebuilt.lora_modules(), transformer().lora_modules());
    check_transformer(&rebuilt, FIXED_INPUTS);
    check_transformer(&host.streamed_on(&Device::Cpu).unwrap(), FIXED_INPUTS);
}

#[test]
fn the_first_transformer_call_of_the_recorded_run_matches() {
    check_transformer(
        &transformer(),
        [
            "pipe_tr0_hidden_states",
            "pipe_tr0_timestep",
            "pipe_tr0_ehs",
            "pipe_tr0_pooled",
            "pipe_tr0_out",
        ],
    );
}

fn pipeline() -> StableDiffusion3Pipeline {
    StableDiffusion3Pipeline::load(&fixture().model_dir(), DType::F32, &Device::Cpu).unwrap()
}

/// The recorded run's arguments (`expected.json` → `pipelines.sd3`), from the recorded
/// noise.
fn recorded_args() -> Sd3Args {
    let expected = fixture().json("expected.json");
    let case = &expected["pipelines"]["sd3"];
    let text = |key: &str| case[key].as_str().unwrap().to_string();
    let number = |key: &str| case[key].as_u64().unwrap() as usize;
    Sd3Args {
        texts: Sd3Texts {
            prompts: vec![text("prompt")],
            negative_prompt: Some(text("negative_prompt")),
            ..Sd3Texts::default()
        },
        height: Some(number("height")),
        width: Some(number("width")),
        num_inference_steps: number("num_inference_steps"),
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        max_sequence_length: number("max_sequence_length"),
        latents: Some(fixture().tensors("expected.safetensors")["pipe_latents"].clone()),
        ..Sd3Args::default()
    }
}

/// `encode_prompt` for `[negative, prompt]`: CLIP-L and CLIP-G penultimate states padded
/// to T5's width, then T5's states; the pooled projections side by side.
#[test]
fn prompts_are_encoded_as_diffusers_encodes_them() {
    let pipeline = pipeline();
    let reference = fixture().tensors("expected.safetensors");
    let args = recorded_args();
    let texts = &args.texts;
    let row = |text: &str| [text.to_string(), text.to_string(), text.to_string()];
    let rows = [
        row(texts.negative_prompt.as_deref().unwrap()),
        row(&texts.prompts[0]),
    ];
    let ids = |tokenizer: &dwd::pipelines::ClipTokenizer| {
        rows.iter()
            .map(|r| tokenizer.encode_padded(&r[0], 77).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&pipeline.clip_l.tokenizer),
        token_rows(&reference["clip_l_ids"])
    );
    assert_eq!(
        ids(&pipeline.clip_g.tokenizer),
        token_rows(&reference["clip_g_ids"])
    );
    let encoded = pipeline.encode_prompt(&rows, &args).unwrap();
    assert_close(
        "prompt_embeds",
        &encoded.prompt_embeds,
        &reference["prompt_embeds"],
        TEXT_TOLERANCE,
    );
    assert_close(
        "pooled_prompt_embeds",
        &encoded.pooled_prompt_embeds,
        &reference["pooled_prompt_embeds"],
        TEXT_TOLERANCE,
    );
}

/// Without `text_encoder_3` diffusers' `_get_t5_prompt_embeds` returns zeros of
/// (rows, `max_sequence_length`, `joint_attention_dim`): the CLIP part of the recorded
/// embeddings stays as it was, T5's 32 rows become zeros, the pooled embeddings are CLIP's.
#[test]
fn without_t5_its_rows_are_zeros_and_clip_is_unchanged() {
    let mut pipeline = pipeline();
    pipeline.t5 = None;
    let reference = fixture().tensors("expected.safetensors");
    let args = recorded_args();
    let row = |text: &str| [text.to_string(), text.to_string(), text.to_string()];
    let rows = [
        row(args.texts.negative_prompt.as_deref().unwrap()),
        row(&args.texts.prompts[0]),
    ];
    let encoded = pipeline.encode_prompt(&rows, &args).unwrap();
    assert_eq!(encoded.prompt_embeds.dims(), &[2, 77 + 32, 96]);
    let clip_part = |xs: &Tensor| xs.narrow(1, 0, 77).unwrap();
    assert_close(
        "CLIP rows of prompt_embeds",
        &clip_part(&encoded.prompt_embeds),
        &clip_part(&reference["prompt_embeds"]),
        TEXT_TOLERANCE,
    );
    let t5_part = encoded.prompt_embeds.narrow(1, 77, 32).unwrap();
    let largest = t5_part.abs().unwrap().max_all().unwrap();
    assert_eq!(
        largest.to_scalar::<f32>().unwrap(),
        0.0,
        "T5's rows are zeros"
    );
    assert_close(
        "pooled_prompt_embeds",
        &encoded.pooled_prompt_embeds,
        &reference["pooled_prompt_embeds"],
        TEXT_TOLERANCE,
    );
}

/// diffusers' schedule for SD 3: no sigmas from the pipeline, `shift` 3 applied to a
/// `linspace` down to the constructor's already shifted `sigma_min`: the last sigma is
/// 0.0089286, not 0.001.
#[test]
fn the_schedule_shifts_sigma_min_twice_as_diffusers_does() {
    let reference = fixture().tensors("expected.safetensors");
    let config = SchedulerConfig::load(&fixture().model_dir().join("scheduler")).unwrap();
    let mut scheduler = FlowMatchEulerDiscreteScheduler::new(&config).unwrap();
    scheduler
        .set_timesteps(&FlowSchedule {
            num_inference_steps: 4,
            sigmas: None,
            mu: None,
        })
        .unwrap();
    let sigmas: Vec<f32> = scheduler.sigmas().iter().map(|s| *s as f32).collect();
    let timesteps: Vec<f32> = scheduler.timesteps().iter().map(|t| *t as f32).collect();
    assert_eq!(sigmas, values(&reference["sched_sigmas"]));
    assert_eq!(timesteps, values(&reference["sched_timesteps"]));
}

#[test]
fn the_vae_decodes_shifted_latents_as_diffusers_does() {
    let vae = Vae::load(&fixture().model_dir().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let reference = fixture().tensors("expected.safetensors");
    assert_close(
        "VAE decoder",
        &vae.decode(&reference["vae_z"]).unwrap(),
        &reference["vae_out"],
        1e-5,
    );
    let mean = vae.encode_mean(&reference["vae_enc_in"]).unwrap();
    assert_close("VAE encoder mean", &mean, &reference["vae_enc_mean"], 1e-4);
}

/// The whole 4-step CFG run from the recorded noise: the final latents and the image, and
/// the PNG within one 8-bit level.
#[test]
fn the_recorded_four_step_run_matches_diffusers() {
    let pipeline = pipeline();
    let reference = fixture().tensors("expected.safetensors");
    let mut noise = ReplayNoise::new(Vec::new());
    let latents_args = Sd3Args {
        output_latents: true,
        ..recorded_args()
    };
    let latents = pipeline
        .generate(&latents_args, &mut noise, &mut no_progress())
        .unwrap();
    let steps = &reference["pipe_step_latents"];
    let last = steps.get(steps.dim(0).unwrap() - 1).unwrap();
    assert_close("final latents", &latents, &last, LATENTS_TOLERANCE);
    let image = pipeline
        .generate(&recorded_args(), &mut noise, &mut no_progress())
        .unwrap();
    assert_close("image", &image, &reference["pipe_image"], IMAGE_TOLERANCE);
    let png = image::open(fixture().dir().join("expected_sd3.png"))
        .unwrap()
        .to_rgb8();
    let got = &images_to_rgb8(&image).unwrap()[0];
    let worst = got
        .pixels
        .iter()
        .zip(png.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "8-bit image differs by {worst} levels");
}
