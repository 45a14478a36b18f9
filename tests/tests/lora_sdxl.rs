//! End-to-end: an LCM-LoRA-style adapter on Stable Diffusion XL through `dwctl run`. The
//! file is written as `latent-consistency/lcm-lora-sdxl` and kohya-trained SDXL LoRAs are:
//! kohya names (`lora_unet_down_blocks_1_attentions_0_..._to_q`, `lora_te1_`, `lora_te2_`)
//! with `.alpha` 8 over rank 4, on the layers LCM-LoRA adapts (attention projections,
//! feed-forwards, ResNet convolutions and time projections, down- and upsamplers), and runs
//! with `LCMScheduler`, 4 steps and guidance 1. Its image equals, within a level, the image
//! of a copy of the model with `scale * alpha / rank * B @ A` merged into each weight, as
//! diffusers' `fuse_lora` merges; another scale loads nothing; the base image afterwards is
//! a fresh daemon's bit for bit. (kohya's sgm-named UNet layers are held to the same merge
//! in `dwd/tests/parity_sdxl_lora.rs`.)

use std::path::Path;

use dw_tests::{copy_dir, max_level_difference, png_pixels, repo_root, TestDaemon};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const RANK: usize = 4;
const ALPHA: f32 = 8.0;
/// LCM-LoRA's targets (its training script's `target_modules`).
const UNET_TARGETS: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];
const TEXT_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];
/// Each adapted component: its kohya prefix, its weight file and the layers adapted.
const COMPONENTS: [(&str, &str, &[&str]); 3] = [
    (
        "lora_unet_",
        "unet/diffusion_pytorch_model.safetensors",
        UNET_TARGETS,
    ),
    ("lora_te1_", "text_encoder/model.safetensors", TEXT_TARGETS),
    (
        "lora_te2_",
        "text_encoder_2/model.safetensors",
        TEXT_TARGETS,
    ),
];

fn model_dir() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/tiny-sdxl/model")
}

/// One adapted layer: its module, its weight's shape, A and B.
struct Layer {
    module: String,
    shape: Vec<usize>,
    down: Vec<f32>,
    up: Vec<f32>,
}

fn values(count: usize, seed: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((i * 7 + seed * 13) % 17) as f32 / 40.0 - 0.2)
        .collect()
}

