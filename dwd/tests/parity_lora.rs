//! LoRAs on Stable Diffusion against diffusers (`tests/fixtures/tiny-sd15-lora`, made by
//! diffusers 0.42.1 + peft 0.21.2 the way diffusers-workflow applies them:
//! `load_lora_weights` per LoRA, then `set_adapters(names, adapter_weights)`): the text
//! encoder and UNet alone with the adapters, and each recorded 3-step DDIM run's image,
//! run as branches beside the layers on the one loaded base pipeline.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, token_rows, Fixture};
use dwd::pipelines::lora::{with_adapters, ActiveAdapters, Adapter, LoraAdapter};
use dwd::pipelines::{GenerateArgs, StableDiffusionPipeline};

const TEXT_TOLERANCE: f32 = 1e-5;
const UNET_TOLERANCE: f32 = 1e-4;
/// An image in [0, 1]: well under one 8-bit level.
const IMAGE_TOLERANCE: f32 = 1e-3;

fn lora_fixture() -> Fixture {
    Fixture::new("tiny-sd15-lora")
}

fn pipeline() -> StableDiffusionPipeline {
    let model = Fixture::new("tiny-sd15").model_dir();
    StableDiffusionPipeline::load(&model, DType::F32, &Device::Cpu).unwrap()
}

fn adapter(name: &str, file: &str, weight: f64) -> Adapter {
    Adapter {
        name: name.to_string(),
        weight,
        lora: Arc::new(LoraAdapter::load(&lora_fixture().dir().join(file)).unwrap()),
    }
}

const A: &str = "peft/pytorch_lora_weights.safetensors";
const B: &str = "second/pytorch_lora_weights.safetensors";
const KOHYA_A: &str = "kohya/lora.safetensors";

/// The recorded run (`expected.json` → `run`) from the fixture's latents.
fn run_args() -> GenerateArgs {
    let expected = lora_fixture().json("expected.json");
    let run = &expected["run"];
    GenerateArgs {
        prompts: vec![run["prompt"].as_str().unwrap().to_string()],
        num_inference_steps: run["steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        height: Some(64),
        width: Some(64),
        scheduler_type: Some("DDIMScheduler".to_string()),
        latents: Some(lora_fixture().tensors("latents.safetensors")["latents"].clone()),
        ..GenerateArgs::default()
    }
}

fn image(pipeline: &StableDiffusionPipeline, args: &GenerateArgs) -> Tensor {
    pipeline.generate(args, &mut |_| Ok(())).unwrap()
}

#[test]
fn the_text_encoder_and_unet_alone_match_with_one_and_two_adapters() {
    let pipeline = pipeline();
    let reference = lora_fixture().tensors("expected.safetensors");
    let ids = token_rows(&reference["clip_ids"]);
    let cases = [
        ("base", vec![]),
        ("a", vec![adapter("style", A, 1.0)]),
        (
            "a_b",
            vec![adapter("style", A, 0.7), adapter("detail", B, 0.4)],
        ),
    ];
    for (case, adapters) in cases {
        let place = (DType::F32, &Device::Cpu);
        let text_encoder = pipeline.text_encoder.lora_modules();
        let te =
            ActiveAdapters::build("text_encoder", text_encoder, &adapters, 1.0, place).unwrap();
        let states = with_adapters(te.as_ref(), || pipeline.text_encoder.encode(&ids)).unwrap();
        let name = format!("te_out_{case}");
        assert_close(&name, &states, &reference[&name], TEXT_TOLERANCE);

        let unet =
            ActiveAdapters::build("unet", pipeline.unet.lora_modules(), &adapters, 1.0, place)
                .unwrap();
        let timestep = reference["unet_t"].to_vec0::<f32>().unwrap_or(501.0) as f64;
        let out = with_adapters(unet.as_ref(), || {
            pipeline
                .unet
                .forward(&reference["unet_x"], timestep, &reference["unet_ehs"])
        })
        .unwrap();
        let name = format!("unet_out_{case}");
        assert_close(&name, &out, &reference[&name], UNET_TOLERANCE);
    }
}

/// Every dw case of the fixture on one loaded pipeline, in an order that swaps adapters
/// back and forth: the base image comes back bit for bit after LoRA runs.
#[test]
fn each_recorded_run_gives_diffusers_image_and_the_base_comes_back() {
    let mut pipeline = pipeline();
    let reference = lora_fixture().tensors("expected.safetensors");
    let args = run_args();
    let base = image(&pipeline, &args);
    assert_close(
        "base image",
        &base,
        &reference["base_image"],
        IMAGE_TOLERANCE,
    );
    let cases = [
        ("a", vec![adapter("style", A, 1.0)]),
        ("a_scaled", vec![adapter("style", A, 0.6)]),
        (
            "a_b",
            vec![adapter("style", A, 0.7), adapter("detail", B, 0.4)],
        ),
        ("kohya_a", vec![adapter("style", KOHYA_A, 1.0)]),
    ];
    for (case, adapters) in cases {
        pipeline.adapters = adapters;
        let name = format!("{case}_image");
        assert_close(
            &name,
            &image(&pipeline, &args),
            &reference[&name],
            IMAGE_TOLERANCE,
        );
    }
    pipeline.adapters = Vec::new();
    let again = image(&pipeline, &args);
    let same = base.eq(&again).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(
        same.min_all().unwrap().to_scalar::<f32>().unwrap(),
        1.0,
        "base image unchanged"
    );
}

/// `cross_attention_kwargs={"scale": 0.6}` over weight 1.0 is diffusers' `a_scaled`.
#[test]
fn the_cross_attention_scale_multiplies_the_adapters_weights() {
    let mut pipeline = pipeline();
    pipeline.adapters = vec![adapter("style", A, 1.0)];
    let reference = lora_fixture().tensors("expected.safetensors");
    let args = GenerateArgs {
        lora_scale: 0.6,
        ..run_args()
    };
    assert_close(
        "a at 1.0, scale 0.6",
        &image(&pipeline, &args),
        &reference["a_scaled_image"],
        IMAGE_TOLERANCE,
    );
}

/// Only layers that run branches are targets: a LoRA pair for the token embedding (a
/// weight of a fitting shape, but no layer that applies a branch) is refused by name
/// rather than loaded and silently ignored.
#[test]
fn a_layer_that_runs_no_branch_is_no_target() {
    let pipeline = pipeline();
    let modules = pipeline.text_encoder.lora_modules();
    assert!(modules.contains_key("encoder.layers.0.self_attn.q_proj"));
    assert!(!modules.contains_key("embeddings.token_embedding"));
    assert!(pipeline
        .unet
        .lora_modules()
        .contains_key("down_blocks.0.resnets.0.time_emb_proj"));
    assert!(pipeline
        .unet
        .lora_modules()
        .contains_key("up_blocks.0.attentions.1.proj_in"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedding.safetensors");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let vocab = pipeline.text_encoder.config().vocab_size;
    let tensors = std::collections::HashMap::from([
        (
            "text_encoder.text_model.embeddings.token_embedding.lora_A.weight".to_string(),
            zeros(&[2, 32]),
        ),
        (
            "text_encoder.text_model.embeddings.token_embedding.lora_B.weight".to_string(),
            zeros(&[vocab, 2]),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let lora = LoraAdapter::load(&path).unwrap();
    let e = lora
        .targets("text_encoder", modules)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`text_model.embeddings.token_embedding` names no layer of the text_encoder"),
        "{e}"
    );
}
