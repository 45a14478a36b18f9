//! Writes a FLUX.1 transformer at FLUX.1-dev's real widths with random weights, for
//! benchmarks: 3072 wide (24 heads of 128), T5 states of 4096, CLIP's pooled 768, the
//! guidance embedder, but only 2 double-stream and 4 single-stream blocks (FLUX.1-dev has
//! 19 and 38), 1.3B parameters stored in bfloat16 as FLUX ships (2.6 GB; loaded in the dtype
//! a benchmark asks for). Its widths and shapes are what count, not its values.
//!
//! Usage: cargo run --release -p dwd --example make_flux_random -- OUT_DIR
//! (writes OUT_DIR/transformer/config.json and
//! OUT_DIR/transformer/diffusion_pytorch_model.safetensors)

mod random;

use std::path::PathBuf;

use anyhow::bail;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dwd::pipelines::flux::{FluxConfig, FluxTransformer};
use random::{randomize_transformer, write_json};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: make_flux_random OUT_DIR");
    };
    let dir = out.join("transformer");
    write_json(
        &dir.join("config.json"),
        json!({
            "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56], "guidance_embeds": true, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 2,
            "num_single_layers": 4, "out_channels": null, "patch_size": 1,
            "pooled_projection_dim": 768
        }),
    )?;
    // The model asks the variable map for every tensor its loader takes, under diffusers'
    // names and shapes: the file then holds exactly what `FluxTransformer::load` wants.
    let varmap = VarMap::new();
    FluxTransformer::new(
        VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu),
        FluxConfig::load(&dir)?,
    )?;
    randomize_transformer(&varmap)?;
    varmap.save(dir.join("diffusion_pytorch_model.safetensors"))?;
    eprintln!("wrote the FLUX transformer into {}", out.display());
    Ok(())
}
