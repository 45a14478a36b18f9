//! The KL autoencoder (diffusers' `AutoencoderKL`) that maps between images and latents.
//!
//! Built on our own layers ([`super::ops`]: fast CPU convolution, group norm and attention)
//! from the blocks in [`blocks`], which reuse the UNet's ResNet and resampling blocks. It
//! exposes the mean of the latent distribution (needed for deterministic image-to-latent
//! encoding), not only samples. The mid block's attention reads both weight namings
//! diffusers has used (`to_q/to_k/to_v/to_out.0` now, `query/key/value/proj_attn` in older
//! checkpoints).

mod blocks;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;

use self::blocks::{DownEncoderBlock2D, UpDecoderBlock2D, VaeBlockShared, VaeMidBlock};
use super::ops::{Conv2d, GroupNorm};
use super::{load_component, ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "vae";
/// diffusers' VAE blocks use this epsilon in every norm.
const NORM_EPS: f64 = 1e-6;

/// What the VAE needs from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub scaling_factor: f64,
    /// FLUX's and SD 3's VAEs centre their latents: `(z - shift_factor) * scaling_factor`.
    /// The pipelines that use it apply it (diffusers' SD and SDXL pipelines do not).
    pub shift_factor: Option<f64>,
    /// The image size the VAE was trained on: the tile size of a tiled decode.
    pub sample_size: usize,
    /// `force_upcast`: the VAE overflows in float16 (SDXL's), so it runs in float32 when
    /// the pipeline runs in float16, as diffusers does.
    pub force_upcast: bool,
}

impl VaeConfig {
    /// Reads and checks `config.json` from a `vae` folder.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        let block_out_channels = config.usize_list("block_out_channels")?;
        if block_out_channels.is_empty() {
            return Err(config.bad("block_out_channels", "is empty"));
        }
        for (key, block_type) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if config.value(key).is_none() {
                continue;
            }
            let types = config.string_list(key)?;
            if types.len() != block_out_channels.len() {
                return Err(config.bad(
                    key,
                    format!(
                        "has {} entries for {} blocks",
                        types.len(),
                        block_out_channels.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|found| *found != block_type) {
                return Err(PipelineError::unsupported(key, other.as_str(), block_type));
            }
        }
        config.require_one_of("act_fn", &[json!("silu")], "silu")?;
        config.require_one_of("mid_block_add_attention", &[json!(true)], "true")?;
        // Per-channel latent normalisation is not applied yet: refused rather than ignored,
        // since it would move every latent.
        for key in ["latents_mean", "latents_std"] {
            config.require_one_of(key, &[], "null (not set)")?;
        }
        let norm_num_groups = config.usize_or("norm_num_groups", 32)?;
        if let Some(channels) = block_out_channels
            .iter()
            .find(|channels| channels.checked_rem(norm_num_groups) != Some(0))
        {
            return Err(config.bad(
                "norm_num_groups",
                format!("{norm_num_groups} groups do not divide {channels} channels"),
            ));
        }
        Ok(Self {
            in_channels: config.usize_or("in_channels", 3)?,
            out_channels: config.usize_or("out_channels", 3)?,
            latent_channels: config.usize_or("latent_channels", 4)?,
            layers_per_block: config.usize_or("layers_per_block", 1)?,
            norm_num_groups,
            use_quant_conv: config.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: config.bool_or("use_post_quant_conv", true)?,
            scaling_factor: config.f64_or("scaling_factor", 0.18215)?,
            shift_factor: match config.value("shift_factor") {
                Some(_) => Some(config.f64_or("shift_factor", 0.0)?),
                None => None,
            },
            force_upcast: config.bool_or("force_upcast", true)?,
            sample_size: match config.value("sample_size") {
                Some(serde_json::Value::Array(sizes)) => sizes
                    .first()
                    .and_then(serde_json::Value::as_u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| config.bad("sample_size", "is an empty or non-numeric list"))?,
                _ => config.usize_or("sample_size", 512)?,
            },
            block_out_channels,
        })
    }

    /// How many image pixels one latent pixel covers along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn block_shared(&self) -> VaeBlockShared {
        VaeBlockShared {
            groups: self.norm_num_groups,
            eps: NORM_EPS,
        }
    }

    fn last_channels(&self) -> usize {
        self.block_out_channels[self.block_out_channels.len() - 1]
    }
}

/// A 3x3 convolution keeping the height and width.
fn padded_conv(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
) -> candle_core::Result<Conv2d> {
    Conv2d::load(vb, in_channels, out_channels, 3, 1, 1)
}

