//! The denoising UNet: diffusers' `unet/config.json` checked and mapped onto our own
//! `UNet2DConditionModel` ([`model`]), behind a small wrapper that knows its input size.
//!
//! The SD 1.x, 2.x and SDXL layouts are accepted (SDXL's `addition_embed_type: "text_time"`
//! with per-level `transformer_layers_per_block`); anything else (other block types, class
//! conditioning, other added embeddings...) is rejected with
//! [`PipelineError::Unsupported`] naming the key, rather than producing wrong images.
//!
//! The model is built from [`embeddings`] (the timestep), [`resnet`], [`attention`] (the
//! transformers) and [`blocks`] (down, mid and up blocks), on the layers of
//! [`super::ops`].

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod model;
pub mod resnet;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

pub use model::{
    BlockConfig, TextTime, TextTimeConfig, UNet2DConditionModel, UNet2DConditionModelConfig,
};

use super::lora::{adaptable_modules, LoraModules};
use super::{load_component, ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "unet";
const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
const PLAIN_DOWN: &str = "DownBlock2D";
const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
const PLAIN_UP: &str = "UpBlock2D";

/// What the UNet needs from its `config.json`.
#[derive(Debug, Clone)]
pub struct UnetConfig {
    /// The model's configuration.
    pub model: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Latent height and width the model was trained on.
    pub sample_size: usize,
}

impl UnetConfig {
    /// Reads and checks `config.json` from a `unet` folder.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        reject_unsupported(&config)?;
        let block_out_channels = config.usize_list("block_out_channels")?;
        let blocks = block_out_channels.len();
        if blocks == 0 {
            return Err(config.bad("block_out_channels", "is empty"));
        }
        let uses_cross_attention = block_types(&config, blocks)?;
        // diffusers' `attention_head_dim` is, for SD 1.x/2.x, the number of heads; an
        // explicit `num_attention_heads` takes precedence.
        let heads_key = if config.value("num_attention_heads").is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = config.usize_per_block(heads_key, 8, blocks)?;
        let transformer_layers =
            config.usize_per_block("transformer_layers_per_block", 1, blocks)?;
        let cross_attention_dim = cross_attention_dim(&config)?;
        let norm_num_groups = norm_num_groups(&config)?;
        check_divisions(
            &config,
            &block_out_channels,
            &heads,
            heads_key,
            norm_num_groups,
        )?;
        let block_configs = (0..blocks)
            .map(|index| BlockConfig {
                out_channels: block_out_channels[index],
                heads: heads[index],
                transformer_layers: transformer_layers[index],
                cross_attention: uses_cross_attention[index],
            })
            .collect();
        // Fields are read in the order written: the keys' errors come in this order.
        let model = UNet2DConditionModelConfig {
            center_input_sample: config.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: config.bool_or("flip_sin_to_cos", true)?,
            freq_shift: config.f64_or("freq_shift", 0.0)?,
            blocks: block_configs,
            layers_per_block: config.usize_or("layers_per_block", 2)?,
            downsample_padding: config.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: config.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: config.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim,
            use_linear_projection: config.bool_or("use_linear_projection", false)?,
            text_time: text_time(&config)?,
            in_channels: config.usize_or("in_channels", 4)?,
            out_channels: config.usize_or("out_channels", 4)?,
        };
        Ok(Self {
            in_channels: model.in_channels,
            out_channels: model.out_channels,
            model,
            sample_size: config.usize_or("sample_size", 64)?,
        })
    }
}

