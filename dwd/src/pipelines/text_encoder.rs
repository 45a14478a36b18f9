//! The CLIP text transformer that turns token ids into the hidden states a denoiser attends
//! to: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.
//!
//! [`TextEncoder::encode`] gives `last_hidden_state` (SD 1.x/2.x);
//! [`TextEncoder::encode_all`] also gives `hidden_states[-2]` (the second-to-last layer's
//! output, before the final norm, which SDXL and SD 3 use), the pooled output at each row's
//! first end-of-text token, and, for a model with a `text_projection`, its projected
//! `text_embeds`. Written on candle ops so that its sizes come from the checkpoint's
//! `config.json` and every activation CLIP checkpoints use is available: `quick_gelu`
//! (OpenAI CLIP) and exact erf `gelu` (OpenCLIP). Weights are read with or without the
//! `text_model.` key prefix.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, Linear, VarBuilder};

use super::lora::{adaptable_modules, AdaptableLinear, LoraModules};

use super::{load_component, ops, ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "text encoder";

/// The activation between the two MLP layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's (SD 1.x).
    QuickGelu,
    /// Exact GELU with erf (SD 2.x's OpenCLIP encoder).
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Sizes of the text transformer, from transformers' `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: HiddenActivation,
    /// The end-of-text token the pooled output is taken at; 2 means transformers' legacy
    /// rule (the row's highest id).
    pub eos_token_id: u32,
}