/// Images to the moments (mean and log-variance) of the latent distribution.
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> candle_core::Result<Self> {
        let channels = &config.block_out_channels;
        let shared = config.block_shared();
        let blocks_vb = vb.pp("down_blocks");
        let down_blocks = (0..channels.len())
            .map(|index| {
                DownEncoderBlock2D::load(
                    blocks_vb.pp(index),
                    channels[index.saturating_sub(1)],
                    channels[index],
                    config.layers_per_block,
                    index + 1 < channels.len(),
                    &shared,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last = config.last_channels();
        Ok(Self {
            conv_in: padded_conv(vb.pp("conv_in"), config.in_channels, channels[0])?,
            down_blocks,
            mid_block: VaeMidBlock::load(vb.pp("mid_block"), last, &shared)?,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                config.norm_num_groups,
                last,
                NORM_EPS,
            )?,
            // Mean and log-variance of the latent distribution.
            conv_out: padded_conv(vb.pp("conv_out"), last, 2 * config.latent_channels)?,
        })
    }

    fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// Latents to images.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> candle_core::Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let shared = config.block_shared();
        let last = config.last_channels();
        let first = config.block_out_channels[0];
        let blocks_vb = vb.pp("up_blocks");
        let up_blocks = (0..reversed.len())
            .map(|index| {
                UpDecoderBlock2D::load(
                    blocks_vb.pp(index),
                    reversed[index.saturating_sub(1)],
                    reversed[index],
                    config.layers_per_block + 1,
                    index + 1 < reversed.len(),
                    &shared,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: padded_conv(vb.pp("conv_in"), config.latent_channels, last)?,
            mid_block: VaeMidBlock::load(vb.pp("mid_block"), last, &shared)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                config.norm_num_groups,
                first,
                NORM_EPS,
            )?,
            conv_out: padded_conv(vb.pp("conv_out"), first, config.out_channels)?,
        })
    }

    fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(latents)?)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// diffusers clamps the encoder's log-variance to this range.
const LOG_VARIANCE_MIN: f32 = -30.0;
const LOG_VARIANCE_MAX: f32 = 20.0;

/// The encoder's diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`),
/// in the VAE's dtype and before the scaling factor.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub log_variance: Tensor,
}

impl LatentDistribution {
    /// Standard deviation `exp(log_variance / 2)`.
    pub fn std(&self) -> Result<Tensor, PipelineError> {
        (&self.log_variance * 0.5)
            .and_then(|half| half.exp())
            .in_component(COMPONENT)
    }

    /// `mean + std * noise`, computed in f32; `noise` is standard normal noise shaped like
    /// the mean.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor, PipelineError> {
        let std = self.std()?;
        let sample = || -> candle_core::Result<Tensor> {
            let mean = self.mean.to_dtype(DType::F32)?;
            let std = std.to_dtype(DType::F32)?;
            let noise = noise.to_dtype(DType::F32)?.to_device(mean.device())?;
            mean + (std * noise)?
        };
        sample().in_component(COMPONENT)
    }
}

/// The VAE with its scaling constants.
#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
    device: Device,
    bytes: u64,
}

