//! What the examples that write random full-size models share: config files, copied
//! fixture folders, and weights initialised like a fresh PyTorch model's.

// Each example uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;
use candle_nn::VarMap;

pub fn write_json(path: &Path, value: serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().context("a parent folder")?)?;
    std::fs::write(path, serde_json::to_string_pretty(&value)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn copy_folder(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Gives the UNet's variables values like a freshly initialised PyTorch model's: our layers
/// ask the variable map for plain zeros. Weights (two or more dimensions) and biases are
/// uniform in ±1/√fan_in (a bias takes the fan-in of the weight beside it), norm scales 1,
/// norm shifts 0.
pub fn randomize_unet(varmap: &VarMap) -> anyhow::Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
    for (name, var) in vars.iter() {
        let dims = var.dims().to_vec();
        let value = if name.contains("norm") {
            if name.ends_with(".weight") {
                Tensor::ones(dims.as_slice(), var.dtype(), var.device())?
            } else {
                Tensor::zeros(dims.as_slice(), var.dtype(), var.device())?
            }
        } else {
            let fan_in = if dims.len() >= 2 {
                dims[1..].iter().product::<usize>()
            } else {
                let weight = name
                    .strip_suffix(".bias")
                    .map(|layer| format!("{layer}.weight"))
                    .and_then(|weight| vars.get(&weight))
                    .with_context(|| format!("no weight beside {name}"))?;
                weight.dims()[1..].iter().product::<usize>()
            };
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            Tensor::rand(-bound as f32, bound as f32, dims.as_slice(), var.device())?
                .to_dtype(var.dtype())?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// The standard deviation of a transformer's weight matrices: small enough that a few
/// blocks keep the activations finite and of order one.
const TRANSFORMER_WEIGHT_STD: f32 = 0.02;

/// A transformer's weight matrices normal with `TRANSFORMER_WEIGHT_STD`, biases zero,
/// norm scales one.
pub fn randomize_transformer(varmap: &VarMap) -> anyhow::Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map poisoned"))?;
    for (name, var) in vars.iter() {
        let dims = var.dims();
        let value = match (dims.len(), name.ends_with(".weight")) {
            (1, true) => Tensor::ones(dims, var.dtype(), var.device())?,
            (1, false) => Tensor::zeros(dims, var.dtype(), var.device())?,
            _ => Tensor::randn(0f32, TRANSFORMER_WEIGHT_STD, dims, var.device())?
                .to_dtype(var.dtype())?,
        };
        var.set(&value)?;
    }
    Ok(())
}
