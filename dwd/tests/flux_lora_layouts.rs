//! FLUX.1 LoRAs in the layouts that name Black Forest Labs' original modules (kohya's
//! `lora_unet_double_blocks_0_img_attn_qkv` with `.alpha`, and BFL's
//! `transformer.double_blocks.0.img_attn.qkv.lora_A.weight`), on `tests/fixtures/tiny-flux`.
//!
//! BFL's layers are diffusers' stacked by rows: a double block's `qkv` is `to_q`, `to_k`,
//! `to_v`; a single block's `linear1` is those and `proj_mlp`; the final modulation is
//! diffusers' `norm_out.linear` with its (scale, shift) halves as (shift, scale). A LoRA on
//! every one of BFL's adaptable layers must give the image of the model whose weights have
//! `weight * alpha / rank * B @ A` added in exactly that arrangement, the merge diffusers'
//! `fuse_lora` makes after converting the file; and the two layouts of one LoRA must give
//! one image.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::merge::one_lora;
use common::{assert_close, Fixture};
use dwd::pipelines::flux::{FluxArgs, FluxPipeline};
use dwd::pipelines::lora::LoraAdapter;
use dwd::pipelines::ReplayNoise;

const RANK: usize = 2;
const ALPHA: f32 = 3.0;
const WEIGHT_FILE: &str = "transformer/diffusion_pytorch_model.safetensors";

/// One of BFL's layers: its name, the diffusers layers it stacks (in BFL's row order),
/// and whether its two halves are diffusers' swapped.
struct BflLayer {
    name: String,
    parts: Vec<String>,
    swapped: bool,
}

fn layer(name: String, parts: &[String]) -> BflLayer {
    BflLayer {
        name,
        parts: parts.to_vec(),
        swapped: false,
    }
}

/// Every layer of BFL's FLUX a LoRA adapts, for the block counts given.
fn bfl_layers(double_blocks: usize, single_blocks: usize) -> Vec<BflLayer> {
    let mut layers: Vec<BflLayer> = (0..double_blocks).flat_map(double_block).collect();
    layers.extend((0..single_blocks).flat_map(single_block));
    layers.extend(globals());
    layers
}

fn double_block(i: usize) -> Vec<BflLayer> {
    let d = |s: &str| format!("transformer_blocks.{i}.{s}");
    let b = |s: &str| format!("double_blocks.{i}.{s}");
    let mut layers = vec![
        layer(
            b("img_attn.qkv"),
            &[d("attn.to_q"), d("attn.to_k"), d("attn.to_v")],
        ),
        layer(
            b("txt_attn.qkv"),
            &[
                d("attn.add_q_proj"),
                d("attn.add_k_proj"),
                d("attn.add_v_proj"),
            ],
        ),
    ];
    for (bfl, diffusers) in [
        ("img_attn.proj", "attn.to_out.0"),
        ("img_mlp.0", "ff.net.0.proj"),
        ("img_mlp.2", "ff.net.2"),
        ("img_mod.lin", "norm1.linear"),
        ("txt_attn.proj", "attn.to_add_out"),
        ("txt_mlp.0", "ff_context.net.0.proj"),
        ("txt_mlp.2", "ff_context.net.2"),
        ("txt_mod.lin", "norm1_context.linear"),
    ] {
        layers.push(layer(b(bfl), &[d(diffusers)]));
    }
    layers
}

fn single_block(i: usize) -> Vec<BflLayer> {
    let d = |s: &str| format!("single_transformer_blocks.{i}.{s}");
    let b = |s: &str| format!("single_blocks.{i}.{s}");
    let linear1 = [
        d("attn.to_q"),
        d("attn.to_k"),
        d("attn.to_v"),
        d("proj_mlp"),
    ];
    vec![
        layer(b("linear1"), &linear1),
        layer(b("linear2"), &[d("proj_out")]),
        layer(b("modulation.lin"), &[d("norm.linear")]),
    ]
}