impl Vae {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` from a `vae` folder.
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
        let (mut vae, bytes) = load_component(
            dir,
            (variant, dtype, device),
            COMPONENT,
            VaeConfig::load,
            Self::new,
        )?;
        vae.bytes = bytes;
        Ok(vae)
    }

    /// Builds the VAE from weights named as diffusers names them.
    pub fn new(vb: VarBuilder, config: VaeConfig) -> candle_core::Result<Self> {
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::load(
                vb.pp("quant_conv"),
                2 * latent,
                2 * latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(
                vb.pp("post_quant_conv"),
                latent,
                latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            config,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            bytes: 0,
        })
    }

    /// Images (batch, out_channels, h * scale, w * scale), roughly in [-1, 1], from latents
    /// (batch, latent_channels, h, w) that are already divided by the scaling factor.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.check_channels("latents", latents, self.config.latent_channels)?;
        let decode = || -> candle_core::Result<Tensor> {
            match &self.post_quant_conv {
                Some(conv) => self.decoder.forward(&conv.forward(latents)?),
                None => self.decoder.forward(latents),
            }
        };
        decode().in_component(COMPONENT)
    }

    /// About the most memory decoding `images` latents to `height` x `width` pixels takes
    /// beyond the weights: six full-resolution feature maps of the decoder's last level per
    /// image decoded at once (one with slicing; one tile's worth with tiling).
    pub fn decode_activation_bytes(
        &self,
        images: usize,
        height: usize,
        width: usize,
        element_bytes: usize,
        slicing: bool,
        tiling: bool,
    ) -> u64 {
        let channels = self
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(128);
        let at_once = if slicing { 1 } else { images };
        let pixels = if tiling {
            self.config.sample_size.pow(2).min(height * width)
        } else {
            height * width
        };
        (at_once * pixels * channels * element_bytes) as u64 * 6
    }

    /// [`Vae::decode`] in overlapping tiles, as diffusers' `enable_tiling()` decodes: tiles
    /// of `sample_size / scale_factor` latents every three quarters of a tile, each decoded
    /// alone, blended linearly with the tile above and to the left over a quarter of a
    /// tile, and cropped to the stride. Latents no larger than one tile decode whole.
    pub fn decode_tiled(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.check_channels("latents", latents, self.config.latent_channels)?;
        let tile = (self.config.sample_size / self.config.scale_factor()).max(1);
        let (_, _, height, width) = latents.dims4().in_component(COMPONENT)?;
        if height <= tile && width <= tile {
            return self.decode(latents);
        }
        let tiled = || -> candle_core::Result<Tensor> {
            let stride = (tile as f64 * 0.75) as usize;
            let blend = (self.config.sample_size as f64 * 0.25) as usize;
            let limit = self.config.sample_size - blend;
            let mut rows: Vec<Vec<Tensor>> = Vec::new();
            for top in (0..height).step_by(stride.max(1)) {
                let mut row = Vec::new();
                for left in (0..width).step_by(stride.max(1)) {
                    let part = latents.narrow(2, top, tile.min(height - top))?.narrow(
                        3,
                        left,
                        tile.min(width - left),
                    )?;
                    let part = match &self.post_quant_conv {
                        Some(conv) => conv.forward(&part)?,
                        None => part,
                    };
                    let mut decoded = self.decoder.forward(&part)?;
                    if let Some(above) = rows.last().map(|r: &Vec<Tensor>| &r[row.len()]) {
                        decoded = blend_edges(above, &decoded, blend, 2)?;
                    }
                    if let Some(before) = row.last() {
                        decoded = blend_edges(before, &decoded, blend, 3)?;
                    }
                    row.push(decoded);
                }
                rows.push(row);
            }
            let cropped = rows
                .iter()
                .map(|row| {
                    let parts = row
                        .iter()
                        .map(|t| crop_to(t, limit))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 3)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&cropped, 2)
        };
        tiled().in_component(COMPONENT)
    }

    /// Mean of the latent distribution (before the scaling factor) for images
    /// (batch, in_channels, h, w) in [-1, 1]; h and w must be multiples of the scale factor.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor, PipelineError> {
        Ok(self.encode(images)?.mean)
    }

    /// The diagonal Gaussian latent distribution (before the scaling factor) for images
    /// (batch, in_channels, h, w) in [-1, 1]; h and w must be multiples of the scale factor.
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution, PipelineError> {
        self.check_channels("images", images, self.config.in_channels)?;
        let (_, _, height, width) = images.dims4().in_component(COMPONENT)?;
        let scale = self.scale_factor();
        if height % scale != 0 || width % scale != 0 {
            return Err(PipelineError::invalid(
                "images",
                format!("height {height} and width {width} must be multiples of {scale}"),
            ));
        }
        let encode = || -> candle_core::Result<LatentDistribution> {
            let moments = self.encoder.forward(images)?;
            let moments = match &self.quant_conv {
                Some(conv) => conv.forward(&moments)?,
                None => moments,
            };
            let latent = self.config.latent_channels;
            Ok(LatentDistribution {
                mean: moments.narrow(1, 0, latent)?,
                log_variance: moments
                    .narrow(1, latent, latent)?
                    .clamp(LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)?,
            })
        };
        encode().in_component(COMPONENT)
    }

    fn check_channels(
        &self,
        name: &str,
        xs: &Tensor,
        channels: usize,
    ) -> Result<(), PipelineError> {
        match xs.dims() {
            [_, found, _, _] if *found == channels => Ok(()),
            dims => Err(PipelineError::invalid(
                name,
                format!("expected shape [batch, {channels}, height, width], got {dims:?}"),
            )),
        }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype its weights are in; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device its weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// How many image pixels one latent pixel covers along each side.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// Size of the weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (or
/// columns) of `b` fade from `a`'s last ones into `b`'s own, row `i` weighing `a` by
/// `1 - i/extent`.
fn blend_edges(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let a_len = a.dim(dim)?;
    let mut parts = Vec::with_capacity(extent + 1);
    for i in 0..extent {
        let weight = i as f64 / extent as f64;
        let from_a = a.narrow(dim, a_len - extent + i, 1)?;
        let from_b = b.narrow(dim, i, 1)?;
        parts.push(((from_a * (1.0 - weight))? + (from_b * weight)?)?);
    }
    parts.push(b.narrow(dim, extent, b.dim(dim)? - extent)?);
    Tensor::cat(&parts, dim)
}

/// The top-left `limit` x `limit` of a decoded tile (less where the tile is smaller).
fn crop_to(tile: &Tensor, limit: usize) -> candle_core::Result<Tensor> {
    let (_, _, height, width) = tile.dims4()?;
    tile.narrow(2, 0, limit.min(height))?
        .narrow(3, 0, limit.min(width))
}
