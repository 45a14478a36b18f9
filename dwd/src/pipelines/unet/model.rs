//! diffusers' `UNet2DConditionModel` for SD 1.x, 2.x and SDXL: the noise (or v)
//! prediction for a latent at a timestep, conditioned on the text encoders' hidden states.
//!
//! `conv_in` → down blocks (each handing its outputs on as skip connections) → mid block →
//! up blocks (each consuming skip connections, mirrored) → group norm, SiLU, `conv_out`.
//! The timestep becomes an embedding every ResNet adds to its features. SDXL's
//! `addition_embed_type: "text_time"` adds to it a second embedding of the pooled text
//! embedding and the micro-conditioning time ids ([`TextTime`]).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    BlockShared, CrossAttn, DownBlock2D, DownBlockConfig, UNetMidBlock2DCrossAttn, UpBlock2D,
    UpBlockConfig,
};
use super::embeddings::{TimestepEmbedding, Timesteps};
use crate::pipelines::ops::{Conv2d, GroupNorm};

/// One resolution of the UNet: a down block and its mirrored up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockConfig {
    pub out_channels: usize,
    /// Attention heads (diffusers' `attention_head_dim` in SD 1.x/2.x configs); the mid
    /// block uses the last block's, even when that block has no cross-attention.
    pub heads: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel`.
    pub transformer_layers: usize,
    /// Whether the block is a `CrossAttn…Block2D` rather than a plain one.
    pub cross_attention: bool,
}

impl BlockConfig {
    fn attention(&self) -> CrossAttn {
        CrossAttn {
            heads: self.heads,
            layers: self.transformer_layers,
        }
    }
}

/// The model's configuration, from diffusers' `unet/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionModelConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// From the highest resolution to the lowest; at least one.
    pub blocks: Vec<BlockConfig>,
    /// ResNets per down block (up blocks have one more).
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    /// SDXL's `addition_embed_type: "text_time"`; `None` for SD 1.x and 2.x.
    pub text_time: Option<TextTimeConfig>,
}

/// The sizes of SDXL's added text-and-time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: sinusoid channels of each time id.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled text width + time ids × the above.
    pub input_dim: usize,
}

/// SDXL's added conditions for one UNet call, one row per batch element.
#[derive(Debug, Clone, Copy)]
pub struct TextTime<'a> {
    /// The pooled, projected text embedding (batch, width).
    pub text_embeds: &'a Tensor,
    /// `original_size`, `crops_coords_top_left` and `target_size` (or the aesthetic score)
    /// as f32 (batch, ids).
    pub time_ids: &'a Tensor,
}

/// `add_time_proj` and `add_embedding`: the time ids' sinusoids after the pooled text
/// embedding, through a `TimestepEmbedding` to the width of the time embedding.
#[derive(Debug, Clone)]
struct AddedEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    config: TextTimeConfig,
}

impl AddedEmbedding {
    fn forward(&self, added: TextTime<'_>, dtype: candle_core::DType) -> Result<Tensor> {
        let (batch, ids) = added.time_ids.dims2()?;
        let values = added.time_ids.flatten_all()?.to_vec1::<f32>()?;
        let device = added.text_embeds.device();
        let time_embeds = self
            .time_proj
            .forward_values(&values, device)?
            .reshape((batch, ids * self.config.time_embed_dim))?;
        let text_embeds = added.text_embeds.to_dtype(candle_core::DType::F32)?;
        let inputs = Tensor::cat(&[&text_embeds, &time_embeds], 1)?;
        if inputs.dim(1)? != self.config.input_dim {
            candle_core::bail!(
                "the added embedding takes {} values per row (projection_class_embeddings_input_dim), got {}",
                self.config.input_dim,
                inputs.dim(1)?
            )
        }
        self.embedding.forward(&inputs.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddedEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock2D>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionModelConfig,
}

impl UNet2DConditionModel {
    /// Builds the model from weights named as diffusers names them.
    pub fn load(vb: VarBuilder, config: UNet2DConditionModelConfig) -> Result<Self> {
        let blocks = &config.blocks;
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            candle_core::bail!("a UNet needs at least one block")
        };
        let base_channels = first.out_channels;
        let temb_channels = base_channels * 4;
        let shared = BlockShared {
            temb_channels,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            cross_attention_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
        };

        let time_proj = Timesteps::new(base_channels, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding =
            TimestepEmbedding::load(vb.pp("time_embedding"), base_channels, temb_channels)?;
        let add_embedding = match config.text_time {
            Some(text_time) => Some(AddedEmbedding {
                time_proj: Timesteps::new(
                    text_time.time_embed_dim,
                    config.flip_sin_to_cos,
                    config.freq_shift,
                ),
                embedding: TimestepEmbedding::load(
                    vb.pp("add_embedding"),
                    text_time.input_dim,
                    temb_channels,
                )?,
                config: text_time,
            }),
            None => None,
        };
        let conv_in = Conv2d::load(vb.pp("conv_in"), config.in_channels, base_channels, 3, 1, 1)?;

        let down_blocks = load_down_blocks(vb.pp("down_blocks"), &config, &shared)?;
        let mid_block = UNetMidBlock2DCrossAttn::load(
            vb.pp("mid_block"),
            last.out_channels,
            last.attention(),
            config.mid_block_scale_factor,
            &shared,
        )?;
        let up_blocks = load_up_blocks(vb.pp("up_blocks"), &config, &shared)?;
        Ok(Self {
            time_proj,
            time_embedding,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                config.norm_num_groups,
                base_channels,
                config.norm_eps,
            )?,
            conv_out: Conv2d::load(
                vb.pp("conv_out"),
                base_channels,
                config.out_channels,
                3,
                1,
                1,
            )?,
            config,
        })
    }

    pub fn config(&self) -> &UNet2DConditionModelConfig {
        &self.config
    }

    /// `sample` (batch, in_channels, h, w) at `timestep`, conditioned on
    /// `encoder_hidden_states` (batch, tokens, cross_attention_dim), to (batch,
    /// out_channels, h, w). `added` is required by, and only taken by, a model with
    /// `addition_embed_type: "text_time"`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<TextTime<'_>>,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.dims4()?;

        // When the latent's size is not a multiple of 2^(upsamplers), some downsampler
        // rounded an odd size up, and doubling would not give back the size of the skip
        // connection the next up block concatenates: each upsampler is then told that size.
        let overall_factor = 1 << (self.up_blocks.len() - 1);
        let forward_upsample_size = height % overall_factor != 0 || width % overall_factor != 0;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        let sinusoids = self.time_proj.forward(timestep, batch, sample.device())?;
        let temb = self
            .time_embedding
            .forward(&sinusoids.to_dtype(sample.dtype())?)?;
        let temb = match (&self.add_embedding, added) {
            (Some(embedding), Some(added)) => (temb + embedding.forward(added, sample.dtype())?)?,
            (None, None) => temb,
            (Some(_), None) => candle_core::bail!(
                "this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids"
            ),
            (None, Some(_)) => {
                candle_core::bail!("this UNet takes no text_embeds or time_ids")
            }
        };

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&xs, &temb, encoder_hidden_states)?;
            skips.extend(block_skips);
            xs = out;
        }

        xs = self.mid_block.forward(&xs, &temb, encoder_hidden_states)?;

        for (index, block) in self.up_blocks.iter().enumerate() {
            let Some(start) = skips.len().checked_sub(block.skip_count()) else {
                candle_core::bail!("up block {index}: not enough skip connections")
            };
            let block_skips = skips.split_off(start);
            let is_last = index + 1 == self.up_blocks.len();
            let upsample_size = match skips.last() {
                Some(next_skip) if forward_upsample_size && !is_last => {
                    let (_, _, skip_height, skip_width) = next_skip.dims4()?;
                    Some((skip_height, skip_width))
                }
                _ => None,
            };
            xs = block.forward(
                &xs,
                &block_skips,
                &temb,
                encoder_hidden_states,
                upsample_size,
            )?;
        }

        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// The down path: each block halves the resolution but the last.
