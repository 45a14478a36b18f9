//! diffusers' `ResnetBlock2D` as the UNet uses it: two 3x3 convolutions, each after a
//! group norm and SiLU, the (projected) time embedding added in between, and the input
//! added back at the end (through a 1x1 `conv_shortcut` when the channel count changes).
//!
//! The VAE uses the same block without a time embedding
//! ([`ResnetBlock2D::load_without_time_embedding`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::pipelines::lora::AdaptableLinear;

use crate::pipelines::ops::{Conv2d, GroupNorm};

/// Sizes of one ResNet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding.
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    /// The sum of the input and the residual is divided by this (1 but in the mid block,
    /// where diffusers' `mid_block_scale_factor` applies).
    pub output_scale_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// `None` in a block without a time embedding (the VAE's).
    time_emb_proj: Option<AdaptableLinear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: VarBuilder, config: ResnetConfig) -> Result<Self> {
        let time_emb_proj = AdaptableLinear::load(
            config.temb_channels,
            config.out_channels,
            vb.pp("time_emb_proj"),
        )?;
        Self::load_with(vb, config, Some(time_emb_proj))
    }

    /// A block without `time_emb_proj`, as the VAE's encoder and decoder have them;
    /// `config.temb_channels` is not read. Run it with
    /// [`ResnetBlock2D::forward_without_time_embedding`].
    pub fn load_without_time_embedding(vb: VarBuilder, config: ResnetConfig) -> Result<Self> {
        Self::load_with(vb, config, None)
    }

    fn load_with(
        vb: VarBuilder,
        config: ResnetConfig,
        time_emb_proj: Option<AdaptableLinear>,
    ) -> Result<Self> {
        let ResnetConfig {
            in_channels,
            out_channels,
            ..
        } = config;
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::load(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), config.groups, in_channels, config.eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(vb.pp("norm2"), config.groups, out_channels, config.eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: config.output_scale_factor,
        })
    }

    /// `xs` (batch, in_channels, h, w) and `temb` (batch, temb_channels) to
    /// (batch, out_channels, h, w).
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let Some(time_emb_proj) = &self.time_emb_proj else {
            candle_core::bail!("resnet: a time embedding for a block loaded without one")
        };
        let hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let temb = time_emb_proj
            .forward(&candle_nn::ops::silu(temb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        self.finish(xs, &hidden.broadcast_add(&temb)?)
    }

    /// `xs` (batch, in_channels, h, w) to (batch, out_channels, h, w) with no time
    /// embedding added, for a block loaded with
    /// [`ResnetBlock2D::load_without_time_embedding`].
    pub fn forward_without_time_embedding(&self, xs: &Tensor) -> Result<Tensor> {
        if self.time_emb_proj.is_some() {
            candle_core::bail!("resnet: no time embedding for a block that projects one")
        }
        let hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        self.finish(xs, &hidden)
    }

    /// The second norm and convolution on `hidden` (the first convolution's output, with
    /// any time embedding added), then the residual.
    fn finish(&self, xs: &Tensor, hidden: &Tensor) -> Result<Tensor> {
        let hidden = self.conv2.forward(&self.norm2.forward_silu(hidden)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let sum = (shortcut + hidden)?;
        if self.output_scale_factor == 1.0 {
            Ok(sum)
        } else {
            sum / self.output_scale_factor
        }
    }
}
