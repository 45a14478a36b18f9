//! Writes an SD3 transformer at SD 3.5 medium's real widths with random weights, for
//! benchmarks: 1536 wide (24 heads of 64), T5 states of 4096, pooled CLIP-L ⊕ CLIP-G of
//! 2048, `qk_norm` "rms_norm", the stored 384x384 position embedding, but only 4 joint
//! blocks (SD 3.5 medium has 24), the first 2 with the second attention of
//! `dual_attention_layers` as the medium model's first 13 have; stored in bfloat16 as the
//! model ships and loaded in the dtype a benchmark asks for.
//!
//! Usage: cargo run --release -p dwd --example make_sd3_random -- OUT_DIR
//! (writes OUT_DIR/transformer/config.json and
//! OUT_DIR/transformer/diffusion_pytorch_model.safetensors)

mod random;

use std::path::PathBuf;

use anyhow::bail;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dwd::pipelines::stable_diffusion_3::{Sd3Config, Sd3Transformer};
use random::{randomize_transformer, write_json};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: make_sd3_random OUT_DIR");
    };
    let dir = out.join("transformer");
    write_json(
        &dir.join("config.json"),
        json!({
            "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64,
            "caption_projection_dim": 1536, "dual_attention_layers": [0, 1],
            "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
            "num_layers": 4, "out_channels": 16, "patch_size": 2,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
            "sample_size": 128
        }),
    )?;
    // The model asks the variable map for every tensor its loader takes, under diffusers'
    // names and shapes: the file then holds exactly what `Sd3Transformer::load` wants.
    let varmap = VarMap::new();
    Sd3Transformer::new(
        VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu),
        Sd3Config::load(&dir)?,
    )?;
    randomize_transformer(&varmap)?;
    varmap.save(dir.join("diffusion_pytorch_model.safetensors"))?;
    eprintln!("wrote the SD3 transformer into {}", out.display());
    Ok(())
}
