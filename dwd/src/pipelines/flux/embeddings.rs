//! What FLUX's transformer is conditioned on besides the tokens: the timestep (and, for
//! FLUX.1-dev, the guidance scale) embedded with CLIP's pooled prompt into one vector
//! (`CombinedTimestepGuidanceTextProjEmbeddings`), and the rotary position embedding of
//! every token (`FluxPosEmbed`), computed from its 3-axis id (`cat(txt_ids, img_ids)`).
//!
//! Also the normalisations FLUX's blocks share: the affine-free layer norm modulated by
//! the conditioning vector (`AdaLayerNormZero*`, `AdaLayerNormContinuous`) and the RMS norm
//! of queries and keys.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::pipelines::ops::Linear;
use crate::pipelines::unet::embeddings::Timesteps;

/// Channels of the timestep's sinusoids.
const TIME_CHANNELS: usize = 256;
/// Epsilon of every FLUX layer and RMS norm.
pub const NORM_EPS: f64 = 1e-6;

/// `linear_1` → SiLU → `linear_2` (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection` with `act_fn="silu"`).
#[derive(Debug, Clone)]
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, in_features: usize, out_features: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(vb.pp("linear_1"), in_features, out_features, true)?,
            linear_2: Linear::load(vb.pp("linear_2"), out_features, out_features, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = candle_nn::ops::silu(&self.linear_1.forward(xs)?)?;
        self.linear_2.forward(&xs)
    }
}

/// The conditioning vector `temb`: timestep embedding + guidance embedding (when the model
/// has one) + projected pooled text.
#[derive(Debug, Clone)]
pub struct TimeTextEmbedding {
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
    sinusoids: Timesteps,
}

impl TimeTextEmbedding {
    pub fn load(vb: VarBuilder, dim: usize, pooled_dim: usize, guidance: bool) -> Result<Self> {
        let guidance_embedder = match guidance {
            true => Some(Mlp::load(vb.pp("guidance_embedder"), TIME_CHANNELS, dim)?),
            false => None,
        };
        Ok(Self {
            timestep_embedder: Mlp::load(vb.pp("timestep_embedder"), TIME_CHANNELS, dim)?,
            guidance_embedder,
            text_embedder: Mlp::load(vb.pp("text_embedder"), pooled_dim, dim)?,
            sinusoids: Timesteps::new(TIME_CHANNELS, true, 0.0),
        })
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `temb` (batch, dim) for `timestep` and `guidance` already multiplied by 1000, one
    /// value per row; `pooled` is (batch, pooled_dim).
    pub fn forward(
        &self,
        timestep: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let embed = |mlp: &Mlp, values: &[f32]| -> Result<Tensor> {
            let sinusoids = self.sinusoids.forward_values(values, pooled.device())?;
            mlp.forward(&sinusoids.to_dtype(pooled.dtype())?)
        };
        let time = embed(&self.timestep_embedder, timestep)?;
        let time = match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(values)) => (time + embed(embedder, values)?)?,
            _ => time,
        };
        time + self.text_embedder.forward(pooled)?
    }
}

/// A value as the model's dtype holds it: diffusers casts the timestep and guidance to the
/// hidden states' dtype before multiplying them by 1000.
pub fn in_dtype(value: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(value).to_f32(),
        DType::F16 => half::f16::from_f32(value).to_f32(),
        _ => value,
    }
}

