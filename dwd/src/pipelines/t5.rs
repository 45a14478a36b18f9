//! The T5 encoder that turns token ids into the hidden states FLUX.1 (`text_encoder_2`)
//! and SD 3 (`text_encoder_3`) attend to: transformers' `T5EncoderModel`, T5 v1.1 as those
//! pipelines ship it.
//!
//! [`T5Encoder::encode`] gives `last_hidden_state`. What sets T5 apart from CLIP, all taken
//! from transformers' `modeling_t5.py`:
//! - no position embeddings: every layer adds to its attention scores a learned bias per
//!   head and relative-position bucket ([`relative_position_bucket`]), held by the first
//!   block and shared by all of them;
//! - no `1/sqrt(d)` scaling of the scores (the weights were trained with it folded in);
//! - RMS layer norms (no mean subtracted, no bias), their statistics in f32;
//! - a gated feed-forward, `wo(gelu_new(wi_0 x) * wi_1 x)`; `"gated-gelu"` always means
//!   the tanh GELU, whatever `dense_act_fn` says, as transformers reads it. T5 v1.0's plain
//!   `"relu"` feed-forward (`wo(relu(wi x))`) is read too; other kinds are refused;
//! - in float16 the hidden states are clamped below the type's maximum after each half of a
//!   block once they overflow, as transformers does.
//!
//! No attention mask is applied: FLUX and SD 3 call the encoder without one, so the padding
//! is attended to and its hidden states are part of the output. The inner width of the
//! attention (`num_heads * d_kv`) need not equal `d_model`. Weights are loaded strictly
//! (`strict.rs`): a tensor the model does not use is an error. The embedding is
//! `shared.weight` or `encoder.embed_tokens.weight` (tied copies; checkpoints hold either
//! or both).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::ops::{self, Linear};
use super::placement::{HostWeights, Movable};
use super::strict::{load_component_strict, load_component_strict_keeping};
use super::{ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "T5 text encoder";

/// The largest float16 value less the margin transformers clamps overflowing states to.
const F16_CLAMP: f64 = 65504.0 - 1000.0;

/// The feed-forward of each block, from `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardKind {
    /// `"gated-gelu"` (T5 v1.1, FLUX, SD 3): `wo(gelu_new(wi_0 x) * wi_1 x)`.
    GatedGelu,
    /// `"relu"` (T5 v1.0): `wo(relu(wi x))`.
    Relu,
}

/// Sizes of the encoder, from transformers' `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub layer_norm_epsilon: f64,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub feed_forward: FeedForwardKind,
}

impl T5Config {
    /// Reads `config.json` of a `T5EncoderModel`.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        let feed_forward = match config.str_or("feed_forward_proj", "relu")? {
            "gated-gelu" => FeedForwardKind::GatedGelu,
            "relu" => FeedForwardKind::Relu,
            other => {
                return Err(PipelineError::unsupported(
                    "feed_forward_proj",
                    other,
                    "gated-gelu, relu",
                ))
            }
        };
        let positive = |key: &str| match config.required_usize(key)? {
            0 => Err(config.bad(key, "must be at least 1")),
            value => Ok(value),
        };
        let parsed = Self {
            vocab_size: positive("vocab_size")?,
            d_model: positive("d_model")?,
            d_kv: positive("d_kv")?,
            d_ff: positive("d_ff")?,
            num_heads: positive("num_heads")?,
            num_layers: positive("num_layers")?,
            layer_norm_epsilon: config.f64_or("layer_norm_epsilon", 1e-6)?,
            relative_attention_num_buckets: config
                .usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: config
                .usize_or("relative_attention_max_distance", 128)?,
            feed_forward,
        };
        if parsed.relative_attention_num_buckets < 4 {
            return Err(config.bad(
                "relative_attention_num_buckets",
                "needs at least 4 (two exact buckets each way)",
            ));
        }
        Ok(parsed)
    }

    /// The width of the attention's queries, keys and values: `num_heads * d_kv`.
    fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// The bucket of a relative position (`key_position - query_position`) in a bidirectional