/// Whether each down block has cross-attention; the up blocks, if listed, must mirror them.
fn block_types(config: &ConfigJson, blocks: usize) -> Result<Vec<bool>, PipelineError> {
    let down_block_types = config.string_list("down_block_types")?;
    if down_block_types.len() != blocks {
        return Err(config.bad(
            "down_block_types",
            format!("has {} entries for {blocks} blocks", down_block_types.len()),
        ));
    }
    let uses_cross_attention = down_block_types
        .iter()
        .map(|block_type| match block_type.as_str() {
            CROSS_ATTN_DOWN => Ok(true),
            PLAIN_DOWN => Ok(false),
            other => Err(PipelineError::unsupported(
                "down_block_types",
                other,
                format!("{CROSS_ATTN_DOWN}, {PLAIN_DOWN}"),
            )),
        })
        .collect::<Result<Vec<bool>, _>>()?;
    // The model builds the up path as the mirror of the down path.
    let mirrored_up: Vec<&str> = uses_cross_attention
        .iter()
        .rev()
        .map(|cross| if *cross { CROSS_ATTN_UP } else { PLAIN_UP })
        .collect();
    if config.value("up_block_types").is_some() {
        let up_block_types = config.string_list("up_block_types")?;
        if up_block_types != mirrored_up {
            return Err(PipelineError::unsupported(
                "up_block_types",
                format!("{up_block_types:?}"),
                format!("the mirror of down_block_types: {mirrored_up:?}"),
            ));
        }
    }
    Ok(uses_cross_attention)
}

/// SDXL's added embedding, when `addition_embed_type` is `"text_time"`.
fn text_time(config: &ConfigJson) -> Result<Option<TextTimeConfig>, PipelineError> {
    config.require_one_of(
        "addition_embed_type",
        &[json!("text_time")],
        "\"text_time\" or null",
    )?;
    if config.value("addition_embed_type").is_none() {
        return Ok(None);
    }
    let text_time = TextTimeConfig {
        time_embed_dim: config.required_usize("addition_time_embed_dim")?,
        input_dim: config.required_usize("projection_class_embeddings_input_dim")?,
    };
    if text_time.time_embed_dim == 0 || text_time.input_dim == 0 {
        return Err(config.bad(
            "addition_time_embed_dim",
            "and projection_class_embeddings_input_dim must be positive",
        ));
    }
    Ok(Some(text_time))
}

/// `cross_attention_dim`: one integer for every block.
fn cross_attention_dim(config: &ConfigJson) -> Result<usize, PipelineError> {
    match config.value("cross_attention_dim") {
        None => Ok(1280),
        Some(Value::Array(_)) => Err(PipelineError::unsupported(
            "cross_attention_dim",
            "a list",
            "one integer for all blocks",
        )),
        Some(_) => config.usize_or("cross_attention_dim", 1280),
    }
}

/// `norm_num_groups`: an integer (diffusers' `null` turns group norm off, which we lack).
fn norm_num_groups(config: &ConfigJson) -> Result<usize, PipelineError> {
    if config.contains_key("norm_num_groups") && config.value("norm_num_groups").is_none() {
        return Err(PipelineError::unsupported(
            "norm_num_groups",
            "null",
            "an integer",
        ));
    }
    config.usize_or("norm_num_groups", 32)
}

/// Every block's channels divide into its heads and into the norm's groups.
fn check_divisions(
    config: &ConfigJson,
    block_out_channels: &[usize],
    heads: &[usize],
    heads_key: &str,
    norm_num_groups: usize,
) -> Result<(), PipelineError> {
    for (index, (&channels, &head_count)) in block_out_channels.iter().zip(heads).enumerate() {
        if channels.checked_rem(head_count) != Some(0) {
            return Err(config.bad(
                heads_key,
                format!("{head_count} heads do not divide {channels} channels of block {index}"),
            ));
        }
        if channels.checked_rem(norm_num_groups) != Some(0) {
            return Err(config.bad(
                "norm_num_groups",
                format!("{norm_num_groups} groups do not divide {channels} channels"),
            ));
        }
    }
    Ok(())
}