impl TextEncoderConfig {
    /// Reads `config.json` of a `CLIPTextModel` (or the `text_config` of a full CLIP model).
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        let config = match config.value("text_config") {
            Some(serde_json::Value::Object(text_config)) => ConfigJson {
                file: config.file().to_path_buf(),
                map: text_config.clone(),
            },
            _ => config,
        };
        let hidden_act = match config.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => HiddenActivation::QuickGelu,
            "gelu" => HiddenActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => HiddenActivation::GeluTanh,
            other => {
                return Err(PipelineError::unsupported(
                    "hidden_act",
                    other,
                    "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh",
                ))
            }
        };
        let parsed = Self {
            vocab_size: config.required_usize("vocab_size")?,
            hidden_size: config.required_usize("hidden_size")?,
            intermediate_size: config.required_usize("intermediate_size")?,
            num_attention_heads: config.required_usize("num_attention_heads")?,
            num_hidden_layers: config.required_usize("num_hidden_layers")?,
            max_position_embeddings: config.usize_or("max_position_embeddings", 77)?,
            layer_norm_eps: config.f64_or("layer_norm_eps", 1e-5)?,
            hidden_act,
            eos_token_id: config.usize_or("eos_token_id", 2)? as u32,
        };
        if parsed.hidden_size.checked_rem(parsed.num_attention_heads) != Some(0) {
            return Err(config.bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    parsed.num_attention_heads, parsed.hidden_size
                ),
            ));
        }
        Ok(parsed)
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    out_proj: AdaptableLinear,
    num_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, config: &TextEncoderConfig) -> candle_core::Result<Self> {
        let size = config.hidden_size;
        Ok(Self {
            q_proj: AdaptableLinear::load(size, size, vb.pp("q_proj"))?,
            k_proj: AdaptableLinear::load(size, size, vb.pp("k_proj"))?,
            v_proj: AdaptableLinear::load(size, size, vb.pp("v_proj"))?,
            out_proj: AdaptableLinear::load(size, size, vb.pp("out_proj"))?,
            num_heads: config.num_attention_heads,
            head_dim: size / config.num_attention_heads,
        })
    }

    /// Splits (batch, seq, hidden) into (batch, heads, seq, head_dim).
    fn split_heads(&self, xs: Tensor, batch: usize, seq: usize) -> candle_core::Result<Tensor> {
        xs.reshape((batch, seq, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, hidden) = xs.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let heads = |xs: Tensor| -> candle_core::Result<Tensor> {
            self.split_heads(xs, batch, seq)?
                .reshape((batch * self.num_heads, seq, self.head_dim))
        };
        let queries = heads(self.q_proj.forward(xs)?)?;
        let keys = heads(self.k_proj.forward(xs)?)?;
        let values = heads(self.v_proj.forward(xs)?)?;
        let attended = ops::masked_attention(&queries, &keys, &values, scale, causal_mask)?
            .reshape((batch, self.num_heads, seq, self.head_dim))?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        self.out_proj.forward(&attended)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
    activation: HiddenActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &TextEncoderConfig) -> candle_core::Result<Self> {
        let size = config.hidden_size;
        let eps = config.layer_norm_eps;
        Ok(Self {
            layer_norm1: layer_norm(size, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: layer_norm(size, eps, vb.pp("layer_norm2"))?,
            fc1: AdaptableLinear::load(size, config.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: AdaptableLinear::load(config.intermediate_size, size, vb.pp("mlp").pp("fc2"))?,
            activation: config.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attended)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let hidden = match self.activation {
            HiddenActivation::QuickGelu => {
                (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?
            }
            HiddenActivation::Gelu => hidden.gelu_erf()?,
            HiddenActivation::GeluTanh => hidden.gelu()?,
        };
        xs + self.fc2.forward(&hidden)?
    }
}

/// What a CLIP text encoder gives back; pipelines use different parts of it.
#[derive(Debug)]
pub struct ClipOutput {
    /// `last_hidden_state`: the last layer's output after the final layer norm.
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`: the second-to-last layer's output, without the final norm.
    pub penultimate: Tensor,
    /// `pooler_output`: `last_hidden_state` at each row's first end-of-text token.
    pub pooled: Tensor,
    /// `text_embeds`: `text_projection` of `pooled`, for a `CLIPTextModelWithProjection`.
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text transformer, with its text projection when the checkpoint has one.
#[derive(Debug)]
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: TextEncoderConfig,
    dtype: DType,
    device: Device,
    bytes: u64,
    /// Its weights' module names and shapes, which LoRAs are matched against.
    modules: Arc<LoraModules>,
}

impl TextEncoder {
    /// Loads `config.json` and `model.safetensors` from a `text_encoder` folder.
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
                TextEncoderConfig::load,
                Self::new,
            )
        });
        let (mut encoder, bytes) = loaded?;
        encoder.bytes = bytes;
        encoder.modules = Arc::new(modules);
        Ok(encoder)
    }

    /// Builds the encoder from weights named as transformers names them, with or without
    /// the `text_model.` prefix; a `text_projection` beside it is loaded too.
    pub fn new(vb: VarBuilder, config: TextEncoderConfig) -> candle_core::Result<Self> {
        let text_projection = match vb.get_unchecked("text_projection.weight") {
            Ok(weight) => Some(Linear::new(weight, None)),
            Err(_) => None,
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let size = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let token_embedding = embedding(config.vocab_size, size, embeddings.pp("token_embedding"))?;
        let position_embedding = embedding(
            config.max_position_embeddings,
            size,
            embeddings.pp("position_embedding"),
        )?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|index| EncoderLayer::new(layers_vb.pp(index), &config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(size, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            bytes: 0,
            modules: Arc::default(),
        })
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    /// The dtype its weights are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Its layers' module names and weight shapes (empty when built from a `VarBuilder`
    /// rather than loaded from files).
    pub fn lora_modules(&self) -> &LoraModules {
        &self.modules
    }

    /// Size of the weights in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The width of `text_embeds`, for an encoder with a `text_projection`.
    pub fn projection_dim(&self) -> Option<usize> {
        let projection = self.text_projection.as_ref()?;
        projection.weight().dim(0).ok()
    }

    /// Hidden states (batch, seq, hidden) for rows of token ids of equal length.
    pub fn encode(&self, token_ids: &[Vec<u32>]) -> Result<Tensor, PipelineError> {
        let ids = self.ids_tensor(token_ids)?;
        self.forward(&ids)
    }

    /// Every output diffusers' pipelines take from a CLIP encoder, for rows of token ids of
    /// equal length.
    pub fn encode_all(&self, token_ids: &[Vec<u32>]) -> Result<ClipOutput, PipelineError> {
        let ids = self.ids_tensor(token_ids)?;
        self.check_length(token_ids[0].len())?;
        let (penultimate, last) = self.hidden_states(&ids).in_component(COMPONENT)?;
        let last_hidden_state = self
            .final_layer_norm
            .forward(&last)
            .in_component(COMPONENT)?;
        let pooled = token_ids
            .iter()
            .enumerate()
            .map(|(row, ids)| last_hidden_state.get(row)?.get(self.pooled_position(ids)))
            .collect::<candle_core::Result<Vec<Tensor>>>()
            .and_then(|rows| Tensor::stack(&rows, 0))
            .in_component(COMPONENT)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled).in_component(COMPONENT)?),
            None => None,
        };
        Ok(ClipOutput {
            last_hidden_state,
            penultimate,
            pooled,
            text_embeds,
        })
    }

    /// Where a row's pooled output is taken: its first end-of-text token, or with the
    /// legacy id 2 its highest id (transformers' `CLIPTextTransformer`).
    fn pooled_position(&self, row: &[u32]) -> usize {
        let eos = self.config.eos_token_id;
        let found = match eos {
            2 => row
                .iter()
                .enumerate()
                .max_by_key(|(i, id)| (**id, std::cmp::Reverse(*i)))
                .map(|(i, _)| i),
            _ => row.iter().position(|id| *id == eos),
        };
        found.unwrap_or(0)
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
        if let Some(id) = token_ids
            .iter()
            .flatten()
            .find(|id| **id as usize >= self.config.vocab_size)
        {
            return Err(PipelineError::invalid(
                "token ids",
                format!(
                    "id {id} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        let flat: Vec<u32> = token_ids.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (token_ids.len(), seq), &self.device).in_component(COMPONENT)
    }

    fn check_length(&self, seq: usize) -> Result<(), PipelineError> {
        if seq > self.config.max_position_embeddings {
            return Err(PipelineError::invalid(
                "token ids",
                format!(
                    "{seq} tokens exceed the {} positions of the text encoder",
                    self.config.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// Hidden states (batch, seq, hidden) for a (batch, seq) tensor of u32 token ids.
    pub fn forward(&self, token_ids: &Tensor) -> Result<Tensor, PipelineError> {
        let (_batch, seq) = token_ids.dims2().in_component(COMPONENT)?;
        self.check_length(seq)?;
        let (_, last) = self.hidden_states(token_ids).in_component(COMPONENT)?;
        self.final_layer_norm.forward(&last).in_component(COMPONENT)
    }

    /// The second-to-last and the last layer's outputs (`hidden_states[-2]` and
    /// `hidden_states[-1]`, the first of those being the embeddings for a one-layer model).
    fn hidden_states(&self, token_ids: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, seq) = token_ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, &self.device)?;
        let mut xs = self
            .token_embedding
            .forward(token_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, self.dtype, &self.device)?;
        let mut previous = xs.clone();
        for layer in &self.layers {
            previous = xs;
            xs = layer.forward(&previous, &mask)?;
        }
        Ok((previous, xs))
    }
}

/// (seq, seq) additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|row| (0..seq).map(move |col| if col > row { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_later_positions() {
        let mask = causal_mask(3, DType::F32, &Device::Cpu).unwrap();
        let rows = mask.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0][0], 0.0);
        assert!(rows[0][1].is_infinite());
        assert_eq!(rows[2][1], 0.0);
    }
}
