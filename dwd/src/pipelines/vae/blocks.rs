//! The VAE's blocks on our own layers ([`crate::pipelines::ops`]): diffusers'
//! `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D` and the mid block's
//! single-head self-attention over all pixels.
//!
//! They reuse the UNet's [`ResnetBlock2D`] (here without a time embedding),
//! [`Downsample2D`] (with diffusers' VAE padding: one row and column of zeros at the
//! bottom and right, then a stride-2 convolution without padding) and [`Upsample2D`].

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::pipelines::ops::{self, GroupNorm, Linear};
use crate::pipelines::unet::attention::{to_map, to_tokens};
use crate::pipelines::unet::blocks::{Downsample2D, Upsample2D};
use crate::pipelines::unet::resnet::{ResnetBlock2D, ResnetConfig};

/// What every block of one VAE shares.
#[derive(Debug, Clone, Copy)]
pub struct VaeBlockShared {
    pub groups: usize,
    /// Epsilon of every group norm (1e-6 in diffusers' VAE).
    pub eps: f64,
}

impl VaeBlockShared {
    fn resnet(
        &self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<ResnetBlock2D> {
        let config = ResnetConfig {
            in_channels,
            out_channels,
            // Not read: the VAE's ResNets have no time embedding.
            temb_channels: 0,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        };
        ResnetBlock2D::load_without_time_embedding(vb, config)
    }

    /// `count` ResNets as `resnets.{i}`, the first taking `in_channels`.
    fn resnets(
        &self,
        vb: &VarBuilder,
        count: usize,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<Vec<ResnetBlock2D>> {
        let vb = vb.pp("resnets");
        (0..count)
            .map(|index| {
                let input = if index == 0 {
                    in_channels
                } else {
                    out_channels
                };
                self.resnet(vb.pp(index), input, out_channels)
            })
            .collect()
    }
}

fn run_resnets(resnets: &[ResnetBlock2D], xs: &Tensor) -> Result<Tensor> {
    let mut xs = xs.clone();
    for resnet in resnets {
        xs = resnet.forward_without_time_embedding(&xs)?;
    }
    Ok(xs)
}

/// The mid block's attention (diffusers' `Attention` with one head spanning all channels,
/// as the VAE sets it up): group norm, every pixel attending to every pixel, `to_out.0`,
/// then the input added back.
///
/// Reads both namings diffusers has used: `to_q/to_k/to_v/to_out.0` and, in older
/// checkpoints, `query/key/value/proj_attn`, whose weights may also be stored as 1x1
/// convolutions (channels, channels, 1, 1).
#[derive(Debug, Clone)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl VaeAttention {
    pub fn load(vb: VarBuilder, channels: usize, shared: &VaeBlockShared) -> Result<Self> {
        let [q, k, v, out] = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), shared.groups, channels, shared.eps)?,
            to_q: projection(vb.pp(q), channels)?,
            to_k: projection(vb.pp(k), channels)?,
            to_v: projection(vb.pp(v), channels)?,
            to_out: projection(vb.pp(out), channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    /// (batch, channels, h, w) to the same shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        // (batch, pixels, channels): one head, so this is already (batch × heads, len, dim).
        let tokens = to_tokens(&self.group_norm.forward(xs)?)?;
        let query = self.to_q.forward(&tokens)?;
        let key = self.to_k.forward(&tokens)?;
        let value = self.to_v.forward(&tokens)?;
        let attended = ops::attention(&query, &key, &value, self.scale)?;
        let projected = to_map(&self.to_out.forward(&attended)?, height, width)?;
        // diffusers' `rescale_output_factor` is 1 for the VAE.
        projected + xs
    }
}

/// A (channels → channels) linear layer with bias, its weight stored either as a matrix or
/// as a 1x1 convolution kernel.
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let matrix_error = match Linear::load(vb.clone(), channels, channels, true) {
        Ok(linear) => return Ok(linear),
        Err(error) => error,
    };
    let Ok(kernel) = vb.get((channels, channels, 1, 1), "weight") else {
        // The matrix is today's layout: its error says what was expected.
        return Err(matrix_error);
    };
    let tensors = HashMap::from([
        ("weight".to_string(), kernel.reshape((channels, channels))?),
        ("bias".to_string(), vb.get(channels, "bias")?),
    ]);
    let matrix_vb = VarBuilder::from_tensors(tensors, vb.dtype(), vb.device());
    Linear::load(matrix_vb, channels, channels, true)
}

