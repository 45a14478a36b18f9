//! LoRAs on Stable Diffusion 3 (`tests/fixtures/tiny-sd3`), as diffusers'
//! `SD3LoraLoaderMixin` loads them: diffusers/PEFT files on the transformer and the two
//! CLIP encoders (T5 takes none). No recorded SD 3 LoRA fixture exists, so a LoRA on
//! every adaptable layer of the three is held to the model with its deltas merged into the
//! weights (diffusers' `fuse_lora`), and `joint_attention_kwargs` to the weight it scales.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::merge::{merged_model, one_lora, random_lora, save_peft, LoraLayer};
use common::{assert_close, no_progress, Fixture};
use dwd::pipelines::stable_diffusion_3::{Sd3Args, Sd3Texts, StableDiffusion3Pipeline};
use dwd::pipelines::ReplayNoise;

/// Images in [0, 1]; merged weights round differently from the branches.
const IMAGE_TOLERANCE: f32 = 1e-4;
const FILES: [(&str, &str); 3] = [
    (
        "transformer",
        "transformer/diffusion_pytorch_model.safetensors",
    ),
    ("text_encoder", "text_encoder/model.safetensors"),
    ("text_encoder_2", "text_encoder_2/model.safetensors"),
];

fn model_dir() -> std::path::PathBuf {
    Fixture::new("tiny-sd3").model_dir()
}

fn pipeline(dir: &Path, lora: Option<(&Path, f64)>) -> StableDiffusion3Pipeline {
    let mut pipeline = StableDiffusion3Pipeline::load(dir, DType::F32, &Device::Cpu).unwrap();
    if let Some((path, weight)) = lora {
        pipeline.adapters = one_lora(path, weight);
    }
    pipeline
}

fn make_lora(base: &StableDiffusion3Pipeline) -> Vec<LoraLayer> {
    random_lora(&[
        ("transformer", base.transformer.model().lora_modules()),
        ("text_encoder", base.clip_l.encoder.lora_modules()),
        ("text_encoder_2", base.clip_g.encoder.lora_modules()),
    ])
}

/// The recorded run's prompt and latents, 3 steps with guidance.
fn args() -> Sd3Args {
    let fixture = Fixture::new("tiny-sd3");
    let case = &fixture.json("expected.json")["pipelines"]["sd3"];
    let number = |key: &str| case[key].as_u64().unwrap() as usize;
    Sd3Args {
        texts: Sd3Texts {
            prompts: vec!["a lighthouse at dusk".to_string()],
            negative_prompt: Some("blurry".to_string()),
            ..Sd3Texts::default()
        },
        height: Some(number("height")),
        width: Some(number("width")),
        num_inference_steps: 3,
        guidance_scale: 5.0,
        max_sequence_length: number("max_sequence_length"),
        latents: Some(fixture.tensors("expected.safetensors")["pipe_latents"].clone()),
        ..Sd3Args::default()
    }
}

fn image(pipeline: &StableDiffusion3Pipeline, args: &Sd3Args) -> Tensor {
    pipeline
        .generate(args, &mut ReplayNoise::new(Vec::new()), &mut no_progress())
        .unwrap()
}

#[test]
fn a_lora_on_the_transformer_and_both_clip_encoders_equals_its_merged_weights() {
    let base = pipeline(&model_dir(), None);
    let layers = make_lora(&base);
    let transformer_layers = base.transformer.model().lora_modules().len();
    assert!(transformer_layers > 20, "only {transformer_layers} layers");
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("peft.safetensors");
    save_peft(&layers, &peft);
    let args = args();
    let base_image = image(&base, &args);

    let weight = 0.7;
    let merged_dir = dir.path().join("merged");
    merged_model(&model_dir(), &FILES, &layers, weight, &merged_dir);
    let merged = image(&pipeline(&merged_dir, None), &args);
    let with_lora = image(&pipeline(&model_dir(), Some((&peft, weight))), &args);
    assert_close(
        "SD 3 LoRA vs merged weights",
        &with_lora,
        &merged,
        IMAGE_TOLERANCE,
    );
    let moved = common::max_abs_diff(&with_lora, &base_image);
    assert!(moved > 1e-2, "the LoRA barely changed the image ({moved})");

    let scaled = Sd3Args {
        lora_scale: weight,
        ..args.clone()
    };
    let by_kwargs = image(&pipeline(&model_dir(), Some((&peft, 1.0))), &scaled);
    assert_close("joint_attention_kwargs scale", &by_kwargs, &with_lora, 1e-6);
}
