//! End-to-end: LoRAs on the families without a recorded LoRA fixture, through `dwctl run`,
//! each held to a copy of its model with `scale * alpha / rank * B @ A` merged into the
//! adapted weights, as diffusers' `fuse_lora` merges:
//! - Stable Diffusion XL, an LCM-LoRA-style file: written as `latent-consistency/lcm-lora-sdxl`
//!   and kohya-trained SDXL LoRAs are, kohya names (`lora_unet_down_blocks_1_attentions_0_..._to_q`,
//!   `lora_te1_`, `lora_te2_`) with `.alpha` 8 over rank 4 on the layers LCM-LoRA adapts,
//!   run with `LCMScheduler`, 4 steps and guidance 1; another scale loads nothing and the
//!   base image afterwards is a fresh daemon's bit for bit. (kohya's sgm-named UNet layers
//!   are held to the same merge in `dwd/tests/parity_sdxl_lora.rs`.)
//! - Stable Diffusion 3, a diffusers/PEFT file on the transformer and both CLIP encoders,
//!   with `joint_attention_kwargs` scaling it.

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
/// SD 3's LoRA targets (diffusers' SD 3 training script's `target_modules`).
const SD3_TARGETS: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
];

/// How a file names its tensors.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// `<prefix><module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// `<prefix><module>.lora_A.weight`, `.lora_B.weight`; alpha = rank.
    Peft,
}

/// Each adapted component of an SDXL LoRA: its kohya prefix, its weight file and the
/// layers adapted.
const SDXL: [(&str, &str, &[&str]); 3] = [
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

/// SD 3's: the PEFT prefixes of the transformer and both CLIP encoders.
const SD3: [(&str, &str, &[&str]); 3] = [
    (
        "transformer.",
        "transformer/diffusion_pytorch_model.safetensors",
        SD3_TARGETS,
    ),
    (
        "text_encoder.",
        "text_encoder/model.safetensors",
        SD3_TARGETS,
    ),
    (
        "text_encoder_2.",
        "text_encoder_2/model.safetensors",
        SD3_TARGETS,
    ),
];

fn sdxl_model() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/tiny-sdxl/model")
}

fn sd3_model() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/tiny-sd3/model")
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

/// A LoRA written to a file: the model it is for, its layout and its layers by weight file.
struct Lora {
    model: std::path::PathBuf,
    layout: Layout,
    adapted: Vec<(&'static str, Vec<Layer>)>,
}

/// Writes a LoRA on `components` of `model` (prefix, weight file, targets) to `path`.
fn write_lora(
    model: &Path,
    components: &[(&'static str, &'static str, &[&str])],
    layout: Layout,
    path: &Path,
) -> Lora {
    let mut seed = 0;
    let adapted: Vec<(&str, Vec<Layer>)> = components
        .iter()
        .map(|(_, file, targets)| {
            let layers = layers(&model.join(file), targets, &mut seed);
            assert!(layers.len() >= 8, "{file}: only {} layers", layers.len());
            (*file, layers)
        })
        .collect();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for ((prefix, _, _), (_, layers)) in components.iter().zip(&adapted) {
        for layer in layers {
            let mut down_shape = vec![RANK];
            down_shape.extend_from_slice(&layer.shape[1..]);
            let mut up_shape = vec![layer.shape[0], RANK];
            up_shape.extend(std::iter::repeat_n(1, layer.shape.len() - 2));
            let (down, up) = (le_bytes(&layer.down), le_bytes(&layer.up));
            match layout {
                Layout::Kohya => {
                    let stem = format!("{prefix}{}", layer.module.replace('.', "_"));
                    data.push((format!("{stem}.lora_down.weight"), down_shape, down));
                    data.push((format!("{stem}.lora_up.weight"), up_shape, up));
                    data.push((format!("{stem}.alpha"), vec![], le_bytes(&[ALPHA])));
                }
                Layout::Peft => {
                    let stem = format!("{prefix}{}", layer.module);
                    data.push((format!("{stem}.lora_A.weight"), down_shape, down));
                    data.push((format!("{stem}.lora_B.weight"), up_shape, up));
                }
            }
        }
    }
    write_f32(&data, path);
    Lora {
        model: model.to_path_buf(),
        layout,
        adapted,
    }
}

fn write_f32(data: &[(String, Vec<usize>, Vec<u8>)], path: &Path) {
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the LoRA's model with `scale * alpha / rank * B @ A` added to each adapted
/// weight (alpha = rank in a PEFT file without metadata).
fn merged_model(lora: &Lora, scale: f32, into: &Path) {
    copy_dir(&lora.model, into);
    let factor = match lora.layout {
        Layout::Kohya => scale * ALPHA / RANK as f32,
        Layout::Peft => scale,
    };
    for (file, layers) in &lora.adapted {
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
            if let Some(layer) = layers
                .iter()
                .find(|l| format!("{}.weight", l.module) == name)
            {
                add_delta(&mut weight, layer, factor);
            }
            data.push((name, view.shape().to_vec(), le_bytes(&weight)));
        }
        write_f32(&data, &path);
    }
}

/// `weight += factor * B @ A`, B (out, rank) and A (rank, inner) row-major.
fn add_delta(weight: &mut [f32], layer: &Layer, factor: f32) {
    let inner = weight.len() / layer.shape[0];
    for (o, row) in weight.chunks_exact_mut(inner).enumerate() {
        for (i, w) in row.iter_mut().enumerate() {
            let product: f32 = (0..RANK)
                .map(|r| layer.up[o * RANK + r] * layer.down[r * inner + i])
                .sum();
            *w += factor * product;
        }
    }
}

/// A one-step workflow of `class` on `model`, with `loras` (JSON, or empty) beside its
/// configuration and `extra` (scheduler, arguments) after it.
fn workflow(
    daemon: &TestDaemon,
    class: &str,
    model: &Path,
    loras: &str,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"{{
  "id": "merged_lora",
  "steps": [{{
    "name": "main",
    "pipeline": {{
      "configuration": {{"component_type": "{class}"}},
      {loras}
      "from_pretrained_arguments": {{"model_name": "{}", "torch_dtype": "torch.float32"}},
      "seed": 7,
      {extra}
    }},
    "result": {{"content_type": "image/png"}}
  }}]
}}"#,
        model.display()
    );
    let path = daemon.dir.path().join("merged-lora.json");
    std::fs::write(&path, text).unwrap();
    path
}