/// `UNetMidBlock2D` as the VAE has it: ResNet, attention, ResNet.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    first: ResnetBlock2D,
    attention: VaeAttention,
    second: ResnetBlock2D,
}

impl VaeMidBlock {
    pub fn load(vb: VarBuilder, channels: usize, shared: &VaeBlockShared) -> Result<Self> {
        let resnets = vb.pp("resnets");
        Ok(Self {
            first: shared.resnet(resnets.pp(0), channels, channels)?,
            attention: VaeAttention::load(vb.pp("attentions").pp(0), channels, shared)?,
            second: shared.resnet(resnets.pp(1), channels, channels)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward_without_time_embedding(xs)?;
        let xs = self.attention.forward(&xs)?;
        self.second.forward_without_time_embedding(&xs)
    }
}

/// `DownEncoderBlock2D`: `layers` ResNets, then a [`Downsample2D`] unless it is the last
/// block.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        add_downsample: bool,
        shared: &VaeBlockShared,
    ) -> Result<Self> {
        let resnets = shared.resnets(&vb, layers, in_channels, out_channels)?;
        let downsampler = if add_downsample {
            // Padding 0: the VAE's right-and-bottom zero padding.
            Some(Downsample2D::load(
                vb.pp("downsamplers").pp(0),
                out_channels,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = run_resnets(&self.resnets, xs)?;
        match &self.downsampler {
            Some(downsampler) => downsampler.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// `UpDecoderBlock2D`: `layers` ResNets (one more than the encoder's blocks have), then an
/// [`Upsample2D`] (twice the size) unless it is the last block.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        add_upsample: bool,
        shared: &VaeBlockShared,
    ) -> Result<Self> {
        let resnets = shared.resnets(&vb, layers, in_channels, out_channels)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::load(vb.pp("upsamplers").pp(0), out_channels)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = run_resnets(&self.resnets, xs)?;
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module};
    use candle_transformers::models::stable_diffusion::attention::{
        AttentionBlock, AttentionBlockConfig,
    };

    use super::*;
    use crate::pipelines::test_support::{max_abs_diff, random};

    const CHANNELS: usize = 8;
    const SHARED: VaeBlockShared = VaeBlockShared {
        groups: 4,
        eps: 1e-6,
    };

    /// An attention block's weights under `names` (q, k, v, out), the projections stored as
    /// matrices or as 1x1 convolution kernels.
    fn attention_weights(names: [&str; 4], as_kernels: bool) -> HashMap<String, Tensor> {
        let mut tensors = HashMap::new();
        tensors.insert("group_norm.weight".into(), random(&[CHANNELS], 1));
        tensors.insert("group_norm.bias".into(), random(&[CHANNELS], 2));
        for (index, name) in names.iter().enumerate() {
            let seed = 10 * (index as u64 + 1);
            let weight = (random(&[CHANNELS, CHANNELS], seed) * 0.3).expect("a weight");
            let weight = if as_kernels {
                weight
                    .reshape((CHANNELS, CHANNELS, 1, 1))
                    .expect("a kernel")
            } else {
                weight
            };
            tensors.insert(format!("{name}.weight"), weight);
            tensors.insert(format!("{name}.bias"), random(&[CHANNELS], seed + 1));
        }
        tensors
    }

    fn var_builder(tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
    }

    const NEW_NAMES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
    const OLD_NAMES: [&str; 4] = ["query", "key", "value", "proj_attn"];

    #[test]
    fn attention_matches_candle_transformers_attention_block() {
        // Batch 1: candle's block projects a transposed view, which candle 0.11's CPU
        // matmul gets wrong past the first batch item (see the next test).
        let xs = random(&[1, CHANNELS, 5, 3], 3);
        let ours = VaeAttention::load(
            var_builder(attention_weights(NEW_NAMES, false)),
            CHANNELS,
            &SHARED,
        )
        .expect("ours");
        let config = AttentionBlockConfig {
            num_head_channels: None,
            num_groups: SHARED.groups,
            rescale_output_factor: 1.0,
            eps: SHARED.eps,
        };
        let reference = AttentionBlock::new(
            var_builder(attention_weights(NEW_NAMES, false)),
            CHANNELS,
            config,
        )
        .expect("candle's");
        let got = ours.forward(&xs).expect("ours");
        let want = reference.forward(&xs).expect("candle's");
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn each_item_of_a_batch_is_attended_as_if_alone() {
        let attention = VaeAttention::load(
            var_builder(attention_weights(NEW_NAMES, false)),
            CHANNELS,
            &SHARED,
        )
        .expect("an attention");
        let xs = random(&[3, CHANNELS, 5, 3], 4);
        let batched = attention.forward(&xs).expect("the batch");
        for item in 0..3 {
            let alone = xs
                .narrow(0, item, 1)
                .and_then(|x| attention.forward(&x))
                .expect("one item");
            let from_batch = batched.narrow(0, item, 1).expect("one item");
            assert!(max_abs_diff(&alone, &from_batch) < 1e-6, "item {item}");
        }
    }

    #[test]
    fn older_weight_names_and_kernel_shaped_projections_load_the_same_attention() {
        let xs = random(&[1, CHANNELS, 4, 4], 5);
        let run = |names, as_kernels| {
            VaeAttention::load(
                var_builder(attention_weights(names, as_kernels)),
                CHANNELS,
                &SHARED,
            )
            .and_then(|attention| attention.forward(&xs))
            .expect("an attention")
        };
        let today = run(NEW_NAMES, false);
        for (names, as_kernels) in [(OLD_NAMES, false), (OLD_NAMES, true), (NEW_NAMES, true)] {
            assert_eq!(max_abs_diff(&run(names, as_kernels), &today), 0.0);
        }
    }

    #[test]
    fn a_projection_of_the_wrong_size_is_an_error_naming_the_weight() {
        let mut tensors = attention_weights(NEW_NAMES, false);
        tensors.insert("to_k.weight".into(), random(&[CHANNELS, CHANNELS + 1], 7));
        let error = VaeAttention::load(var_builder(tensors), CHANNELS, &SHARED)
            .expect_err("a shape mismatch");
        assert!(error.to_string().contains("to_k.weight"), "{error}");
    }

    #[test]
    fn encoder_blocks_downsample_with_right_and_bottom_padding() {
        let mut tensors = HashMap::new();
        for (index, name) in ["norm1", "norm2"].iter().enumerate() {
            tensors.insert(format!("resnets.0.{name}.weight"), random(&[CHANNELS], 1));
            tensors.insert(
                format!("resnets.0.{name}.bias"),
                random(&[CHANNELS], index as u64),
            );
        }
        for (index, name) in ["resnets.0.conv1", "resnets.0.conv2", "downsamplers.0.conv"]
            .iter()
            .enumerate()
        {
            let seed = 20 * (index as u64 + 1);
            tensors.insert(
                format!("{name}.weight"),
                (random(&[CHANNELS, CHANNELS, 3, 3], seed) * 0.1).expect("a weight"),
            );
            tensors.insert(format!("{name}.bias"), random(&[CHANNELS], seed + 1));
        }
        let block = DownEncoderBlock2D::load(
            var_builder(tensors.clone()),
            CHANNELS,
            CHANNELS,
            1,
            true,
            &SHARED,
        )
        .expect("a block");
        let xs = random(&[1, CHANNELS, 6, 6], 9);
        let got = block.forward(&xs).expect("a forward");
        assert_eq!(got.dims(), &[1, CHANNELS, 3, 3]);
        // What diffusers does: pad (0, 1, 0, 1), then a stride-2 convolution, padding 0.
        let resnet = SHARED
            .resnet(
                var_builder(tensors.clone()).pp("resnets").pp(0),
                CHANNELS,
                CHANNELS,
            )
            .expect("a resnet");
        let hidden = resnet
            .forward_without_time_embedding(&xs)
            .expect("a resnet");
        let padded = hidden
            .pad_with_zeros(3, 0, 1)
            .and_then(|xs| xs.pad_with_zeros(2, 0, 1))
            .expect("padding");
        let want = padded
            .conv2d(&tensors["downsamplers.0.conv.weight"], 0, 2, 1, 1)
            .and_then(|ys| {
                ys.broadcast_add(
                    &tensors["downsamplers.0.conv.bias"]
                        .reshape((1, CHANNELS, 1, 1))
                        .expect("a bias"),
                )
            })
            .expect("candle's convolution");
        assert!(max_abs_diff(&got, &want) < 1e-4);
    }
}