fn load_down_blocks(
    vb: VarBuilder,
    config: &UNet2DConditionModelConfig,
    shared: &BlockShared,
) -> Result<Vec<DownBlock2D>> {
    let blocks = &config.blocks;
    let mut down_blocks = Vec::with_capacity(blocks.len());
    let mut in_channels = blocks.first().map_or(0, |b| b.out_channels);
    for (index, block) in blocks.iter().enumerate() {
        let down = DownBlockConfig {
            in_channels,
            out_channels: block.out_channels,
            layers: config.layers_per_block,
            attention: block.cross_attention.then(|| block.attention()),
            add_downsample: index + 1 < blocks.len(),
            downsample_padding: config.downsample_padding,
        };
        down_blocks.push(DownBlock2D::load(vb.pp(index), down, shared)?);
        in_channels = block.out_channels;
    }
    Ok(down_blocks)
}

/// The up path mirrors the down path: up block `i` matches down block `blocks - 1 - i`,
/// and its last ResNet takes the skip connection from the block before that one (the
/// input of the mirrored down block).
fn load_up_blocks(
    vb: VarBuilder,
    config: &UNet2DConditionModelConfig,
    shared: &BlockShared,
) -> Result<Vec<UpBlock2D>> {
    let blocks = &config.blocks;
    let mut up_blocks = Vec::with_capacity(blocks.len());
    let mut prev_output_channels = blocks.last().map_or(0, |b| b.out_channels);
    for (index, block) in blocks.iter().rev().enumerate() {
        let mirrored = blocks.len() - 1 - index;
        let up = UpBlockConfig {
            in_channels: blocks[mirrored.saturating_sub(1)].out_channels,
            prev_output_channels,
            out_channels: block.out_channels,
            layers: config.layers_per_block + 1,
            attention: block.cross_attention.then(|| block.attention()),
            add_upsample: mirrored > 0,
        };
        up_blocks.push(UpBlock2D::load(vb.pp(index), up, shared)?);
        prev_output_channels = block.out_channels;
    }
    Ok(up_blocks)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;

    fn tiny_config(blocks: &[(usize, bool)]) -> UNet2DConditionModelConfig {
        UNet2DConditionModelConfig {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            blocks: blocks
                .iter()
                .map(|&(out_channels, cross_attention)| BlockConfig {
                    out_channels,
                    heads: 2,
                    transformer_layers: 1,
                    cross_attention,
                })
                .collect(),
            layers_per_block: 1,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 8,
            norm_eps: 1e-5,
            cross_attention_dim: 16,
            use_linear_projection: false,
            text_time: None,
        }
    }

    /// Odd latent sizes: each upsampler is told the size of the skip connection it meets.
    #[test]
    fn odd_latent_sizes_come_back_at_their_size() {
        let device = Device::Cpu;
        let config = tiny_config(&[(16, false), (16, true), (32, true)]);
        let vb = VarBuilder::zeros(DType::F32, &device);
        let unet = UNet2DConditionModel::load(vb, config).unwrap();
        let context = Tensor::zeros((1, 5, 16), DType::F32, &device).unwrap();
        for (height, width) in [(9, 7), (8, 6), (5, 12)] {
            let sample = Tensor::zeros((1, 4, height, width), DType::F32, &device).unwrap();
            let out = unet.forward(&sample, 10.0, &context, None).unwrap();
            assert_eq!(out.dims4().unwrap(), (1, 4, height, width));
        }
    }
}
