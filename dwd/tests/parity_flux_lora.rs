//! LoRAs on FLUX.1 against diffusers (`tests/fixtures/tiny-flux-lora`: a PEFT file on
//! tiny-flux's transformer, 39 Linear layers of the double and single blocks, applied with
//! `load_lora_weights` + `set_adapters` as diffusers-workflow does): the transformer alone
//! and the recorded 3-step runs at weights 1.0 and 0.5, on one loaded pipeline, and
//! `joint_attention_kwargs` as a scale on the weights.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Fixture};
use dwd::pipelines::flux::{FluxArgs, FluxInputs, FluxPipeline};
use dwd::pipelines::lora::{with_adapters, ActiveAdapters, Adapter, LoraAdapter};
use dwd::pipelines::ReplayNoise;

const TRANSFORMER_TOLERANCE: f32 = 1e-4;
/// An image in [0, 1]: well under one 8-bit level.
const IMAGE_TOLERANCE: f32 = 1e-3;

fn lora_fixture() -> Fixture {
    Fixture::new("tiny-flux-lora")
}

fn pipeline() -> FluxPipeline {
    let model = Fixture::new("tiny-flux").model_dir();
    FluxPipeline::load(&model, DType::F32, &Device::Cpu).unwrap()
}

fn style(weight: f64) -> Adapter {
    let path = lora_fixture()
        .dir()
        .join("peft/pytorch_lora_weights.safetensors");
    Adapter {
        name: "style".to_string(),
        weight,
        lora: Arc::new(LoraAdapter::load(&path).unwrap()),
    }
}

/// The recorded run (`expected.json` → `run`) from the fixture's packed latents.
fn run_args() -> FluxArgs {
    let expected = lora_fixture().json("expected.json");
    let run = &expected["run"];
    let number = |key: &str| run[key].as_u64().unwrap() as usize;
    FluxArgs {
        prompts: vec![run["prompt"].as_str().unwrap().to_string()],
        height: Some(number("height")),
        width: Some(number("width")),
        num_inference_steps: number("steps"),
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        max_sequence_length: number("max_sequence_length"),
        latents: Some(lora_fixture().tensors("latents.safetensors")["latents"].clone()),
        ..FluxArgs::default()
    }
}

fn image(pipeline: &FluxPipeline, args: &FluxArgs) -> Tensor {
    let mut noise = ReplayNoise::new(Vec::new());
    pipeline
        .generate(args, &mut noise, &mut |_| {}, &mut |_| Ok(()))
        .unwrap()
}

#[test]
fn the_lora_targets_the_layers_diffusers_adapted() {
    let pipeline = pipeline();
    let lora = style(1.0).lora;
    let modules = pipeline.transformer.model().lora_modules();
    let got: BTreeSet<String> = lora
        .targets("transformer", modules)
        .unwrap()
        .iter()
        .map(|t| t.module.to_string())
        .collect();
    let expected = lora_fixture().json("expected.json");
    let want: BTreeSet<String> = expected["loras"]["a"]["modules"]["transformer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 39);
}

#[test]
fn the_transformer_alone_matches_at_each_weight() {
    let pipeline = pipeline();
    let reference = lora_fixture().tensors("expected.safetensors");
    let ids = |name: &str| -> Vec<[f32; 3]> {
        reference[name]
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| [row[0], row[1], row[2]])
            .collect()
    };
    let (txt_ids, img_ids) = (ids("tr_txt_ids"), ids("tr_img_ids"));
    let scalar = |name: &str| {
        reference[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    };
    for (case, weight) in [("base", None), ("a", Some(1.0)), ("a_scaled", Some(0.5))] {
        let adapters: Vec<Adapter> = weight.map(style).into_iter().collect();
        let place = (DType::F32, &Device::Cpu);
        let modules = pipeline.transformer.model().lora_modules();
        let active = ActiveAdapters::build("transformer", modules, &adapters, 1.0, place).unwrap();
        let out = with_adapters(active.as_ref(), || {
            pipeline.transformer.model().forward(&FluxInputs {
                hidden_states: &reference["tr_x"],
                encoder_hidden_states: &reference["tr_ehs"],
                pooled_projections: &reference["tr_pooled"],
                timestep: scalar("tr_t"),
                guidance: Some(scalar("tr_guidance")),
                txt_ids: &txt_ids,
                img_ids: &img_ids,
            })
        })
        .unwrap();
        let name = format!("tr_out_{case}");
        assert_close(&name, &out, &reference[&name], TRANSFORMER_TOLERANCE);
    }
}

#[test]
fn each_recorded_run_gives_diffusers_image_and_the_scale_kwarg_is_a_weight() {
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
    for (case, weight) in [("a", 1.0), ("a_scaled", 0.5)] {
        pipeline.adapters = vec![style(weight)];
        let name = format!("{case}_image");
        assert_close(
            &name,
            &image(&pipeline, &args),
            &reference[&name],
            IMAGE_TOLERANCE,
        );
    }
    pipeline.adapters = vec![style(1.0)];
    let scaled = FluxArgs {
        lora_scale: 0.5,
        ..run_args()
    };
    let name = "a_scaled_image";
    assert_close(
        name,
        &image(&pipeline, &scaled),
        &reference[name],
        IMAGE_TOLERANCE,
    );
    pipeline.adapters = Vec::new();
    let again = image(&pipeline, &args);
    let same = base.eq(&again).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(
        same.min_all().unwrap().to_scalar::<f32>().unwrap(),
        1.0,
        "base image unchanged"
    );
}
