//! LoRAs on Stable Diffusion XL (`tests/fixtures/tiny-sdxl`), held to the arithmetic PEFT
//! runs and diffusers' `fuse_lora` merges: a run with a LoRA on both text encoders and on
//! every layer of the UNet that takes one equals the base pipeline loaded from a copy of
//! the folder whose weights have `w * alpha / rank * B @ A` added. The same LoRA written
//! the kohya way, with the UNet named after Stability's sgm model as kohya's SDXL trainer
//! names it (`lora_unet_input_blocks_4_1_...`, `lora_te1_`, `lora_te2_`), gives the same
//! image bit for bit. The sgm names here are made by the inverse of the mapping, written
//! independently of the loader's.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::merge::{merged_model, one_lora, random_lora, save, save_peft, LoraLayer, ALPHA};
use common::{assert_close, Fixture};
use dwd::pipelines::stable_diffusion_xl::PromptTexts;
use dwd::pipelines::{ReplayNoise, StableDiffusionXlPipeline, XlArgs};

/// Images in [0, 1]; merged weights round differently from the branch, far below a level.
const IMAGE_TOLERANCE: f32 = 1e-4;

/// The component folders and their weight files.
const FILES: [(&str, &str); 3] = [
    ("unet", "unet/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "text_encoder/model.safetensors"),
    ("text_encoder_2", "text_encoder_2/model.safetensors"),
];

fn model_dir() -> std::path::PathBuf {
    Fixture::new("tiny-sdxl").dir().join("model")
}

fn pipeline(dir: &Path) -> StableDiffusionXlPipeline {
    StableDiffusionXlPipeline::load(dir, DType::F32, &Device::Cpu).unwrap()
}

/// kohya's sgm name for a diffusers UNet module (underscored), for `layers` per block:
/// the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` renumbering.
fn sgm_name(module: &str, layers: usize) -> String {
    let per_block = layers + 1;
    let parts: Vec<&str> = module.split('.').collect();
    let rest = |from: usize| parts[from..].join("_");
    let resnet = |layer: &str| match layer {
        "conv1" => "in_layers_2",
        "conv2" => "out_layers_3",
        "time_emb_proj" => "emb_layers_1",
        "conv_shortcut" => "skip_connection",
        other => panic!("no sgm name for resnet layer {other}"),
    };
    let index = |i: usize| parts[i].parse::<usize>().unwrap();
    match (parts[0], parts.get(2).copied()) {
        ("conv_in", _) => "input_blocks_0_0".to_string(),
        ("conv_out", _) => "out_2".to_string(),
        ("time_embedding", _) => match parts[1] {
            "linear_1" => "time_embed_0".to_string(),
            _ => "time_embed_2".to_string(),
        },
        ("add_embedding", _) => match parts[1] {
            "linear_1" => "label_emb_0_0".to_string(),
            _ => "label_emb_0_2".to_string(),
        },
        ("down_blocks", Some("resnets")) => format!(
            "input_blocks_{}_0_{}",
            index(1) * per_block + index(3) + 1,
            resnet(&rest(4))
        ),
        ("down_blocks", Some("attentions")) => format!(
            "input_blocks_{}_1_{}",
            index(1) * per_block + index(3) + 1,
            rest(4)
        ),
        ("down_blocks", Some("downsamplers")) => {
            format!("input_blocks_{}_0_op", (index(1) + 1) * per_block)
        }
        ("up_blocks", Some("resnets")) => format!(
            "output_blocks_{}_0_{}",
            index(1) * per_block + index(3),
            resnet(&rest(4))
        ),
        ("up_blocks", Some("attentions")) => format!(
            "output_blocks_{}_1_{}",
            index(1) * per_block + index(3),
            rest(4)
        ),
        ("up_blocks", Some("upsamplers")) => {
            format!("output_blocks_{}_2_conv", index(1) * per_block + layers)
        }
        ("mid_block", _) => match parts[1] {
            "resnets" => format!("middle_block_{}_{}", index(2) * 2, resnet(&rest(3))),
            _ => format!("middle_block_1_{}", rest(3)),
        },
        _ => panic!("no sgm name for {module}"),
    }
}

/// A LoRA on every adaptable layer of both text encoders and the UNet.
fn make_lora(base: &StableDiffusionXlPipeline) -> Vec<LoraLayer> {
    let first = &base.text_encoders.first.as_ref().unwrap().encoder;
    random_lora(&[
        ("unet", base.unet.lora_modules()),
        ("text_encoder", first.lora_modules()),
        (
            "text_encoder_2",
            base.text_encoders.second.encoder.lora_modules(),
        ),
    ])
}

/// The same LoRA as kohya's SDXL trainer writes it: the UNet under sgm names,
/// `lora_te1_`/`lora_te2_`, `.alpha`.
fn save_kohya(layers: &[LoraLayer], path: &Path) {
    let alpha = Tensor::new(ALPHA, &Device::Cpu).unwrap();
    let mut tensors = HashMap::new();
    for layer in layers {
        let stem = match layer.component {
            "unet" => format!("lora_unet_{}", sgm_name(&layer.module, 2)),
            "text_encoder" => format!("lora_te1_{}", layer.module.replace('.', "_")),
            _ => format!("lora_te2_{}", layer.module.replace('.', "_")),
        };
        tensors.insert(format!("{stem}.lora_down.weight"), layer.down.clone());
        tensors.insert(format!("{stem}.lora_up.weight"), layer.up.clone());
        tensors.insert(format!("{stem}.alpha"), alpha.clone());
    }
    save(&tensors, path, None);
}

/// The files of `make_lora`'s LoRA: PEFT and kohya.
fn lora_files(base: &StableDiffusionXlPipeline, dir: &Path) -> (Vec<LoraLayer>, PathBuf, PathBuf) {
    let layers = make_lora(base);
    let (peft, kohya) = (dir.join("peft.safetensors"), dir.join("kohya.safetensors"));
    save_peft(&layers, &peft);
    save_kohya(&layers, &kohya);
    (layers, peft, kohya)
}

fn args(base: &StableDiffusionXlPipeline) -> XlArgs {
    let mut args = XlArgs {
        texts: PromptTexts {
            prompts: vec!["a fox in the snow".to_string()],
            negative_prompt: Some("blurry".to_string()),
            ..PromptTexts::default()
        },
        num_inference_steps: 3,
        guidance_scale: 5.0,
        scheduler_type: Some("DDIMScheduler".to_string()),
        ..XlArgs::default()
    };
    let shape = base.latent_shape(&args).unwrap();
    args.latents = Some(Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap());
    args
}

fn image(pipeline: &StableDiffusionXlPipeline, args: &XlArgs) -> Tensor {
    pipeline
        .generate(
            args,
            &mut ReplayNoise::new(Vec::new()),
            &mut common::no_progress(),
        )
        .unwrap()
}

fn with_lora(
    mut pipeline: StableDiffusionXlPipeline,
    path: &Path,
    weight: f64,
) -> StableDiffusionXlPipeline {
    pipeline.adapters = one_lora(path, weight);
    pipeline
}

#[test]
fn a_lora_on_both_text_encoders_and_the_unet_equals_its_merged_weights_in_either_layout() {
    let base = pipeline(&model_dir());
    let unet_layers = base.unet.lora_modules().len();
    assert!(unet_layers > 50, "only {unet_layers} UNet layers");
    let dir = tempfile::tempdir().unwrap();
    let (layers, peft, kohya) = lora_files(&base, dir.path());
    let args = args(&base);
    let base_image = image(&base, &args);

    let weight = 0.8;
    let merged_dir = dir.path().join("merged");
    merged_model(&model_dir(), &FILES, &layers, weight, &merged_dir);
    let merged = image(&pipeline(&merged_dir), &args);
    let with_peft = with_lora(base, &peft, weight);
    let peft_image = image(&with_peft, &args);
    assert_close(
        "PEFT LoRA vs merged weights",
        &peft_image,
        &merged,
        IMAGE_TOLERANCE,
    );
    let moved = common::max_abs_diff(&peft_image, &base_image);
    assert!(moved > 1e-2, "the LoRA barely changed the image ({moved})");

    let with_kohya = with_lora(with_peft, &kohya, weight);
    let kohya_image = image(&with_kohya, &args);
    assert_eq!(
        common::max_abs_diff(&kohya_image, &peft_image),
        0.0,
        "the kohya (sgm) file differs from the PEFT one"
    );

    let mut without = with_kohya;
    without.adapters.clear();
    assert_eq!(
        common::max_abs_diff(&image(&without, &args), &base_image),
        0.0
    );
}

#[test]
fn cross_attention_kwargs_scale_is_the_adapters_weight() {
    let base = pipeline(&model_dir());
    let dir = tempfile::tempdir().unwrap();
    let (_, peft, _) = lora_files(&base, dir.path());
    let args = args(&base);
    let at_half = image(&with_lora(pipeline(&model_dir()), &peft, 0.5), &args);
    let scaled = XlArgs {
        lora_scale: 0.5,
        ..args.clone()
    };
    let by_kwargs = image(&with_lora(base, &peft, 1.0), &scaled);
    assert_close("scale 0.5 vs weight 0.5", &by_kwargs, &at_half, 1e-6);
}

#[test]
fn a_file_naming_the_unet_both_ways_is_refused() {
    let base = pipeline(&model_dir());
    let dir = tempfile::tempdir().unwrap();
    let (_, _, kohya) = lora_files(&base, dir.path());
    let mut mixed = candle_core::safetensors::load(&kohya, &Device::Cpu).unwrap();
    let renamed: Vec<(String, Tensor)> = mixed
        .iter()
        .filter_map(|(name, tensor)| {
            let rest = name.strip_prefix("lora_unet_input_blocks_1_0_in_layers_2")?;
            Some((
                format!("lora_unet_down_blocks_0_resnets_0_conv1{rest}"),
                tensor.clone(),
            ))
        })
        .collect();
    mixed.extend(renamed);
    let path = dir.path().join("mixed.safetensors");
    save(&mixed, &path, None);
    let with = with_lora(base, &path, 1.0);
    let args = args(&with);
    let e = with
        .generate(
            &args,
            &mut ReplayNoise::new(Vec::new()),
            &mut common::no_progress(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("both after Stability's sgm model"), "{e}");
}