/// Rejects diffusers UNet options that our `UNet2DConditionModel` does not implement.
fn reject_unsupported(config: &ConfigJson) -> Result<(), PipelineError> {
    let none = "null (not set)";
    for key in [
        "class_embed_type",
        "num_class_embeds",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "time_cond_proj_dim",
        "time_embedding_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "cross_attention_norm",
        "reverse_transformer_layers_per_block",
    ] {
        config.require_one_of(key, &[], none)?;
    }
    if config
        .value("layers_per_block")
        .is_some_and(Value::is_array)
    {
        return Err(PipelineError::unsupported(
            "layers_per_block",
            "a list",
            "one integer for all blocks",
        ));
    }
    config.require_one_of(
        "mid_block_type",
        &[json!("UNetMidBlock2DCrossAttn")],
        "UNetMidBlock2DCrossAttn",
    )?;
    if config.contains_key("mid_block_type") && config.value("mid_block_type").is_none() {
        return Err(PipelineError::unsupported(
            "mid_block_type",
            "null",
            "UNetMidBlock2DCrossAttn",
        ));
    }
    config.require_one_of("act_fn", &[json!("silu")], "silu")?;
    config.require_one_of("time_embedding_type", &[json!("positional")], "positional")?;
    config.require_one_of("resnet_time_scale_shift", &[json!("default")], "default")?;
    config.require_one_of("attention_type", &[json!("default")], "default")?;
    config.require_one_of("conv_in_kernel", &[json!(3)], "3")?;
    config.require_one_of("conv_out_kernel", &[json!(3)], "3")?;
    config.require_one_of("only_cross_attention", &[json!(false)], "false")?;
    config.require_one_of("dual_cross_attention", &[json!(false)], "false")?;
    config.require_one_of("class_embeddings_concat", &[json!(false)], "false")?;
    config.require_one_of("resnet_skip_time_act", &[json!(false)], "false")?;
    config.require_one_of("mid_block_only_cross_attention", &[json!(false)], "false")?;
    config.require_one_of("resnet_out_scale_factor", &[json!(1.0), json!(1)], "1.0")?;
    Ok(())
}

/// The UNet with the sizes the pipeline needs.
#[derive(Debug)]
pub struct Unet {
    model: UNet2DConditionModel,
    config: UnetConfig,
    bytes: u64,
    /// Its weights' module names and shapes, which LoRAs are matched against.
    modules: Arc<LoraModules>,
}

impl Unet {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` from a `unet` folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        Self::load_variant(dir, None, dtype, device)
    }

    /// Like `load`, with the weights of a `variant` such as `fp16`.
    pub fn load_variant(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let (loaded, modules) = adaptable_modules(|| {
            load_component(
                dir,
                (variant, dtype, device),
                COMPONENT,
                UnetConfig::load,
                Self::new,
            )
        });
        let (mut unet, bytes) = loaded?;
        unet.bytes = bytes;
        unet.modules = Arc::new(modules);
        Ok(unet)
    }

    /// Builds the UNet from weights named as diffusers names them.
    pub fn new(vb: VarBuilder, config: UnetConfig) -> candle_core::Result<Self> {
        let model = UNet2DConditionModel::load(vb, config.model.clone())?;
        Ok(Self {
            model,
            config,
            bytes: 0,
            modules: Arc::default(),
        })
    }

    /// Its layers' module names and weight shapes (empty when built from a `VarBuilder`
    /// rather than loaded from files).
    pub fn lora_modules(&self) -> &LoraModules {
        &self.modules
    }

    /// The noise (or v) prediction for `latents` (batch, in_channels, h, w) at `timestep`,
    /// conditioned on `encoder_hidden_states` (batch, tokens, cross_attention_dim).
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        self.forward_with(latents, timestep, encoder_hidden_states, None)
    }

    /// [`Unet::forward`] with SDXL's added conditions, which an SDXL UNet requires.
    pub fn forward_with(
        &self,
        latents: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime<'_>>,
    ) -> Result<Tensor, PipelineError> {
        self.model
            .forward(latents, timestep, encoder_hidden_states, added)
            .in_component(COMPONENT)
    }

    /// Whether it takes SDXL's added text and time embedding.
    pub fn text_time(&self) -> Option<TextTimeConfig> {
        self.config.model.text_time
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Latent channels the UNet takes.
    pub fn in_channels(&self) -> usize {
        self.config.in_channels
    }

    /// Latent height and width the model was trained on.
    pub fn sample_size(&self) -> usize {
        self.config.sample_size
    }

    /// About the most memory one denoising step takes beyond the weights, for `batch`
    /// latents of `height` x `width` in elements of `element_bytes`: the feature maps of
    /// the full-resolution level (its input, skips, resnet and attention buffers) dominate,
    /// so this counts 24 of them; attention runs blockwise, never as a full score matrix.
    pub fn activation_bytes(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        element_bytes: usize,
    ) -> u64 {
        let channels = self
            .config
            .model
            .blocks
            .first()
            .map_or(320, |b| b.out_channels);
        (batch * height * width * channels * element_bytes) as u64 * 24
    }

    /// Size of the weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
