//! LoRA files read as diffusers reads them (`tests/fixtures/tiny-sd15-lora`, written by
//! diffusers 0.42.1 and peft 0.21.2 for `tiny-sd15`): both layouts, alpha from PEFT's
//! header metadata and from kohya's `.alpha`, text encoder names with and without
//! `text_model.`, 1x1 convolutions, and each pair matched to exactly the layers diffusers
//! adapted (`expected.json` → `loras.<name>.modules`); `(alpha / rank) * B @ A` against the
//! deltas diffusers recorded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::{assert_close, Fixture};
use dwd::pipelines::lora::{module_shapes, LoraAdapter, LoraLayout};

fn lora_fixture() -> Fixture {
    Fixture::new("tiny-sd15-lora")
}

fn adapter(path: &str) -> LoraAdapter {
    LoraAdapter::load(&lora_fixture().dir().join(path)).unwrap()
}

/// The module names and weight shapes of one of tiny-sd15's components.
fn modules(component: &str) -> BTreeMap<String, Vec<usize>> {
    let dir = Fixture::new("tiny-sd15").model_dir().join(component);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    module_shapes(&files).unwrap()
}

/// The modules diffusers adapted with one of the fixture's LoRAs.
fn adapted(lora: &str, component: &str) -> BTreeSet<String> {
    let expected = lora_fixture().json("expected.json");
    expected["loras"][lora]["modules"][component]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

fn targeted(adapter: &LoraAdapter, component: &str) -> BTreeSet<String> {
    let modules = modules(component);
    adapter
        .targets(component, &modules)
        .unwrap()
        .iter()
        .map(|t| t.module.to_string())
        .collect()
}

#[test]
fn a_peft_file_targets_the_layers_diffusers_adapted() {
    let a = adapter("peft/pytorch_lora_weights.safetensors");
    assert_eq!(a.layout, LoraLayout::Peft);
    assert_eq!(a.components(), ["text_encoder", "unet"]);
    for component in ["unet", "text_encoder"] {
        let got = targeted(&a, component);
        assert_eq!(got, adapted("a", component), "{component}");
    }
    assert_eq!(targeted(&a, "unet").len(), 48);
    assert_eq!(targeted(&a, "text_encoder").len(), 20);
    // rank 4, lora_alpha 2.0 in the header's PEFT config.
    assert!(a.entries.iter().all(|e| e.rank() == 4 && e.scale == 0.5));
}

/// Second LoRA: GEGLU projections, the feed-forward out, the 1x1 convolutions `proj_in`
/// and `proj_out`; rank 2, alpha 3.
#[test]
fn convolutions_and_feed_forwards_are_targets_too() {
    let b = adapter("second/pytorch_lora_weights.safetensors");
    for component in ["unet", "text_encoder"] {
        assert_eq!(
            targeted(&b, component),
            adapted("b", component),
            "{component}"
        );
    }
    assert!(b.entries.iter().all(|e| e.rank() == 2 && e.scale == 1.5));
}

#[test]
fn deltas_are_alpha_over_rank_times_b_a_as_diffusers_computes_them() {
    let reference = lora_fixture().tensors("expected.safetensors");
    let expected = lora_fixture().json("expected.json");
    for delta in expected["deltas"].as_array().unwrap() {
        let file = match delta["lora"].as_str().unwrap() {
            "a" => "peft/pytorch_lora_weights.safetensors",
            _ => "second/pytorch_lora_weights.safetensors",
        };
        let lora = adapter(file);
        let component = delta["component"].as_str().unwrap();
        let module = delta["module"].as_str().unwrap();
        let modules = modules(component);
        let targets = lora.targets(component, &modules).unwrap();
        let target = targets.iter().find(|t| t.module == module).unwrap();
        let name = delta["tensor"].as_str().unwrap();
        assert_close(name, &target.entry.delta().unwrap(), &reference[name], 1e-6);
    }
}

/// kohya's file holds LoRA A under `lora_unet_*` / `lora_te_text_model_*` names with
/// `.alpha`: it resolves to the same layers with the same deltas, bit for bit.
#[test]
fn the_kohya_file_is_the_peft_file_under_other_names() {
    let peft = adapter("peft/pytorch_lora_weights.safetensors");
    let kohya = adapter("kohya/lora.safetensors");
    assert_eq!(kohya.layout, LoraLayout::Kohya);
    for component in ["unet", "text_encoder"] {
        let modules = modules(component);
        let deltas = |adapter: &LoraAdapter| -> BTreeMap<String, Vec<f32>> {
            adapter
                .targets(component, &modules)
                .unwrap()
                .iter()
                .map(|t| {
                    let delta = t.entry.delta().unwrap();
                    (
                        t.module.to_string(),
                        delta.flatten_all().unwrap().to_vec1().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(deltas(&kohya), deltas(&peft), "{component}");
    }
}

/// A LoRA for layers the model lacks is refused naming the key and what was near.
#[test]
fn a_module_the_model_lacks_is_refused_by_name() {
    let a = adapter("peft/pytorch_lora_weights.safetensors");
    let mut unet = modules("unet");
    unet.remove("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q");
    let e = a.targets("unet", &unet).unwrap_err().to_string();
    assert!(
        e.contains("`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` names no layer of the unet")
            && e.contains("layers ending alike: "),
        "{e}"
    );
    // The text encoder's LoRA matched against the UNet's layers: nothing fits.
    let text_encoder_modules = modules("text_encoder");
    let e = a
        .targets("unet", &text_encoder_modules)
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no layer of the unet"), "{e}");
}

/// Tensors of layouts not read are refused by what they are, naming the tensor.
#[test]
fn unread_layouts_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, &[usize])]| -> PathBuf {
        let map: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(key, shape)| {
                let t = candle_core::Tensor::zeros(
                    *shape,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                );
                (key.to_string(), t.unwrap())
            })
            .collect();
        let path = dir.path().join(name);
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    };
    let dora = write(
        "dora.safetensors",
        &[
            ("unet.a.lora_A.weight", &[2, 4]),
            ("unet.a.lora_B.weight", &[4, 2]),
            ("unet.a.lora_magnitude_vector", &[4]),
        ],
    );
    let e = LoraAdapter::load(&dora).unwrap_err().to_string();
    assert!(
        e.contains("`unet.a.lora_magnitude_vector` is a DoRA magnitude"),
        "{e}"
    );
    let neither = write("plain.safetensors", &[("unet.a.weight", &[2, 2])]);
    let e = LoraAdapter::load(&neither).unwrap_err().to_string();
    assert!(
        e.contains("holds no LoRA tensors") && e.contains("`unet.a.weight`"),
        "{e}"
    );
    let orphan = write("orphan.safetensors", &[("unet.a.lora_A.weight", &[2, 4])]);
    let e = LoraAdapter::load(&orphan).unwrap_err().to_string();
    assert!(e.contains("`unet.a.lora_B.weight` is missing"), "{e}");
    let other = write(
        "other.safetensors",
        &[
            ("vae.a.lora_A.weight", &[2, 4]),
            ("vae.a.lora_B.weight", &[4, 2]),
        ],
    );
    let e = LoraAdapter::load(&other).unwrap_err().to_string();
    assert!(e.contains("`vae.a` names no component dw adapts"), "{e}");
}

/// A 3x3 convolution's LoRA (LoCon, LCM-LoRA's ResNet convolutions): A is a convolution
/// with the layer's kernel, stride and padding, B a 1x1 one; the branch equals the layer
/// with `W + w * scale * B @ A` merged into its weight, as diffusers' `fuse_lora` computes.
#[test]
fn a_three_by_three_convolution_branch_equals_the_merged_weight() {
    use candle_core::{DType, Device, Tensor};
    use dwd::pipelines::lora::{with_adapters, ActiveAdapters, Adapter};
    use std::collections::HashMap;
    use std::sync::Arc;

    let device = Device::Cpu;
    let (cin, cout, rank) = (6, 5, 2);
    let weight = Tensor::randn(0f32, 0.3, (cout, cin, 3, 3), &device).unwrap();
    let bias = Tensor::randn(0f32, 0.3, cout, &device).unwrap();
    let layer_tensors = HashMap::from([
        ("blk.conv1.weight".to_string(), weight.clone()),
        ("blk.conv1.bias".to_string(), bias.clone()),
    ]);
    let vb = candle_nn::VarBuilder::from_tensors(layer_tensors, DType::F32, &device);
    let conv =
        dwd::pipelines::ops::Conv2d::load(vb.pp("blk").pp("conv1"), cin, cout, 3, 2, 1).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locon.safetensors");
    let down = Tensor::randn(0f32, 0.5, (rank, cin, 3, 3), &device).unwrap();
    let up = Tensor::randn(0f32, 0.5, (cout, rank, 1, 1), &device).unwrap();
    let alpha = Tensor::new(1.0f32, &device).unwrap();
    let file = HashMap::from([
        ("lora_unet_blk_conv1.lora_down.weight".to_string(), down),
        ("lora_unet_blk_conv1.lora_up.weight".to_string(), up),
        ("lora_unet_blk_conv1.alpha".to_string(), alpha),
    ]);
    candle_core::safetensors::save(&file, &path).unwrap();
    let lora = Arc::new(dwd::pipelines::lora::LoraAdapter::load(&path).unwrap());
    let modules = BTreeMap::from([("blk.conv1".to_string(), vec![cout, cin, 3, 3])]);
    let weight_of_adapter = -0.7;
    let adapters = [Adapter {
        name: "locon".to_string(),
        weight: weight_of_adapter,
        lora: Arc::clone(&lora),
    }];
    let active =
        ActiveAdapters::build("unet", &modules, &adapters, 1.0, (DType::F32, &device)).unwrap();

    let x = Tensor::randn(0f32, 1.0, (2, cin, 9, 9), &device).unwrap();
    let branched = with_adapters(active.as_ref(), || conv.forward(&x)).unwrap();
    let delta = lora.entries[0].delta().unwrap();
    let conv_with = |w: &Tensor| {
        x.conv2d(w, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
            .unwrap()
    };
    let merged = (&weight + (delta * weight_of_adapter).unwrap()).unwrap();
    assert_close(
        "3x3 LoRA branch, stride 2",
        &branched,
        &conv_with(&merged),
        1e-5,
    );
    // Outside `with_adapters` the layer is the base layer.
    assert_close(
        "without adapters",
        &conv.forward(&x).unwrap(),
        &conv_with(&weight),
        1e-5,
    );
}