/// The layers of a weight file whose module ends in one of `targets`.
fn layers(file: &Path, targets: &[&str], seed: &mut usize) -> Vec<Layer> {
    let bytes = std::fs::read(file).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut layers = Vec::new();
    for name in names {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let shape = tensors.tensor(&name).unwrap().shape().to_vec();
        let adapted = targets.iter().any(|t| module.ends_with(&format!(".{t}")));
        if !adapted || !(shape.len() == 2 || shape.len() == 4) {
            continue;
        }
        *seed += 1;
        let inner: usize = shape[1..].iter().product();
        layers.push(Layer {
            module: module.to_string(),
            down: values(RANK * inner, *seed),
            up: values(shape[0] * RANK, *seed + 100),
            shape,
        });
    }
    layers
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes the kohya file and gives the layers of each component.
fn write_lora(path: &Path) -> Vec<(&'static str, Vec<Layer>)> {
    let mut seed = 0;
    let adapted: Vec<(&str, Vec<Layer>)> = COMPONENTS
        .iter()
        .map(|(_, file, targets)| {
            let layers = layers(&model_dir().join(file), targets, &mut seed);
            assert!(layers.len() >= 8, "{file}: only {} layers", layers.len());
            (*file, layers)
        })
        .collect();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for ((prefix, _, _), (_, layers)) in COMPONENTS.iter().zip(&adapted) {
        for layer in layers {
            let stem = format!("{prefix}{}", layer.module.replace('.', "_"));
            let mut down_shape = vec![RANK];
            down_shape.extend_from_slice(&layer.shape[1..]);
            let mut up_shape = vec![layer.shape[0], RANK];
            up_shape.extend(std::iter::repeat_n(1, layer.shape.len() - 2));
            data.push((
                format!("{stem}.lora_down.weight"),
                down_shape,
                le_bytes(&layer.down),
            ));
            data.push((
                format!("{stem}.lora_up.weight"),
                up_shape,
                le_bytes(&layer.up),
            ));
            data.push((format!("{stem}.alpha"), vec![], le_bytes(&[ALPHA])));
        }
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    adapted
}

/// A copy of the model with `scale * alpha / rank * B @ A` added to each adapted weight.
fn merged_model(adapted: &[(&str, Vec<Layer>)], scale: f32, into: &Path) {
    copy_dir(&model_dir(), into);
    for (file, layers) in adapted {
        let path = into.join(file);
        let bytes = std::fs::read(&path).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in tensors.tensors() {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let mut weight: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let layer = layers
                .iter()
                .find(|l| format!("{}.weight", l.module) == name);
            if let Some(layer) = layer {
                let inner = weight.len() / layer.shape[0];
                let factor = scale * ALPHA / RANK as f32;
                for (o, row) in weight.chunks_exact_mut(inner).enumerate() {
                    for (i, w) in row.iter_mut().enumerate() {
                        let product: f32 = (0..RANK)
                            .map(|r| layer.up[o * RANK + r] * layer.down[r * inner + i])
                            .sum();
                        *w += factor * product;
                    }
                }
            }
            data.push((name, view.shape().to_vec(), le_bytes(&weight)));
        }
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(name, shape, bytes)| {
                (
                    name.clone(),
                    TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
}

/// The LCM workflow on `model`, with the LoRA at `scale` (none for `None`).
fn workflow(daemon: &TestDaemon, model: &Path, lora: Option<(&Path, f64)>) -> std::path::PathBuf {
    let loras = match lora {
        Some((file, scale)) => format!(
            r#""loras": [{{"model_name": "{}", "weight_name": "{}", "scale": {scale}}}],"#,
            file.parent().unwrap().display(),
            file.file_name().unwrap().to_str().unwrap()
        ),
        None => String::new(),
    };
    let text = format!(
        r#"{{
  "id": "sdxl_lcm_lora",
  "steps": [{{
    "name": "main",
    "pipeline": {{
      "configuration": {{"component_type": "StableDiffusionXLPipeline"}},
      {loras}
      "from_pretrained_arguments": {{"model_name": "{}", "torch_dtype": "torch.float32"}},
      "scheduler": {{"configuration": {{"scheduler_type": "LCMScheduler"}}}},
      "seed": 7,
      "arguments": {{
        "prompt": "a lighthouse on a rocky cliff",
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
        "height": 128,
        "width": 128
      }}
    }},
    "result": {{"content_type": "image/png"}}
  }}]
}}"#,
        model.display()
    );
    let path = daemon.dir.path().join("sdxl-lcm-lora.json");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs a workflow; its image's pixels and the run's cache misses.
fn run(daemon: &TestDaemon, workflow: &Path) -> (Vec<u8>, u64) {
    let out = daemon.output_dir();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    run.assert_code(0);
    let summary = run.json();
    let path = summary["outputs"][0]["path"].as_str().unwrap().to_string();
    let misses = summary["cache"]["misses"].as_u64().unwrap();
    (png_pixels(Path::new(&path)).2, misses)
}

#[test]
fn an_lcm_style_kohya_lora_on_sdxl_equals_its_merged_weights_and_swaps_without_loading() {
    let daemon = TestDaemon::new();
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("lcm/pytorch_lora_weights.safetensors");
    std::fs::create_dir_all(lora.parent().unwrap()).unwrap();
    let adapted = write_lora(&lora);
    let merged = dir.path().join("merged");
    merged_model(&adapted, 0.7, &merged);

    let (with_lora, misses) = run(
        &daemon,
        &workflow(&daemon, &model_dir(), Some((&lora, 0.7))),
    );
    // two tokenizers, two text encoders, UNet, VAE and the LoRA.
    assert_eq!(misses, 7);
    let (fused, _) = run(&daemon, &workflow(&daemon, &merged, None));
    let levels = max_level_difference(&with_lora, &fused);
    assert!(levels <= 1, "LoRA vs merged weights: {levels} levels");

    let (other_scale, misses) = run(
        &daemon,
        &workflow(&daemon, &model_dir(), Some((&lora, 0.35))),
    );
    assert_eq!(misses, 0, "another scale loads nothing");
    assert!(max_level_difference(&other_scale, &with_lora) > 1);

    let (base, misses) = run(&daemon, &workflow(&daemon, &model_dir(), None));
    assert_eq!(misses, 0);
    assert!(
        max_level_difference(&base, &with_lora) > 1,
        "the LoRA changed nothing"
    );
    let fresh = TestDaemon::new();
    let (untouched, _) = run(&fresh, &workflow(&fresh, &model_dir(), None));
    assert_eq!(
        base, untouched,
        "the base image after LoRA runs is the base image"
    );
}
