//! Writes a LoRA with random weights for a Stable Diffusion model folder, for benchmarks:
//! diffusers/PEFT layout (`unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>...`),
//! rank RANK on every attention projection of the UNet (`to_q`, `to_k`, `to_v`, `to_out.0`)
//! and of the text encoder (`q_proj`, `k_proj`, `v_proj`, `out_proj`), as a typical style
//! LoRA targets them; no header metadata, so alpha = rank. A and B are normal with std
//! 0.01, drawn from torch's generator seeded with SEED: two seeds, two adapters.
//!
//! Usage: make_lora_random MODEL_DIR OUT_FILE RANK SEED

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use dwd::pipelines::lora::module_shapes;
use dwd::pipelines::torch_rng::TorchCpuGenerator;
use dwd::pipelines::weight_files_variant;

const UNET_TARGETS: &[&str] = &[".to_q", ".to_k", ".to_v", ".to_out.0"];
const TEXT_TARGETS: &[&str] = &[".q_proj", ".k_proj", ".v_proj", ".out_proj"];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: make_lora_random MODEL_DIR OUT_FILE RANK SEED";
    let (Some(model), Some(out), Some(rank), Some(seed)) =
        (args.get(1), args.get(2), args.get(3), args.get(4))
    else {
        bail!(usage);
    };
    let model = PathBuf::from(model);
    let rank: usize = rank.parse().context(usage)?;
    let seed: u64 = seed.parse().context(usage)?;
    let device = Device::Cpu;
    let mut generator = TorchCpuGenerator::new(seed);
    let mut draw = |shape: (usize, usize)| -> candle_core::Result<Tensor> {
        let values: Vec<f32> = generator
            .randn_f32(shape.0 * shape.1)
            .into_iter()
            .map(|v| v * 0.01)
            .collect();
        Tensor::from_vec(values, shape, &device)
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (component, targets, prefix) in [
        ("unet", UNET_TARGETS, ""),
        ("text_encoder", TEXT_TARGETS, "text_model."),
    ] {
        let files = weight_files_variant(&model.join(component), None)?;
        for (module, shape) in module_shapes(&files)? {
            if shape.len() != 2 || !targets.iter().any(|t| module.ends_with(t)) {
                continue;
            }
            let module = module.strip_prefix("text_model.").unwrap_or(&module);
            let stem = format!("{component}.{prefix}{module}");
            let (out_features, in_features) = (shape[0], shape[1]);
            tensors.insert(format!("{stem}.lora_A.weight"), draw((rank, in_features))?);
            tensors.insert(format!("{stem}.lora_B.weight"), draw((out_features, rank))?);
        }
    }
    let out = PathBuf::from(out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    candle_core::safetensors::save(&tensors, &out)?;
    eprintln!(
        "wrote {} LoRA pairs of rank {rank} into {}",
        tensors.len() / 2,
        out.display()
    );
    Ok(())
}