/// `"loras": [...],` for one file at `scale`.
fn loras(file: &Path, scale: f64) -> String {
    format!(
        r#""loras": [{{"model_name": "{}", "weight_name": "{}", "scale": {scale}}}],"#,
        file.parent().unwrap().display(),
        file.file_name().unwrap().to_str().unwrap()
    )
}

const SDXL_LCM: &str = r#""scheduler": {"configuration": {"scheduler_type": "LCMScheduler"}},
      "arguments": {"prompt": "a lighthouse on a rocky cliff", "num_inference_steps": 4,
        "guidance_scale": 1.0, "height": 128, "width": 128}"#;

/// Runs a workflow; its image's pixels and the run's cache misses.
fn run(daemon: &TestDaemon, workflow: &Path) -> (Vec<u8>, u64) {
    let run = daemon.run_json(workflow, &[]);
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
    let file = dir.path().join("lcm/pytorch_lora_weights.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let lora = write_lora(&sdxl_model(), &SDXL, Layout::Kohya, &file);
    let merged = dir.path().join("merged");
    merged_model(&lora, 0.7, &merged);
    let class = "StableDiffusionXLPipeline";
    let flow = |model: &Path, loras: &str| workflow(&daemon, class, model, loras, SDXL_LCM);

    let (with_lora, misses) = run(&daemon, &flow(&sdxl_model(), &loras(&file, 0.7)));
    // two tokenizers, two text encoders, UNet, VAE and the LoRA.
    assert_eq!(misses, 7);
    let (fused, _) = run(&daemon, &flow(&merged, ""));
    let levels = max_level_difference(&with_lora, &fused);
    assert!(levels <= 1, "LoRA vs merged weights: {levels} levels");

    let (other_scale, misses) = run(&daemon, &flow(&sdxl_model(), &loras(&file, 0.35)));
    assert_eq!(misses, 0, "another scale loads nothing");
    assert!(max_level_difference(&other_scale, &with_lora) > 1);

    let (base, misses) = run(&daemon, &flow(&sdxl_model(), ""));
    assert_eq!(misses, 0);
    assert!(
        max_level_difference(&base, &with_lora) > 1,
        "the LoRA changed nothing"
    );
    let fresh = TestDaemon::new();
    let fresh_flow = workflow(&fresh, class, &sdxl_model(), "", SDXL_LCM);
    let (untouched, _) = run(&fresh, &fresh_flow);
    assert_eq!(
        base, untouched,
        "the base image after LoRA runs is the base image"
    );
}

#[test]
fn a_peft_lora_on_sd3_equals_its_merged_weights_and_joint_attention_kwargs_scales_it() {
    let daemon = TestDaemon::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sd3/pytorch_lora_weights.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let lora = write_lora(&sd3_model(), &SD3, Layout::Peft, &file);
    let merged = dir.path().join("merged");
    merged_model(&lora, 0.6, &merged);
    let class = "StableDiffusion3Pipeline";
    let arguments = |kwargs: &str| {
        format!(
            r#""arguments": {{"prompt": "a lighthouse at dusk", "num_inference_steps": 3,
        "guidance_scale": 4.0, "height": 64, "width": 64{kwargs}}}"#
        )
    };
    let plain = arguments("");
    let (with_lora, _) = run(
        &daemon,
        &workflow(&daemon, class, &sd3_model(), &loras(&file, 0.6), &plain),
    );
    let (fused, _) = run(&daemon, &workflow(&daemon, class, &merged, "", &plain));
    let (base, _) = run(&daemon, &workflow(&daemon, class, &sd3_model(), "", &plain));
    assert!(
        max_level_difference(&with_lora, &base) > 1,
        "the LoRA changed nothing"
    );
    let levels = max_level_difference(&with_lora, &fused);
    assert!(levels <= 1, "LoRA vs merged weights: {levels} levels");

    let kwargs = arguments(r#", "joint_attention_kwargs": {"scale": 0.6}"#);
    let (scaled, misses) = run(
        &daemon,
        &workflow(&daemon, class, &sd3_model(), &loras(&file, 1.0), &kwargs),
    );
    assert_eq!(misses, 0, "another scale loads nothing");
    let levels = max_level_difference(&scaled, &with_lora);
    assert!(
        levels <= 1,
        "joint_attention_kwargs 0.6 vs weight 0.6: {levels} levels"
    );
}