fn globals() -> Vec<BflLayer> {
    let embedders = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "timestep_embedder.linear_1"),
        ("time_in.out_layer", "timestep_embedder.linear_2"),
        ("vector_in.in_layer", "text_embedder.linear_1"),
        ("vector_in.out_layer", "text_embedder.linear_2"),
        ("guidance_in.in_layer", "guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "guidance_embedder.linear_2"),
    ];
    let mut layers: Vec<BflLayer> = embedders
        .into_iter()
        .map(|(bfl, diffusers)| {
            let diffusers = match diffusers.contains("_embedder.") {
                true => format!("time_text_embed.{diffusers}"),
                false => diffusers.to_string(),
            };
            layer(bfl.to_string(), &[diffusers])
        })
        .collect();
    layers.push(layer("final_layer.linear".into(), &["proj_out".into()]));
    layers.push(BflLayer {
        swapped: true,
        ..layer(
            "final_layer.adaLN_modulation.1".into(),
            &["norm_out.linear".into()],
        )
    });
    layers
}

fn model_dir() -> std::path::PathBuf {
    Fixture::new("tiny-flux").model_dir()
}

fn values(shape: &[usize], seed: usize) -> Tensor {
    let count: usize = shape.iter().product();
    let data: Vec<f32> = (0..count)
        .map(|i| (((i * 5 + seed * 11) % 19) as f32 - 9.0) / 60.0)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// The LoRA on every layer: A and B per BFL layer, for `weights` (the model's tensors).
fn lora(layers: &[BflLayer], weights: &HashMap<String, Tensor>) -> Vec<(Tensor, Tensor)> {
    layers
        .iter()
        .enumerate()
        .map(|(seed, layer)| {
            let shapes: Vec<&[usize]> = layer
                .parts
                .iter()
                .map(|p| weights[&format!("{p}.weight")].dims())
                .collect();
            let rows: usize = shapes.iter().map(|s| s[0]).sum();
            (
                values(&[RANK, shapes[0][1]], seed),
                values(&[rows, RANK], seed + 50),
            )
        })
        .collect()
}

fn save(tensors: Vec<(String, Tensor)>, path: &Path, metadata: Option<HashMap<String, String>>) {
    safetensors::serialize_to_file(tensors, metadata, path).unwrap();
}

/// A copy of the model with each layer's `weight * alpha / rank * B @ A` added to the
/// diffusers layers it stacks, in BFL's row order.
fn merged(layers: &[BflLayer], pairs: &[(Tensor, Tensor)], weight: f64, into: &Path) {
    common::copy_dir(&model_dir(), into);
    let path = into.join(WEIGHT_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (layer, (down, up)) in layers.iter().zip(pairs) {
        let factor = weight * ALPHA as f64 / RANK as f64;
        let mut delta = (up.matmul(down).unwrap() * factor).unwrap();
        if layer.swapped {
            let half = delta.dims()[0] / 2;
            let (shift, scale) = (
                delta.narrow(0, 0, half).unwrap(),
                delta.narrow(0, half, half).unwrap(),
            );
            delta = Tensor::cat(&[scale, shift], 0).unwrap();
        }
        let mut start = 0;
        for part in &layer.parts {
            let name = format!("{part}.weight");
            let rows = tensors[&name].dims()[0];
            let base = tensors[&name].clone();
            tensors.insert(
                name,
                (base + delta.narrow(0, start, rows).unwrap()).unwrap(),
            );
            start += rows;
        }
    }
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    save(tensors, &path, None);
}

/// The recorded run of `tiny-flux-lora` (its size and packed latents), 3 steps.
fn args() -> FluxArgs {
    let fixture = Fixture::new("tiny-flux-lora");
    let run = &fixture.json("expected.json")["run"];
    let number = |key: &str| run[key].as_u64().unwrap() as usize;
    FluxArgs {
        prompts: vec!["a red fox".to_string()],
        height: Some(number("height")),
        width: Some(number("width")),
        num_inference_steps: 3,
        guidance_scale: 3.5,
        max_sequence_length: number("max_sequence_length"),
        latents: Some(fixture.tensors("latents.safetensors")["latents"].clone()),
        ..FluxArgs::default()
    }
}

fn image(pipeline: &FluxPipeline) -> Tensor {
    let mut noise = ReplayNoise::new(Vec::new());
    pipeline
        .generate(&args(), &mut noise, &mut |_| {}, &mut |_| Ok(()))
        .unwrap()
}

fn pipeline(dir: &Path, lora: Option<(&Path, f64)>) -> FluxPipeline {
    let mut pipeline = FluxPipeline::load(dir, DType::F32, &Device::Cpu).unwrap();
    if let Some((path, weight)) = lora {
        pipeline.adapters = one_lora(path, weight);
    }
    pipeline
}

#[test]
fn kohya_and_bfl_named_flux_loras_equal_their_merged_weights() {
    let weights =
        candle_core::safetensors::load(model_dir().join(WEIGHT_FILE), &Device::Cpu).unwrap();
    let layers = bfl_layers(2, 3);
    let pairs = lora(&layers, &weights);
    let dir = tempfile::tempdir().unwrap();
    let alpha = Tensor::new(ALPHA, &Device::Cpu).unwrap();

    let kohya = dir.path().join("kohya.safetensors");
    let mut tensors = Vec::new();
    for (layer, (down, up)) in layers.iter().zip(&pairs) {
        let stem = format!("lora_unet_{}", layer.name.replace('.', "_"));
        tensors.push((format!("{stem}.lora_down.weight"), down.clone()));
        tensors.push((format!("{stem}.lora_up.weight"), up.clone()));
        tensors.push((format!("{stem}.alpha"), alpha.clone()));
    }
    save(tensors, &kohya, None);

    let bfl = dir.path().join("bfl.safetensors");
    let mut tensors = Vec::new();
    for (layer, (down, up)) in layers.iter().zip(&pairs) {
        tensors.push((
            format!("transformer.{}.lora_A.weight", layer.name),
            down.clone(),
        ));
        tensors.push((
            format!("transformer.{}.lora_B.weight", layer.name),
            up.clone(),
        ));
    }
    let metadata = serde_json::json!({"transformer.r": RANK, "transformer.lora_alpha": ALPHA});
    let metadata = HashMap::from([("lora_adapter_metadata".to_string(), metadata.to_string())]);
    save(tensors, &bfl, Some(metadata));

    let weight = 0.6;
    let merged_dir = dir.path().join("merged");
    merged(&layers, &pairs, weight, &merged_dir);
    let want = image(&pipeline(&merged_dir, None));
    let base = image(&pipeline(&model_dir(), None));
    let moved = common::max_abs_diff(&want, &base);
    assert!(
        moved > 1e-2,
        "the merged LoRA barely changed the image ({moved})"
    );

    let from_kohya = image(&pipeline(&model_dir(), Some((&kohya, weight))));
    assert_close("kohya FLUX LoRA vs merged", &from_kohya, &want, 1e-4);
    let from_bfl = image(&pipeline(&model_dir(), Some((&bfl, weight))));
    assert_eq!(
        common::max_abs_diff(&from_bfl, &from_kohya),
        0.0,
        "BFL vs kohya"
    );
}

#[test]
fn a_bfl_layer_flux_does_not_adapt_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("norms.safetensors");
    let tensors = vec![
        (
            "diffusion_model.double_blocks.0.img_attn.norm.lora_A.weight".to_string(),
            values(&[2, 16], 1),
        ),
        (
            "diffusion_model.double_blocks.0.img_attn.norm.lora_B.weight".to_string(),
            values(&[16, 2], 2),
        ),
    ];
    save(tensors, &path, None);
    let e = LoraAdapter::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("`double_blocks.0.img_attn.norm` is not a FLUX.1 module a LoRA adapts"),
        "{e}"
    );
}
