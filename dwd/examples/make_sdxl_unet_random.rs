//! Writes a full-size SDXL UNet with random weights, for benchmarks: the UNet configuration
//! stabilityai/stable-diffusion-xl-base-1.0 ships (2.6B parameters), stored in float16
//! (5.1 GB; loaded in the dtype a benchmark asks for). Its size and shapes are what count.
//!
//! Usage: cargo run --release -p dwd --example make_sdxl_unet_random -- OUT_DIR
//! (writes OUT_DIR/unet/config.json and OUT_DIR/unet/diffusion_pytorch_model.safetensors)

mod random;

use std::path::PathBuf;

use anyhow::bail;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dwd::pipelines::{Unet, UnetConfig};
use random::{randomize_unet, write_json};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: make_sdxl_unet_random OUT_DIR");
    };
    write_json(
        &out.join("unet/config.json"),
        json!({
            "_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "center_input_sample": false,
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
            "norm_num_groups": 32, "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": true
        }),
    )?;
    let config = UnetConfig::load(&out.join("unet"))?;
    let varmap = VarMap::new();
    Unet::new(
        VarBuilder::from_varmap(&varmap, DType::F16, &Device::Cpu),
        config,
    )?;
    randomize_unet(&varmap)?;
    varmap.save(out.join("unet/diffusion_pytorch_model.safetensors"))?;
    eprintln!("wrote the SDXL UNet into {}", out.display());
    Ok(())
}
