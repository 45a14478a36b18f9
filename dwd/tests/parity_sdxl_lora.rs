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
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Fixture};
use dwd::pipelines::lora::{Adapter, LoraAdapter, LoraModules};
use dwd::pipelines::stable_diffusion_xl::PromptTexts;
use dwd::pipelines::{ReplayNoise, StableDiffusionXlPipeline, XlArgs};

const RANK: usize = 2;
const ALPHA: f32 = 3.0;
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

/// A (rank, in...) and B (out, rank, 1...) for a weight of `shape`, small and seeded by
/// the module's position.
fn pair(shape: &[usize], seed: usize) -> (Tensor, Tensor) {
    let device = Device::Cpu;
    let mut down_shape = vec![RANK];
    down_shape.extend_from_slice(&shape[1..]);
    let mut up_shape = vec![shape[0], RANK];
    up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
    let values = |shape: &[usize], salt: usize| {
        let count: usize = shape.iter().product();
        let data: Vec<f32> = (0..count)
            .map(|i| (((i * 7 + seed * 13 + salt) % 17) as f32 - 8.0) / 40.0)
            .collect();
        Tensor::from_vec(data, shape, &device).unwrap()
    };
    (values(&down_shape, 1), values(&up_shape, 5))
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

/// The LoRA on every adaptable layer of the three components: the PEFT file, the kohya
/// file with sgm UNet names, and the deltas (`alpha / rank * B @ A`) by component and
/// module.
struct Made {
    peft: HashMap<String, Tensor>,
    kohya: HashMap<String, Tensor>,
    deltas: Vec<(&'static str, String, Tensor)>,
}

fn make_lora(base: &StableDiffusionXlPipeline) -> Made {
    let first = &base.text_encoders.first.as_ref().unwrap().encoder;
    let components: [(&str, &str, &LoraModules); 3] = [
        ("unet", "lora_unet_", base.unet.lora_modules()),
        ("text_encoder", "lora_te1_", first.lora_modules()),
        (
            "text_encoder_2",
            "lora_te2_",
            base.text_encoders.second.encoder.lora_modules(),
        ),
    ];
    let layers = 2;
    let mut made = Made {
        peft: HashMap::new(),
        kohya: HashMap::new(),
        deltas: Vec::new(),
    };
    let alpha = Tensor::new(ALPHA, &Device::Cpu).unwrap();
    for (seed, (component, prefix, module, shape)) in components
        .iter()
        .flat_map(|(c, p, modules)| modules.iter().map(move |(m, s)| (*c, *p, m, s)))
        .enumerate()
    {
        let (down, up) = pair(shape, seed);
        made.peft
            .insert(format!("{component}.{module}.lora_A.weight"), down.clone());
        made.peft
            .insert(format!("{component}.{module}.lora_B.weight"), up.clone());
        let kohya = match component {
            "unet" => sgm_name(module, layers),
            _ => module.replace('.', "_"),
        };
        made.kohya
            .insert(format!("{prefix}{kohya}.lora_down.weight"), down.clone());
        made.kohya
            .insert(format!("{prefix}{kohya}.lora_up.weight"), up.clone());
        made.kohya
            .insert(format!("{prefix}{kohya}.alpha"), alpha.clone());
        let product = up
            .reshape((shape[0], RANK))
            .unwrap()
            .matmul(&down.reshape((RANK, ())).unwrap())
            .unwrap();
        let delta =
            (product.reshape(shape.as_slice()).unwrap() * (ALPHA as f64 / RANK as f64)).unwrap();
        made.deltas.push((component, module.clone(), delta));
    }
    made
}

/// PEFT's config for the file: rank and alpha per component.
fn peft_metadata() -> HashMap<String, String> {
    let config: serde_json::Map<String, serde_json::Value> =
        ["unet", "text_encoder", "text_encoder_2"]
            .iter()
            .flat_map(|c| {
                [
                    (format!("{c}.r"), serde_json::json!(RANK)),
                    (format!("{c}.lora_alpha"), serde_json::json!(ALPHA)),
                ]
            })
            .collect();
    HashMap::from([(
        "lora_adapter_metadata".to_string(),
        serde_json::Value::Object(config).to_string(),
    )])
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path, metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// A copy of the model folder with `weight * delta` merged into each adapted weight.
fn merged_model(deltas: &[(&'static str, String, Tensor)], weight: f64, into: &Path) {
    common::copy_dir(&model_dir(), into);
    for (component, file) in FILES {
        let path = into.join(file);
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for (_, module, delta) in deltas.iter().filter(|(c, _, _)| *c == component) {
            let name = format!("{module}.weight");
            let base = tensors[&name].to_dtype(DType::F32).unwrap();
            tensors.insert(name, (base + (delta * weight).unwrap()).unwrap());
        }
        save(&tensors, &path, None);
    }
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
    pipeline.adapters = vec![Adapter {
        name: "0".to_string(),
        weight,
        lora: Arc::new(LoraAdapter::load(path).unwrap()),
    }];
    pipeline
}

#[test]
fn a_lora_on_both_text_encoders_and_the_unet_equals_its_merged_weights_in_either_layout() {
    let base = pipeline(&model_dir());
    let made = make_lora(&base);
    let unet_layers = base.unet.lora_modules().len();
    assert!(unet_layers > 50, "only {unet_layers} UNet layers");
    let dir = tempfile::tempdir().unwrap();
    let (peft, kohya) = (
        dir.path().join("peft.safetensors"),
        dir.path().join("kohya.safetensors"),
    );
    save(&made.peft, &peft, Some(peft_metadata()));
    save(&made.kohya, &kohya, None);
    let args = args(&base);
    let base_image = image(&base, &args);

    let weight = 0.8;
    let merged_dir = dir.path().join("merged");
    merged_model(&made.deltas, weight, &merged_dir);
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
    let made = make_lora(&base);
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("peft.safetensors");
    save(&made.peft, &peft, Some(peft_metadata()));
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
    let made = make_lora(&base);
    let mut mixed = made.kohya.clone();
    for (name, tensor) in made.kohya.iter() {
        if let Some(rest) = name.strip_prefix("lora_unet_input_blocks_1_0_in_layers_2") {
            mixed.insert(
                format!("lora_unet_down_blocks_0_resnets_0_conv1{rest}"),
                tensor.clone(),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
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
