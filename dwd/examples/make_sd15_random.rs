//! Writes a full-size Stable Diffusion 1.5-shaped model with random weights, for
//! benchmarks: SD 1.5's own UNet, VAE and text encoder configurations (860M + 84M + 123M
//! parameters, f32), the tiny fixture's tokenizer and scheduler. Nothing it makes is
//! meaningful as an image; its size and shapes are what count.
//!
//! Usage: cargo run --release -p dwd --example make_sd15_random -- OUT_DIR

mod random;

use std::path::{Path, PathBuf};

use anyhow::bail;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dwd::pipelines::{TextEncoder, TextEncoderConfig, Unet, UnetConfig, Vae, VaeConfig};
use random::{copy_folder, randomize_unet, write_json};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: make_sd15_random OUT_DIR");
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sd15/model");
    copy_folder(&fixture.join("tokenizer"), &out.join("tokenizer"))?;
    copy_folder(&fixture.join("scheduler"), &out.join("scheduler"))?;
    std::fs::copy(
        fixture.join("model_index.json"),
        out.join("model_index.json"),
    )?;
    let device = Device::Cpu;

    write_json(
        &out.join("unet/config.json"),
        json!({
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        }),
    )?;
    let unet_config = UnetConfig::load(&out.join("unet"))?;
    let varmap = VarMap::new();
    Unet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        unet_config,
    )?;
    randomize_unet(&varmap)?;
    varmap.save(out.join("unet/diffusion_pytorch_model.safetensors"))?;
    eprintln!("wrote the UNet");

    write_json(
        &out.join("vae/config.json"),
        json!({
            "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }),
    )?;
    let varmap = VarMap::new();
    Vae::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        VaeConfig::load(&out.join("vae"))?,
    )?;
    varmap.save(out.join("vae/diffusion_pytorch_model.safetensors"))?;
    eprintln!("wrote the VAE");

    write_json(
        &out.join("text_encoder/config.json"),
        json!({
            "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
            "intermediate_size": 3072, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
            "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12,
            "vocab_size": 49408, "bos_token_id": 557, "eos_token_id": 558, "pad_token_id": 558
        }),
    )?;
    let varmap = VarMap::new();
    TextEncoder::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        TextEncoderConfig::load(&out.join("text_encoder"))?,
    )?;
    varmap.save(out.join("text_encoder/model.safetensors"))?;
    eprintln!("wrote the text encoder; the model is in {}", out.display());
    Ok(())
}
