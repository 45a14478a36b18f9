//! FLUX's two kinds of transformer block, as diffusers names and computes them.
//!
//! A double-stream block (`FluxTransformerBlock`) keeps the text and the image tokens
//! apart, each with its own projections, norms and feed-forward, and lets them meet only
//! in one joint attention over `cat(text, image)`. A single-stream block
//! (`FluxSingleTransformerBlock`) runs on the joined sequence: one projection feeds both
//! attention and a parallel MLP, and their outputs are projected together. Every block is
//! modulated (shift, scale, gate) by the conditioning vector.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::embeddings::{apply_rotary, layer_norm, modulate, Modulation, RmsNorm};
use crate::pipelines::ops::{self, Linear};

/// The width of the MLPs, as a multiple of the model's.
const MLP_RATIO: usize = 4;

/// The rotary embedding of the joined sequence, text first: (tokens, head_dim) each.
pub struct Rotary<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// Query, key and value projections of one stream, with RMS-normed queries and keys.
#[derive(Debug, Clone)]
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Qkv {
    /// `names`: the projections' and norms' names (`to_q`... or `add_q_proj`...).
    fn load(vb: &VarBuilder, names: [&str; 5], dim: usize, head_dim: usize) -> Result<Self> {
        Ok(Self {
            q: Linear::load(vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(vb.pp(names[2]), dim, dim, true)?,
            norm_q: RmsNorm::load(vb.pp(names[3]), head_dim)?,
            norm_k: RmsNorm::load(vb.pp(names[4]), head_dim)?,
        })
    }

    /// (batch, heads, tokens, head_dim) each.
    fn forward(&self, xs: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
        let (batch, tokens, dim) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, tokens, heads, dim / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self.norm_q.forward(&split(self.q.forward(xs)?)?)?;
        let k = self.norm_k.forward(&split(self.k.forward(xs)?)?)?;
        let v = split(self.v.forward(xs)?)?;
        Ok([q, k, v])
    }
}

/// Scaled dot-product attention over the joined sequence with the rotary embedding applied
/// to queries and keys; (batch, tokens, dim) out.
fn rotary_attention(qkv: [Tensor; 3], rotary: &Rotary<'_>) -> Result<Tensor> {
    let [q, k, v] = qkv;
    let (batch, heads, tokens, head_dim) = q.dims4()?;
    let flat = |t: Tensor| t.reshape((batch * heads, tokens, head_dim));
    let q = flat(apply_rotary(&q, rotary.cos, rotary.sin)?)?;
    let k = flat(apply_rotary(&k, rotary.cos, rotary.sin)?)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let attended = ops::attention(&q, &k, &flat(v)?, scale)?;
    attended
        .reshape((batch, heads, tokens, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, tokens, heads * head_dim))
}

/// Both streams' query, key and value joined along the tokens, text first.
fn joined(text: [Tensor; 3], image: [Tensor; 3]) -> Result<[Tensor; 3]> {
    let [tq, tk, tv] = text;
    let [iq, ik, iv] = image;
    Ok([
        Tensor::cat(&[tq, iq], 2)?,
        Tensor::cat(&[tk, ik], 2)?,
        Tensor::cat(&[tv, iv], 2)?,
    ])
}

/// `net.0.proj` → tanh GELU → `net.2` (diffusers' `FeedForward`, "gelu-approximate"); SD 3's
/// blocks use it too.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::load(vb.pp("net.0.proj"), dim, MLP_RATIO * dim, true)?,
            out: Linear::load(vb.pp("net.2"), MLP_RATIO * dim, dim, true)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(xs)?.gelu()?)
    }
}

/// One stream's half of a double-stream block.
#[derive(Debug, Clone)]
struct Stream {
    norm1: Modulation,
    qkv: Qkv,
    out: Linear,
    ff: FeedForward,
}

impl Stream {
    /// The stream's tokens after the attention's output and the feed-forward, given its
    /// modulation (shift, scale, gate for attention then for the MLP) and its part of the
    /// attention's output.
    fn finish(&self, xs: &Tensor, modulation: &[Tensor], attended: &Tensor) -> Result<Tensor> {
        let gate = |i: usize| modulation[i].unsqueeze(1);
        let xs = (xs + self.out.forward(attended)?.broadcast_mul(&gate(2)?)?)?;
        let normed = modulate(&xs, &modulation[3], &modulation[4])?;
        let ff = self.ff.forward(&normed)?;
        xs + ff.broadcast_mul(&gate(5)?)?
    }
}

/// `FluxTransformerBlock`: text and image tokens, each with its own weights, attending
/// jointly.
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    image: Stream,
    text: Stream,
    heads: usize,
}

