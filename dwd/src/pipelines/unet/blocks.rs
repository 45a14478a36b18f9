//! The UNet's blocks: the down blocks (diffusers' `DownBlock2D` and
//! `CrossAttnDownBlock2D`), the mid block (`UNetMidBlock2DCrossAttn`), the up blocks
//! (`UpBlock2D` and `CrossAttnUpBlock2D`), and the resamplers between resolutions
//! (`Downsample2D`, `Upsample2D`).
//!
//! A down block hands every intermediate output to the up path as a skip connection; an up
//! block concatenates one skip connection (channel-wise) before each of its ResNets.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Transformer2DModel, TransformerConfig};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::pipelines::ops::Conv2d;

/// A 3x3 convolution with stride 2: half the height and width.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers' `downsample_padding`; with 0 the input gets one row and one column of
    /// zeros at the bottom and right first.
    padding: usize,
}

impl Downsample2D {
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let padded = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            return self.conv.forward(&padded);
        }
        self.conv.forward(xs)
    }
}

/// Nearest-neighbour upsampling, then a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Twice the height and width, or exactly `size` (height, width) when given: the size
    /// of the skip connection the next up block concatenates, which the doubling misses
    /// when the down path halved an odd size.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let (height, width) = size.unwrap_or((height * 2, width * 2));
        self.conv.forward(&xs.upsample_nearest2d(height, width)?)
    }
}

/// What the blocks of one UNet share.
#[derive(Debug, Clone, Copy)]
pub struct BlockShared {
    /// Width of the time embedding.
    pub temb_channels: usize,
    pub groups: usize,
    /// The ResNets' group norm epsilon (`norm_eps`).
    pub eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl BlockShared {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn transformer(&self, channels: usize, attention: CrossAttn) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads: attention.heads,
            layers: attention.layers,
            groups: self.groups,
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// A block's cross-attention: its head count and how many transformer blocks each of its
/// `Transformer2DModel`s has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossAttn {
    pub heads: usize,
    pub layers: usize,
}

/// Loads `count` transformers as `attentions.{i}`, or none without cross-attention.
fn load_attentions(
    vb: &VarBuilder,
    count: usize,
    channels: usize,
    attention: Option<CrossAttn>,
    shared: &BlockShared,
) -> Result<Vec<Transformer2DModel>> {
    let Some(attention) = attention else {
        return Ok(Vec::new());
    };
    let vb = vb.pp("attentions");
    (0..count)
        .map(|index| {
            Transformer2DModel::load(vb.pp(index), shared.transformer(channels, attention))
        })
        .collect()
}

/// `DownBlock2D` (ResNets only) or `CrossAttnDownBlock2D` (a transformer after each
/// ResNet), then a `Downsample2D` unless it is the last block.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    /// Empty in a `DownBlock2D`.
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Sizes of one down block.
#[derive(Debug, Clone, Copy)]
pub struct DownBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub attention: Option<CrossAttn>,
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

impl DownBlock2D {
    pub fn load(vb: VarBuilder, config: DownBlockConfig, shared: &BlockShared) -> Result<Self> {
        let resnets_vb = vb.pp("resnets");
        let resnets = (0..config.layers)
            .map(|index| {
                let in_channels = if index == 0 {
                    config.in_channels
                } else {
                    config.out_channels
                };
                ResnetBlock2D::load(
                    resnets_vb.pp(index),
                    shared.resnet(in_channels, config.out_channels),
                )
            })
            .collect::<Result<_>>()?;
        let attentions = load_attentions(
            &vb,
            config.layers,
            config.out_channels,
            config.attention,
            shared,
        )?;
        let downsampler = if config.add_downsample {
            Some(Downsample2D::load(
                vb.pp("downsamplers").pp(0),
                config.out_channels,
                config.downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// The block's output, and the skip connections it adds (one per ResNet, one more
    /// after the downsampler).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut xs = xs.clone();
        for (index, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb)?;
            if let Some(attention) = self.attentions.get(index) {
                xs = attention.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) once.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    first: ResnetBlock2D,
    attention: Transformer2DModel,
    second: ResnetBlock2D,
}

impl UNetMidBlock2DCrossAttn {
    pub fn load(
        vb: VarBuilder,
        channels: usize,
        attention: CrossAttn,
        output_scale_factor: f64,
        shared: &BlockShared,
    ) -> Result<Self> {
        let resnet = ResnetConfig {
            output_scale_factor,
            ..shared.resnet(channels, channels)
        };
        let resnets = vb.pp("resnets");
        Ok(Self {
            first: ResnetBlock2D::load(resnets.pp(0), resnet)?,
            attention: Transformer2DModel::load(
                vb.pp("attentions").pp(0),
                shared.transformer(channels, attention),
            )?,
            second: ResnetBlock2D::load(resnets.pp(1), resnet)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward(xs, temb)?;
        let xs = self.attention.forward(&xs, context)?;
        self.second.forward(&xs, temb)
    }
}

/// `UpBlock2D` (ResNets only) or `CrossAttnUpBlock2D` (a transformer after each ResNet),
/// each ResNet taking the previous output concatenated with one skip connection, then an
/// `Upsample2D` unless it is the last block.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    /// Empty in an `UpBlock2D`.
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Sizes of one up block, as diffusers names them.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockConfig {
    /// Channels of the skip connection the last ResNet takes (the down block before the
    /// mirrored one).
    pub in_channels: usize,
    /// Channels coming from the block below.
    pub prev_output_channels: usize,
    pub out_channels: usize,
    /// ResNets in the block: one more than in a down block.
    pub layers: usize,
    pub attention: Option<CrossAttn>,
    pub add_upsample: bool,
}

impl UpBlock2D {
    pub fn load(vb: VarBuilder, config: UpBlockConfig, shared: &BlockShared) -> Result<Self> {
        let resnets_vb = vb.pp("resnets");
        let resnets = (0..config.layers)
            .map(|index| {
                let skip_channels = if index == config.layers - 1 {
                    config.in_channels
                } else {
                    config.out_channels
                };
                let input_channels = if index == 0 {
                    config.prev_output_channels
                } else {
                    config.out_channels
                };
                ResnetBlock2D::load(
                    resnets_vb.pp(index),
                    shared.resnet(input_channels + skip_channels, config.out_channels),
                )
            })
            .collect::<Result<_>>()?;
        let attentions = load_attentions(
            &vb,
            config.layers,
            config.out_channels,
            config.attention,
            shared,
        )?;
        let upsampler = if config.add_upsample {
            Some(Upsample2D::load(
                vb.pp("upsamplers").pp(0),
                config.out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// ResNets in the block: how many skip connections it takes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` in the order the down path produced them; the last is used first.
    /// `upsample_size` as [`Upsample2D::forward`] takes it.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            candle_core::bail!(
                "up block: {} skip connections for {} ResNets",
                skips.len(),
                self.resnets.len()
            )
        }
        let mut xs = xs.clone();
        for (index, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            xs = resnet.forward(&Tensor::cat(&[&xs, skip], 1)?, temb)?;
            if let Some(attention) = self.attentions.get(index) {
                xs = attention.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}