/// encoder: transformers' `T5Attention._relative_position_bucket(bidirectional=True)`.
///
/// Half the buckets are for keys after the query, half for the others; within each half,
/// distances below a quarter of the buckets have one bucket each and the rest share
/// log-spaced buckets up to `max_distance`, beyond which all fall in the last. The
/// logarithm is taken in f32, as PyTorch takes it.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let offset = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs();
    let max_exact = half / 2;
    if distance < max_exact as u64 {
        return offset + distance as usize;
    }
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let scaled = (distance as f32 / max_exact as f32).ln() / log_range
        * half.saturating_sub(max_exact) as f32;
    // `as` truncates toward zero and saturates, as `.to(torch.long)` does for these values.
    let large = max_exact.saturating_add(scaled as usize);
    offset + large.min(half.saturating_sub(1))
}

/// T5's layer norm: `weight * x / sqrt(mean(x²) + eps)`, the statistics in f32 and the
/// normalised states back in the weight's type before the scale, as transformers computes
/// it.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs32 = xs.to_dtype(DType::F32)?;
        let variance = xs32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = xs32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

#[derive(Debug)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &T5Config) -> candle_core::Result<Self> {
        let (model, inner) = (config.d_model, config.inner_dim());
        Ok(Self {
            q: Linear::load(vb.pp("q"), model, inner, false)?,
            k: Linear::load(vb.pp("k"), model, inner, false)?,
            v: Linear::load(vb.pp("v"), model, inner, false)?,
            o: Linear::load(vb.pp("o"), inner, model, false)?,
            num_heads: config.num_heads,
            d_kv: config.d_kv,
        })
    }

    /// (batch, seq, d_model) to (batch, seq, d_model); `bias` is the position bias as
    /// (batch * heads, seq, seq).
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, _) = xs.dims3()?;
        let heads = |projected: Tensor| -> candle_core::Result<Tensor> {
            projected
                .reshape((batch, seq, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .reshape((batch * self.num_heads, seq, self.d_kv))
        };
        let queries = heads(self.q.forward(xs)?)?;
        let keys = heads(self.k.forward(xs)?)?;
        let values = heads(self.v.forward(xs)?)?;
        let attended = ops::masked_attention(&queries, &keys, &values, 1.0, bias)?
            .reshape((batch, self.num_heads, seq, self.d_kv))?
            .transpose(1, 2)?
            .reshape((batch, seq, self.num_heads * self.d_kv))?;
        self.o.forward(&attended)
    }
}

#[derive(Debug)]
enum FeedForward {
    Gated { wi_0: Linear, wi_1: Linear },
    Plain { wi: Linear },
}

#[derive(Debug)]
struct DenseFeedForward {
    inner: FeedForward,
    wo: Linear,
}