impl DoubleStreamBlock {
    pub fn load(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let head_dim = dim / heads;
        let attn = vb.pp("attn");
        let image_names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        let text_names = [
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "norm_added_q",
            "norm_added_k",
        ];
        Ok(Self {
            image: Stream {
                norm1: Modulation::load(vb.pp("norm1"), dim, 6)?,
                qkv: Qkv::load(&attn, image_names, dim, head_dim)?,
                out: Linear::load(attn.pp("to_out.0"), dim, dim, true)?,
                ff: FeedForward::load(vb.pp("ff"), dim)?,
            },
            text: Stream {
                norm1: Modulation::load(vb.pp("norm1_context"), dim, 6)?,
                qkv: Qkv::load(&attn, text_names, dim, head_dim)?,
                out: Linear::load(attn.pp("to_add_out"), dim, dim, true)?,
                ff: FeedForward::load(vb.pp("ff_context"), dim)?,
            },
            heads,
        })
    }

    /// (text, image) tokens after the block.
    pub fn forward(
        &self,
        text: &Tensor,
        image: &Tensor,
        temb: &Tensor,
        rotary: &Rotary<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let image_mod = self.image.norm1.forward(temb)?;
        let text_mod = self.text.norm1.forward(temb)?;
        let image_in = modulate(image, &image_mod[0], &image_mod[1])?;
        let text_in = modulate(text, &text_mod[0], &text_mod[1])?;
        let qkv = joined(
            self.text.qkv.forward(&text_in, self.heads)?,
            self.image.qkv.forward(&image_in, self.heads)?,
        )?;
        let attended = rotary_attention(qkv, rotary)?;
        let text_len = text.dim(1)?;
        let image_len = image.dim(1)?;
        let text_attended = attended.narrow(1, 0, text_len)?;
        let image_attended = attended.narrow(1, text_len, image_len)?;
        let image = self.image.finish(image, &image_mod, &image_attended)?;
        let text = clamp_half(self.text.finish(text, &text_mod, &text_attended)?)?;
        Ok((text, image))
    }
}

/// `FluxSingleTransformerBlock`: the joined sequence through attention and a parallel MLP.
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    norm: Modulation,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleStreamBlock {
    pub fn load(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        Ok(Self {
            norm: Modulation::load(vb.pp("norm"), dim, 3)?,
            qkv: Qkv::load(&vb.pp("attn"), names, dim, dim / heads)?,
            proj_mlp: Linear::load(vb.pp("proj_mlp"), dim, MLP_RATIO * dim, true)?,
            proj_out: Linear::load(vb.pp("proj_out"), (1 + MLP_RATIO) * dim, dim, true)?,
            heads,
        })
    }

    /// The joined sequence (text first) after the block.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, rotary: &Rotary<'_>) -> Result<Tensor> {
        let modulation = self.norm.forward(temb)?;
        let normed = modulate(xs, &modulation[0], &modulation[1])?;
        let mlp = self.proj_mlp.forward(&normed)?.gelu()?;
        let attended = rotary_attention(self.qkv.forward(&normed, self.heads)?, rotary)?;
        let both = Tensor::cat(&[attended, mlp], D::Minus1)?;
        let out = self
            .proj_out
            .forward(&both)?
            .broadcast_mul(&modulation[2].unsqueeze(1)?)?;
        clamp_half((xs + out)?)
    }
}

/// `AdaLayerNormContinuous` then the output projection: note the order of its halves,
/// scale first, then shift. SD 3's output layer is the same.
#[derive(Debug, Clone)]
pub struct OutputLayer {
    norm_out: Modulation,
    proj_out: Linear,
}

impl OutputLayer {
    pub fn load(vb: &VarBuilder, dim: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            norm_out: Modulation::load(vb.pp("norm_out"), dim, 2)?,
            proj_out: Linear::load(vb.pp("proj_out"), dim, out_channels, true)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let normed = continuous_norm(&self.norm_out, xs, temb)?;
        self.proj_out.forward(&normed)
    }
}

/// `AdaLayerNormContinuous`: `layer_norm(x) * (1 + scale) + shift`, its modulation's halves
/// being scale, then shift.
pub fn continuous_norm(modulation: &Modulation, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
    let halves = modulation.forward(temb)?;
    let (scale, shift) = (&halves[0], &halves[1]);
    layer_norm(xs)?
        .broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// diffusers clips float16 hidden states to float16's range after each block.
pub fn clamp_half(xs: Tensor) -> Result<Tensor> {
    match xs.dtype() {
        candle_core::DType::F16 => xs.clamp(-65504f32, 65504f32),
        _ => Ok(xs),
    }
}