/// The rotary embedding's cosines and sines, (tokens, head_dim) in f32, for token ids
/// (tokens, axes): per axis `dim_i / 2` frequencies `theta^(-2j/dim_i)` times the id's
/// value on that axis, each angle repeated twice (interleaved pairs), computed in float64
/// as diffusers does on CPU and CUDA.
pub fn rotary_embedding(
    ids: &[[f32; 3]],
    axes_dims: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let theta = 10000f64;
    let head_dim: usize = axes_dims.iter().sum();
    let mut cos = Vec::with_capacity(ids.len() * head_dim);
    let mut sin = Vec::with_capacity(ids.len() * head_dim);
    for id in ids {
        for (axis, &dim) in axes_dims.iter().enumerate() {
            let position = f64::from(id[axis]);
            for j in 0..dim / 2 {
                let exponent = (2 * j) as f64 / dim as f64;
                let frequency = 1.0 / theta.powf(exponent);
                let angle = position * frequency;
                let (s, c) = (angle.sin() as f32, angle.cos() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    let shape = (ids.len(), head_dim);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// Applies the rotary embedding to `xs` (batch, heads, tokens, head_dim): each pair
/// `(a, b)` of the last axis becomes `(a cos - b sin, b cos + a sin)`, in f32, returned in
/// `xs`'s dtype.
pub fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = xs.dims4()?;
    let x = xs.to_dtype(DType::F32)?;
    let pairs = x.reshape((batch, heads, tokens, head_dim / 2, 2))?;
    let real = pairs.narrow(4, 0, 1)?;
    let imaginary = pairs.narrow(4, 1, 1)?;
    let rotated =
        Tensor::cat(&[&imaginary.neg()?, &real], 4)?.reshape((batch, heads, tokens, head_dim))?;
    let out = (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    out.to_dtype(xs.dtype())
}

/// Layer norm over the last axis with no learned scale or shift, computed in f32.
pub fn layer_norm(xs: &Tensor) -> Result<Tensor> {
    let x = xs.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(variance + NORM_EPS)?.sqrt()?)?;
    normed.to_dtype(xs.dtype())
}

/// `layer_norm(x) * (1 + scale) + shift`, with `scale` and `shift` (batch, dim) broadcast
/// over the tokens of each row.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let normed = layer_norm(xs)?;
    normed
        .broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// diffusers' `RMSNorm` with a weight: `x / sqrt(mean(x²) + eps) * weight`, the mean in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = xs.to_dtype(DType::F32)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + NORM_EPS)?.sqrt()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// The conditioning vector through SiLU and one linear layer, split in `parts` chunks of
/// the model width: the shifts, scales and gates of `AdaLayerNormZero` (6),
/// `AdaLayerNormZeroSingle` (3) and `AdaLayerNormContinuous` (2).
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    parts: usize,
}

impl Modulation {
    pub fn load(vb: VarBuilder, dim: usize, parts: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::load(vb.pp("linear"), dim, parts * dim, true)?,
            parts,
        })
    }

    pub fn forward(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        let emb = self.linear.forward(&candle_nn::ops::silu(temb)?)?;
        emb.chunk(self.parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Angles for an id on each axis, with each angle twice: a (1, 4) rope over axes of 2
    /// and 2 for id [0, 3, 5] has angles 0, 0 (axis 0) then 3, 3 (axis 1, frequency 1) then
    /// 5, 5 (axis 2); the frequency of pair j is theta^(-2j/dim).
    #[test]
    fn rotary_angles_follow_each_axis_id_in_interleaved_pairs() {
        let (cos, sin) =
            rotary_embedding(&[[0.0, 3.0, 5.0]], &[2, 2, 2], &Device::Cpu).expect("rope");
        let cos = cos
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("cos");
        let sin = sin
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("sin");
        let want = [0.0f64, 0.0, 3.0, 3.0, 5.0, 5.0];
        for (i, angle) in want.iter().enumerate() {
            assert_eq!(cos[i], angle.cos() as f32);
            assert_eq!(sin[i], angle.sin() as f32);
        }
    }

    #[test]
    fn rotation_turns_each_pair_by_its_angle() {
        let device = Device::Cpu;
        let xs = Tensor::new(&[1.0f32, 0.0, 0.0, 2.0], &device)
            .and_then(|t| t.reshape((1, 1, 1, 4)))
            .expect("xs");
        let angle = std::f32::consts::FRAC_PI_2;
        let cos = Tensor::new(&[[angle.cos(), angle.cos(), 1.0, 1.0]], &device).expect("cos");
        let sin = Tensor::new(&[[angle.sin(), angle.sin(), 0.0, 0.0]], &device).expect("sin");
        let out = apply_rotary(&xs, &cos, &sin)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("rotated");
        // (1, 0) turned by 90° is (0, 1); (0, 2) by 0° stays.
        let want = [0.0f32, 1.0, 0.0, 2.0];
        for (got, want) in out.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn bfloat16_rounds_the_timestep_before_it_is_scaled() {
        assert_eq!(in_dtype(0.8272287, DType::F32), 0.8272287);
        assert_eq!(in_dtype(0.8272287, DType::BF16), 0.828125);
    }
}