impl DenseFeedForward {
    fn new(vb: VarBuilder, config: &T5Config) -> candle_core::Result<Self> {
        let (model, ff) = (config.d_model, config.d_ff);
        let inner = match config.feed_forward {
            FeedForwardKind::GatedGelu => FeedForward::Gated {
                wi_0: Linear::load(vb.pp("wi_0"), model, ff, false)?,
                wi_1: Linear::load(vb.pp("wi_1"), model, ff, false)?,
            },
            FeedForwardKind::Relu => FeedForward::Plain {
                wi: Linear::load(vb.pp("wi"), model, ff, false)?,
            },
        };
        Ok(Self {
            inner,
            wo: Linear::load(vb.pp("wo"), ff, model, false)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = match &self.inner {
            FeedForward::Gated { wi_0, wi_1 } => (wi_0.forward(xs)?.gelu()? * wi_1.forward(xs)?)?,
            FeedForward::Plain { wi } => wi.forward(xs)?.relu()?,
        };
        self.wo.forward(&hidden)
    }
}

/// One encoder block: self-attention then feed-forward, each after its own norm and added
/// to the residual stream.
#[derive(Debug)]
struct Block {
    attention_norm: RmsNorm,
    attention: SelfAttention,
    feed_forward_norm: RmsNorm,
    feed_forward: DenseFeedForward,
}

impl Block {
    fn new(vb: VarBuilder, config: &T5Config) -> candle_core::Result<Self> {
        let (attention, feed_forward) = (vb.pp("layer").pp(0), vb.pp("layer").pp(1));
        let (size, eps) = (config.d_model, config.layer_norm_epsilon);
        Ok(Self {
            attention_norm: RmsNorm::new(attention.pp("layer_norm"), size, eps)?,
            attention: SelfAttention::new(attention.pp("SelfAttention"), config)?,
            feed_forward_norm: RmsNorm::new(feed_forward.pp("layer_norm"), size, eps)?,
            feed_forward: DenseFeedForward::new(feed_forward.pp("DenseReluDense"), config)?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self
            .attention
            .forward(&self.attention_norm.forward(xs)?, bias)?;
        let xs = clamp_overflow((xs + attended)?)?;
        let fed = self
            .feed_forward
            .forward(&self.feed_forward_norm.forward(&xs)?)?;
        clamp_overflow((xs + fed)?)
    }
}

/// transformers' float16 guard: once any hidden state is infinite, all are clamped to
/// ±(65504 - 1000). Other types pass through.
fn clamp_overflow(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    let largest = xs
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    match largest.is_infinite() {
        true => xs.clamp(-F16_CLAMP, F16_CLAMP),
        false => Ok(xs),
    }
}

/// transformers' `T5EncoderModel`.
#[derive(Debug)]
pub struct T5Encoder {
    embedding: Embedding,
    /// (num_buckets, num_heads), from the first block.
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: RmsNorm,
    config: T5Config,
    dtype: DType,
    device: Device,
    bytes: u64,
}

impl T5Encoder {
    /// Loads `config.json` and the weights from a `text_encoder_2` (or `_3`) folder.
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
        let (mut encoder, bytes) = load_component_strict(
            dir,
            (variant, dtype, device),
            COMPONENT,
            T5Config::load,
            Self::new,
        )?;
        encoder.bytes = bytes;
        Ok(encoder)
    }

    /// Loads it to the CPU for offload, keeping its tensors to build it on the device
    /// when it runs.
    pub fn load_host(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
    ) -> Result<HostWeights<Self>, PipelineError> {
        let (mut encoder, bytes, tensors) = load_component_strict_keeping(
            dir,
            (variant, dtype, &Device::Cpu),
            COMPONENT,
            T5Config::load,
            Self::new,
        )?;
        encoder.bytes = bytes;
        Ok(HostWeights::new(encoder, tensors))
    }

    /// Builds the encoder from weights named as transformers names them.
    pub fn new(vb: VarBuilder, config: T5Config) -> candle_core::Result<Self> {
        let embedding = Embedding::new(tied_embedding(&vb, &config)?, config.d_model);
        let blocks_vb = vb.pp("encoder").pp("block");
        let relative_attention_bias = blocks_vb
            .pp(0)
            .pp("layer")
            .pp(0)
            .pp("SelfAttention")
            .pp("relative_attention_bias")
            .get(
                (config.relative_attention_num_buckets, config.num_heads),
                "weight",
            )?;
        let blocks = (0..config.num_layers)
            .map(|index| Block::new(blocks_vb.pp(index), &config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = RmsNorm::new(
            vb.pp("encoder").pp("final_layer_norm"),
            config.d_model,
            config.layer_norm_epsilon,
        )?;
        Ok(Self {
            embedding,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            bytes: 0,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Width of the hidden states.
    pub fn d_model(&self) -> usize {
        self.config.d_model
    }

    /// Size of the weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The type the weights and the output are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `last_hidden_state` (batch, seq, d_model) for rows of token ids of equal length,
    /// every position attended (no mask).
    pub fn encode(&self, token_ids: &[Vec<u32>]) -> Result<Tensor, PipelineError> {
        let ids = self.ids_tensor(token_ids)?;
        self.forward(&ids).in_component(COMPONENT)
    }

    /// `last_hidden_state` for a (batch, seq) tensor of u32 token ids.
    fn forward(&self, token_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq) = token_ids.dims2()?;
        let bias = self.position_bias(batch, seq)?;
        let mut xs = self.embedding.forward(token_ids)?;
        for block in &self.blocks {
            xs = block.forward(&xs, &bias)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// The learned bias of each head for each (query, key) pair, as (batch * heads, seq,
    /// seq): transformers' `compute_bias`, repeated over the batch.
    fn position_bias(&self, batch: usize, seq: usize) -> candle_core::Result<Tensor> {
        let (buckets, max_distance) = (
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        let seq_i64 = seq as i64;
        let indices: Vec<u32> = (0..seq_i64)
            .flat_map(|query| {
                (0..seq_i64).map(move |key| {
                    relative_position_bucket(key - query, buckets, max_distance) as u32
                })
            })
            .collect();
        let indices = Tensor::from_vec(indices, seq * seq, &self.device)?;
        let heads = self.config.num_heads;
        self.relative_attention_bias
            .index_select(&indices, 0)?
            .reshape((seq, seq, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .broadcast_as((batch, heads, seq, seq))?
            .reshape((batch * heads, seq, seq))
    }

    /// The rows as a (batch, seq) tensor, once every id is in the vocabulary.
    fn ids_tensor(&self, token_ids: &[Vec<u32>]) -> Result<Tensor, PipelineError> {
        let seq = token_ids.first().map_or(0, Vec::len);
        if seq == 0 || token_ids.iter().any(|row| row.len() != seq) {
            return Err(PipelineError::invalid(
                "token ids",
                "rows must be non-empty and of equal length",
            ));
        }
        let vocab = self.config.vocab_size;
        if let Some(id) = token_ids.iter().flatten().find(|id| **id as usize >= vocab) {
            return Err(PipelineError::invalid(
                "token ids",
                format!("id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        let flat: Vec<u32> = token_ids.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (token_ids.len(), seq), &self.device).in_component(COMPONENT)
    }
}

/// The token embedding: `shared.weight`, else `encoder.embed_tokens.weight`. When a
/// checkpoint holds both (the tied copies transformers may write), the second is taken
/// too, so the strict loader counts it as used.
fn tied_embedding(vb: &VarBuilder, config: &T5Config) -> candle_core::Result<Tensor> {
    let shape = (config.vocab_size, config.d_model);
    let encoder_copy = vb.pp("encoder").pp("embed_tokens");
    if !vb.contains_tensor("shared.weight") {
        return encoder_copy.get(shape, "weight");
    }
    if encoder_copy.contains_tensor("weight") {
        encoder_copy.get(shape, "weight")?;
    }
    vb.pp("shared").get(shape, "weight")
}

impl Movable for T5Encoder {
    fn rebuilt(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), self.dtype, device);
        let mut encoder = Self::new(vb, self.config.clone())?;
        encoder.bytes = self.bytes;
        Ok(encoder)
    }

    fn weight_bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets for 32 buckets up to distance 128, worked out by hand from transformers'
    /// formula: 16 per direction (keys after the query from 16), 8 exact, then
    /// `8 + int(ln(n / 8) / ln(16) * 8)`, at most 15.
    #[test]
    fn relative_positions_fall_in_the_buckets_transformers_gives() {
        let cases: [(i64, usize); 12] = [
            (-200, 15), // 8 + int(9.29) = 17, capped at 15
            (-20, 10),  // 8 + int(ln 2.5 / ln 16 * 8 = 2.64)
            (-3, 3),    // exact
            (0, 0),     // exact
            (1, 17),    // after the query: 16 + 1
            (5, 21),    // 16 + 5
            (15, 25),   // 16 + 8 + int(ln 1.875 / ln 16 * 8 = 1.81)
            (16, 26),   // 16 + 8 + int(0.25 * 8 = 2), exactly on a boundary
            (40, 28),   // 16 + 8 + int(ln 5 / ln 16 * 8 = 4.64)
            (127, 31),  // 16 + 8 + int(7.977)
            (128, 31),  // 16 + 8 + 8 = 32, capped at 31
            (500, 31),
        ];
        for (relative, expected) in cases {
            assert_eq!(
                relative_position_bucket(relative, 32, 128),
                expected,
                "relative position {relative}"
            );
        }
    }

    #[test]
    fn the_float16_guard_clamps_only_once_something_overflowed() {
        let device = Device::Cpu;
        let finite = Tensor::new(&[60000f32, -60000.0], &device)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("f16");
        let kept = clamp_overflow(finite.clone()).expect("kept");
        assert_eq!(
            kept.to_dtype(DType::F32)
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values"),
            [60000.0, -60000.0]
        );
        let overflowed = Tensor::new(&[f32::INFINITY, -70000.0, 1.0], &device)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("f16");
        let clamped = clamp_overflow(overflowed)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("clamped");
        assert!(clamped.iter().all(|v| v.abs() <= 64512.0), "{clamped:?}");
        assert_eq!(clamped[2], 1.0);
    }

    #[test]
    fn a_feed_forward_other_than_gated_gelu_or_relu_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let config = r#"{"d_model": 8, "d_kv": 4, "d_ff": 16, "num_heads": 2,
            "num_layers": 1, "vocab_size": 10, "feed_forward_proj": "gated-silu"}"#;
        std::fs::write(dir.path().join("config.json"), config).expect("written");
        let error = T5Config::load(dir.path()).expect_err("refused").to_string();
        assert!(error.contains("feed_forward_proj"), "{error}");
        assert!(error.contains("gated-silu"), "{error}");
    }
}
