//! diffusers' `Transformer2DModel` as SD 1.x/2.x use it: the feature map, group-normed and
//! projected, becomes a sequence of `height × width` tokens that goes through
//! `BasicTransformerBlock`s (self-attention, cross-attention on the text encoder's hidden
//! states, a GEGLU feed-forward, each after a LayerNorm and with a residual), then is
//! projected back and added to the input.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::pipelines::ops::{self, Conv2d, GroupNorm, Linear};

/// diffusers' `BasicTransformerBlock` LayerNorm epsilon (its `norm_eps` default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// `Transformer2DModel`'s group norm epsilon.
const GROUP_NORM_EPS: f64 = 1e-6;
/// The feed-forward's hidden width, as a multiple of the model width.
const FEED_FORWARD_MULT: usize = 4;

/// Multi-head attention (diffusers' `Attention`): `to_q` on the input, `to_k` and `to_v`
/// on the context (the input itself for self-attention), softmax(q kᵀ / √head_dim) v per
/// head, then `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `dim` wide queries and output, `context_dim` wide keys and values.
    pub fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("attention: {heads} heads do not divide {dim} channels")
        }
        let head_dim = dim / heads;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), dim, dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `xs` (batch, tokens, dim) attending to `context` (batch, context_tokens,
    /// context_dim), or to itself when `context` is `None`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let query = self.split_heads(&self.to_q.forward(xs)?)?;
        let key = self.split_heads(&self.to_k.forward(context)?)?;
        let value = self.split_heads(&self.to_v.forward(context)?)?;
        let attended = ops::attention(&query, &key, &value, self.scale)?;
        self.to_out.forward(&self.merge_heads(&attended)?)
    }

    /// (batch, tokens, heads × head_dim) to (batch × heads, tokens, head_dim).
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, tokens, dim) = xs.dims3()?;
        xs.reshape((batch, tokens, self.heads, dim / self.heads))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * self.heads, tokens, dim / self.heads))
    }

    /// (batch × heads, tokens, head_dim) back to (batch, tokens, heads × head_dim).
    fn merge_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch_heads, tokens, head_dim) = xs.dims3()?;
        let batch = batch_heads / self.heads;
        xs.reshape((batch, self.heads, tokens, head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, tokens, self.heads * head_dim))
    }
}

/// The GEGLU feed-forward: `net.0.proj` to twice the hidden width, the first half times
/// the exact (erf) GELU of the second, then `net.2` back to the model width.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let hidden = dim * FEED_FORWARD_MULT;
        let net = vb.pp("net");
        Ok(Self {
            proj: Linear::load(net.pp("0").pp("proj"), dim, hidden * 2, true)?,
            out: Linear::load(net.pp("2"), hidden, dim, true)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&ops::geglu(&self.proj.forward(xs)?)?)
    }
}

/// LayerNorm → self-attention → LayerNorm → cross-attention → LayerNorm → feed-forward,
/// each with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::load(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    /// `xs` (batch, tokens, dim), `context` (batch, context_tokens, context_dim).
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `proj_in` and `proj_out`: 1x1 convolutions on the feature map (SD 1.x) or linear layers
/// on the tokens (`use_linear_projection`, SD 2.x).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        if use_linear {
            Ok(Self::Linear(Linear::load(vb, in_dim, out_dim, true)?))
        } else {
            Ok(Self::Conv(Conv2d::load(vb, in_dim, out_dim, 1, 1, 0)?))
        }
    }
}

/// Sizes of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    /// Number of `BasicTransformerBlock`s.
    pub layers: usize,
    pub groups: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn load(vb: VarBuilder, config: TransformerConfig) -> Result<Self> {
        let TransformerConfig {
            channels,
            heads,
            use_linear_projection,
            ..
        } = config;
        let blocks_vb = vb.pp("transformer_blocks");
        let transformer_blocks = (0..config.layers)
            .map(|index| {
                BasicTransformerBlock::load(
                    blocks_vb.pp(index),
                    channels,
                    config.cross_attention_dim,
                    heads,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), config.groups, channels, GROUP_NORM_EPS)?,
            proj_in: Projection::load(vb.pp("proj_in"), channels, channels, use_linear_projection)?,
            transformer_blocks,
            proj_out: Projection::load(
                vb.pp("proj_out"),
                channels,
                channels,
                use_linear_projection,
            )?,
        })
    }

    /// `xs` (batch, channels, h, w) conditioned on `context` (batch, tokens,
    /// cross_attention_dim); same shape out.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let projected = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens, height, width)?)?,
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)?, height, width)?,
        };
        debug_assert_eq!(projected.dims4()?, (batch, channels, height, width));
        projected + xs
    }
}

/// (batch, channels, h, w) to (batch, h × w, channels).
pub(crate) fn to_tokens(xs: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = xs.dims4()?;
    xs.reshape((batch, channels, height * width))?
        .transpose(1, 2)?
        .contiguous()
}

/// (batch, h × w, channels) to (batch, channels, h, w).
pub(crate) fn to_map(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (batch, _, channels) = xs.dims3()?;
    xs.transpose(1, 2)?
        .contiguous()?
        .reshape((batch, channels, height, width))
}
