//! diffusers' `SD3Transformer2DModel`, the MMDiT of Stable Diffusion 3 and 3.5, loaded from
//! a diffusers folder under diffusers' weight names, every tensor accounted for.
//!
//! The latents (batch, 16, h, w) are cut into 2x2 patches by a strided convolution, given
//! the stored position embedding centre-cropped to the patch grid, and run with the text
//! tokens through joint blocks: each stream has its own projections and feed-forward, both
//! attend together; the last block keeps only the image stream (`context_pre_only`). SD 3.5
//! adds RMS-normed queries and keys (`qk_norm: "rms_norm"`) and, in its first blocks, a
//! second image-only attention (`dual_attention_layers`). The output is the predicted
//! velocity, folded back from patches.
//!
//! The blocks' shared pieces (modulation, feed-forward, output layer, time embedding) are
//! FLUX's, which has the same ones.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::pipelines::flux::blocks::{clamp_half, continuous_norm, FeedForward, OutputLayer};
use crate::pipelines::flux::embeddings::{modulate, Modulation, RmsNorm, TimeTextEmbedding};
use crate::pipelines::lora::{adaptable_modules, LoraModules};
use crate::pipelines::ops::{self, Conv2d, Linear};
use crate::pipelines::placement::{load_adaptable_host, BlockStream, HostWeights, Movable};
use crate::pipelines::strict::load_component_strict;
use crate::pipelines::{ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "transformer";

/// What the transformer needs from its `config.json`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Sd3Config {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub pos_embed_max_size: usize,
    pub dual_attention_layers: Vec<usize>,
    /// `qk_norm: "rms_norm"` (SD 3.5); none in SD 3.
    pub qk_norm: bool,
}

impl Sd3Config {
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        config.require_one_of(
            "qk_norm",
            &[serde_json::json!("rms_norm")],
            "rms_norm or null",
        )?;
        let in_channels = config.usize_or("in_channels", 16)?;
        let heads = config.usize_or("num_attention_heads", 18)?;
        let head_dim = config.usize_or("attention_head_dim", 64)?;
        let caption = config.usize_or("caption_projection_dim", 1152)?;
        if caption != heads * head_dim {
            return Err(config.bad(
                "caption_projection_dim",
                format!("{caption} must equal the model width {heads} x {head_dim}: the text tokens join the image's"),
            ));
        }
        let dual = match config.value("dual_attention_layers") {
            Some(_) => config.usize_list("dual_attention_layers")?,
            None => Vec::new(),
        };
        Ok(Self {
            sample_size: config.usize_or("sample_size", 128)?,
            patch_size: config.usize_or("patch_size", 2)?,
            in_channels,
            out_channels: config.usize_or("out_channels", in_channels)?,
            num_layers: config.usize_or("num_layers", 18)?,
            attention_head_dim: head_dim,
            num_attention_heads: heads,
            joint_attention_dim: config.usize_or("joint_attention_dim", 4096)?,
            caption_projection_dim: caption,
            pooled_projection_dim: config.usize_or("pooled_projection_dim", 2048)?,
            pos_embed_max_size: config.usize_or("pos_embed_max_size", 96)?,
            dual_attention_layers: dual,
            qk_norm: config.value("qk_norm").is_some(),
        })
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// Query, key and value projections of one stream, RMS-normed under `qk_norm`.
#[derive(Debug, Clone)]
struct Projections {
    q: Linear,
    k: Linear,
    v: Linear,
    norms: Option<(RmsNorm, RmsNorm)>,
}

impl Projections {
    /// `names`: the three projections and the two norms.
    fn load(
        vb: &VarBuilder,
        names: [&str; 5],
        dim: usize,
        head_dim: usize,
        qk_norm: bool,
    ) -> candle_core::Result<Self> {
        let norms = match qk_norm {
            true => Some((
                RmsNorm::load(vb.pp(names[3]), head_dim)?,
                RmsNorm::load(vb.pp(names[4]), head_dim)?,
            )),
            false => None,
        };
        Ok(Self {
            q: Linear::load(vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(vb.pp(names[2]), dim, dim, true)?,
            norms,
        })
    }

    /// (batch * heads, tokens, head_dim) each.
    fn forward(&self, xs: &Tensor, heads: usize) -> candle_core::Result<[Tensor; 3]> {
        let (batch, tokens, dim) = xs.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, tokens, heads, dim / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (mut q, mut k) = (split(self.q.forward(xs)?)?, split(self.k.forward(xs)?)?);
        if let Some((norm_q, norm_k)) = &self.norms {
            (q, k) = (norm_q.forward(&q)?, norm_k.forward(&k)?);
        }
        let flat = |t: Tensor| t.reshape((batch * heads, tokens, dim / heads));
        Ok([flat(q)?, flat(k)?, flat(split(self.v.forward(xs)?)?)?])
    }
}

/// (batch * heads, tokens, head_dim) back to (batch, tokens, dim).
fn merge_heads(xs: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let (n, tokens, head_dim) = xs.dims3()?;
    let heads = n / batch;
    xs.reshape((batch, heads, tokens, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, tokens, heads * head_dim))
}

/// How a block's text stream ends: on through its own feed-forward, or (the last block)
/// only as keys and values for the image.
#[derive(Debug, Clone)]
enum TextStream {
    Full {
        norm1: Modulation,
        out: Linear,
        ff: FeedForward,
    },
    PreOnly {
        norm1: Modulation,
    },
}

/// `JointTransformerBlock`.
#[derive(Debug, Clone)]
struct JointBlock {
    norm1: Modulation,
    image: Projections,
    text: Projections,
    out: Linear,
    ff: FeedForward,
    text_stream: TextStream,
    /// SD 3.5's second, image-only attention, with its projections and output.
    dual: Option<(Projections, Linear)>,
    heads: usize,
}

impl JointBlock {
    fn load(
        vb: VarBuilder,
        config: &Sd3Config,
        pre_only: bool,
        dual: bool,
    ) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        let head_dim = config.attention_head_dim;
        let qk_norm = config.qk_norm;
        let attn = vb.pp("attn");
        let image_names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        let text_names = [
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "norm_added_q",
            "norm_added_k",
        ];
        let text_stream = match pre_only {
            true => TextStream::PreOnly {
                norm1: Modulation::load(vb.pp("norm1_context"), dim, 2)?,
            },
            false => TextStream::Full {
                norm1: Modulation::load(vb.pp("norm1_context"), dim, 6)?,
                out: Linear::load(attn.pp("to_add_out"), dim, dim, true)?,
                ff: FeedForward::load(vb.pp("ff_context"), dim)?,
            },
        };
        let dual = match dual {
            true => {
                let attn2 = vb.pp("attn2");
                Some((
                    Projections::load(&attn2, image_names, dim, head_dim, qk_norm)?,
                    Linear::load(attn2.pp("to_out.0"), dim, dim, true)?,
                ))
            }
            false => None,
        };
        Ok(Self {
            norm1: Modulation::load(vb.pp("norm1"), dim, if dual.is_some() { 9 } else { 6 })?,
            image: Projections::load(&attn, image_names, dim, head_dim, qk_norm)?,
            text: Projections::load(&attn, text_names, dim, head_dim, qk_norm)?,
            out: Linear::load(attn.pp("to_out.0"), dim, dim, true)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
            text_stream,
            dual,
            heads: config.num_attention_heads,
        })
    }

    /// (text, image) after the block; the text is `None` after the last one.
    fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        temb: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let image_source = image;
        let m = self.norm1.forward(temb)?;
        let image_in = modulate(image, &m[0], &m[1])?;
        let (text_in, text_mod) = match &self.text_stream {
            TextStream::PreOnly { norm1 } => (continuous_norm(norm1, text, temb)?, None),
            TextStream::Full { norm1, .. } => {
                let c = norm1.forward(temb)?;
                (modulate(text, &c[0], &c[1])?, Some(c))
            }
        };
        let batch = image.dim(0)?;
        let [iq, ik, iv] = self.image.forward(&image_in, self.heads)?;
        let [tq, tk, tv] = self.text.forward(&text_in, self.heads)?;
        // Image tokens first, as diffusers joins them.
        let joined = |a: Tensor, b: Tensor| Tensor::cat(&[a, b], 1);
        let (q, k, v) = (joined(iq, tq)?, joined(ik, tk)?, joined(iv, tv)?);
        let scale = 1.0 / ((q.dim(2)?) as f64).sqrt();
        let attended = merge_heads(&ops::attention(&q, &k, &v, scale)?, batch)?;
        let image_len = image.dim(1)?;
        let text_len = text.dim(1)?;
        let image_attended = attended.narrow(1, 0, image_len)?;
        let gate = |t: &Tensor| t.unsqueeze(1);
        let mut image = (image
            + self
                .out
                .forward(&image_attended)?
                .broadcast_mul(&gate(&m[2])?)?)?;
        if let Some((projections, out)) = &self.dual {
            // SD 3.5: the block's input, modulated by the last three chunks, attends to
            // itself; gated, it is added after the joint attention's output.
            let image_in2 = modulate(image_source, &m[6], &m[7])?;
            let [q, k, v] = projections.forward(&image_in2, self.heads)?;
            let attended2 = merge_heads(&ops::attention(&q, &k, &v, scale)?, batch)?;
            image = (&image + out.forward(&attended2)?.broadcast_mul(&gate(&m[8])?)?)?;
        }
        let normed = modulate(&image, &m[3], &m[4])?;
        image = (&image + self.ff.forward(&normed)?.broadcast_mul(&gate(&m[5])?)?)?;
        let text = match (&self.text_stream, text_mod) {
            (TextStream::Full { out, ff, .. }, Some(c)) => {
                let text_attended = attended.narrow(1, image_len, text_len)?;
                let text = (text + out.forward(&text_attended)?.broadcast_mul(&gate(&c[2])?)?)?;
                let normed = modulate(&text, &c[3], &c[4])?;
                Some(clamp_half(
                    (&text + ff.forward(&normed)?.broadcast_mul(&gate(&c[5])?)?)?,
                )?)
            }
            _ => None,
        };
        Ok((text, image))
    }
}

/// `PatchEmbed`: a strided convolution to patch tokens, plus the stored position
/// embedding's centre crop for the patch grid.
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
    /// (1, max * max, dim).
    pos_embed: Tensor,
    patch: usize,
    max_size: usize,
}

impl PatchEmbed {
    fn load(vb: VarBuilder, config: &Sd3Config) -> candle_core::Result<Self> {
        let (patch, max_size, dim) = (
            config.patch_size,
            config.pos_embed_max_size,
            config.inner_dim(),
        );
        Ok(Self {
            proj: Conv2d::load(vb.pp("proj"), config.in_channels, dim, patch, patch, 0)?,
            pos_embed: vb.get((1, max_size * max_size, dim), "pos_embed")?,
            patch,
            max_size,
        })
    }

    /// (batch, tokens, dim) for latents (batch, channels, h, w).
    fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let (rows, columns) = (h / self.patch, w / self.patch);
        let tokens = self
            .proj
            .forward(latents)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let dim = tokens.dim(2)?;
        let (top, left) = ((self.max_size - rows) / 2, (self.max_size - columns) / 2);
        let crop = self
            .pos_embed
            .reshape((1, self.max_size, self.max_size, dim))?
            .narrow(1, top, rows)?
            .narrow(2, left, columns)?
            .reshape((1, rows * columns, dim))?;
        tokens.broadcast_add(&crop.to_dtype(tokens.dtype())?)
    }
}

/// The inputs of one call, as the pipeline makes them.
pub struct Sd3Inputs<'a> {
    /// Latents (batch, in_channels, h, w).
    pub hidden_states: &'a Tensor,
    /// Text tokens (batch, tokens, joint_attention_dim).
    pub encoder_hidden_states: &'a Tensor,
    /// (batch, pooled_projection_dim).
    pub pooled_projections: &'a Tensor,
    /// One timestep per row, on the 0..1000 scale.
    pub timesteps: &'a [f32],
    /// Blocks to leave out (skip-layer guidance).
    pub skip_layers: &'a [usize],
}

/// A loaded SD 3 transformer.
#[derive(Debug)]
pub struct Sd3Transformer {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbedding,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    output: OutputLayer,
    config: Sd3Config,
    dtype: DType,
    device: Device,
    bytes: u64,
    /// The layers that take LoRA branches, with their weights' shapes.
    modules: Arc<LoraModules>,
    /// Under sequential offload: where each block is built from, on the device, as it runs
    /// (the block list is then empty).
    stream: Option<BlockStream>,
}

impl Sd3Transformer {
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
            load_component_strict(
                dir,
                (variant, dtype, device),
                COMPONENT,
                Sd3Config::load,
                Self::new,
            )
        });
        let (mut model, bytes) = loaded?;
        model.bytes = bytes;
        model.modules = Arc::new(modules);
        Ok(model)
    }

    /// Builds the model from weights under diffusers' names.
    pub fn new(vb: VarBuilder, config: Sd3Config) -> candle_core::Result<Self> {
        let blocks = (0..config.num_layers)
            .map(|i| joint_block(&vb, &config, i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Self::with_blocks(vb, config, blocks)
    }

    /// Loads it to the CPU for offload, keeping its tensors to build it on the device
    /// when it runs.
    pub fn load_host(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
    ) -> Result<HostWeights<Self>, PipelineError> {
        let (mut model, bytes, modules, tensors) =
            load_adaptable_host(dir, (variant, dtype), COMPONENT, Sd3Config::load, Self::new)?;
        model.bytes = bytes;
        model.modules = Arc::new(modules);
        Ok(HostWeights::new(model, tensors))
    }

    /// The model around `blocks`: the embedders and the output layer built from `vb`.
    fn with_blocks(
        vb: VarBuilder,
        config: Sd3Config,
        blocks: Vec<JointBlock>,
    ) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        let patch_out = config.patch_size * config.patch_size * config.out_channels;
        Ok(Self {
            pos_embed: PatchEmbed::load(vb.pp("pos_embed"), &config)?,
            time_text_embed: TimeTextEmbedding::load(
                vb.pp("time_text_embed"),
                dim,
                config.pooled_projection_dim,
                false,
            )?,
            context_embedder: Linear::load(
                vb.pp("context_embedder"),
                config.joint_attention_dim,
                config.caption_projection_dim,
                true,
            )?,
            blocks,
            output: OutputLayer::load(&vb, dim, patch_out)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            bytes: 0,
            modules: Arc::default(),
            stream: None,
        })
    }

    /// Block `i`: the model's own, or built on the device as it runs.
    fn block(&self, i: usize) -> candle_core::Result<Cow<'_, JointBlock>> {
        match &self.stream {
            Some(stream) => joint_block(&stream.vb, &self.config, i).map(Cow::Owned),
            None => Ok(Cow::Borrowed(&self.blocks[i])),
        }
    }

    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The layers a LoRA can adapt (every Linear and convolution), by diffusers' names.
    pub fn lora_modules(&self) -> &LoraModules {
        &self.modules
    }

    /// The predicted velocity (batch, out_channels, h, w), in f32.
    pub fn forward(&self, inputs: &Sd3Inputs<'_>) -> Result<Tensor, PipelineError> {
        self.check(inputs)?;
        self.forward_model(inputs).in_component(COMPONENT)
    }

    fn forward_model(&self, inputs: &Sd3Inputs<'_>) -> candle_core::Result<Tensor> {
        let to_model = |xs: &Tensor| xs.to_device(&self.device)?.to_dtype(self.dtype);
        let latents = to_model(inputs.hidden_states)?;
        let (batch, _, h, w) = latents.dims4()?;
        let mut image = self.pos_embed.forward(&latents)?;
        let temb = self.time_text_embed.forward(
            inputs.timesteps,
            None,
            &to_model(inputs.pooled_projections)?,
        )?;
        let mut text = self
            .context_embedder
            .forward(&to_model(inputs.encoder_hidden_states)?)?;
        for index in 0..self.config.num_layers {
            if inputs.skip_layers.contains(&index) {
                continue;
            }
            let (next_text, next_image) = self.block(index)?.forward(&image, &text, &temb)?;
            image = next_image;
            if let Some(next_text) = next_text {
                text = next_text;
            }
        }
        let patches = self.output.forward(&image, &temb)?;
        let p = self.config.patch_size;
        let c = self.config.out_channels;
        let (rows, columns) = (h / p, w / p);
        // "nhwpqc->nchpwq"
        patches
            .reshape((batch, rows, columns, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((batch, c, rows * p, columns * p))?
            .to_dtype(DType::F32)
    }

    /// Refuses inputs the model cannot take, naming what it takes.
    fn check(&self, inputs: &Sd3Inputs<'_>) -> Result<(), PipelineError> {
        let config = &self.config;
        let dims = inputs.hidden_states.dims();
        let limit = config.pos_embed_max_size * config.patch_size;
        let fits = dims.len() == 4
            && dims[1] == config.in_channels
            && dims[2].is_multiple_of(config.patch_size)
            && dims[3].is_multiple_of(config.patch_size)
            && dims[2] <= limit
            && dims[3] <= limit;
        if !fits {
            return Err(PipelineError::invalid(
                "latents",
                format!(
                    "the transformer takes [batch, {}, h, w] with h and w multiples of {} up to {limit} (its position embedding's size), got {dims:?}",
                    config.in_channels, config.patch_size
                ),
            ));
        }
        if inputs.timesteps.len() != dims[0] {
            return Err(PipelineError::invalid(
                "timestep",
                format!(
                    "{} values for a batch of {}",
                    inputs.timesteps.len(),
                    dims[0]
                ),
            ));
        }
        if let Some(layer) = inputs.skip_layers.iter().find(|l| **l >= config.num_layers) {
            return Err(PipelineError::invalid(
                "skip_guidance_layers",
                format!(
                    "layer {layer} is past the transformer's {} layers",
                    config.num_layers
                ),
            ));
        }
        Ok(())
    }
}

/// Joint block `i` from `vb`: the last keeps no text stream, those in
/// `dual_attention_layers` have a second attention.
fn joint_block(vb: &VarBuilder, config: &Sd3Config, i: usize) -> candle_core::Result<JointBlock> {
    let last = i + 1 == config.num_layers;
    let dual = config.dual_attention_layers.contains(&i);
    JointBlock::load(vb.pp("transformer_blocks").pp(i), config, last, dual)
}

impl Movable for Sd3Transformer {
    fn rebuilt(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), self.dtype, device);
        let mut model = Self::new(vb, self.config.clone())?;
        model.bytes = self.bytes;
        model.modules = Arc::clone(&self.modules);
        Ok(model)
    }

    /// The embedders and the output layer on `device`, each block built there only while it
    /// runs.
    fn streamed(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), self.dtype, device);
        let mut model = Self::with_blocks(vb.clone(), self.config.clone(), Vec::new())?;
        model.bytes = self.bytes;
        model.modules = Arc::clone(&self.modules);
        model.stream = Some(BlockStream { vb });
        Ok(model)
    }

    fn weight_bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    //! SD 3.5's additions to the joint block, `qk_norm: "rms_norm"` and
    //! `dual_attention_layers`, have no recorded fixture. This test writes diffusers'
    //! `JointTransformerBlock.forward` (with `SD35AdaLayerNormZeroX`,
    //! `JointAttnProcessor2_0` and, for `attn2`, `AttnProcessor2_0`) out of plain tensor
    //! operations, step by step as the Python reads, and holds the block to it.

    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, D};
    use candle_nn::VarBuilder;

    use super::{JointBlock, Sd3Config};

    const DIM: usize = 8;
    const HEADS: usize = 2;
    const HEAD_DIM: usize = 4;
    const EPS: f64 = 1e-6;

    /// Deterministic values in [-0.5, 0.5) (a 32-bit LCG), different for each `seed`.
    fn values(shape: &[usize], seed: u32) -> Tensor {
        let count: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let data: Vec<f32> = (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("values")
    }

    fn config() -> Sd3Config {
        Sd3Config {
            sample_size: 8,
            patch_size: 2,
            in_channels: 4,
            out_channels: 4,
            num_layers: 2,
            attention_head_dim: HEAD_DIM,
            num_attention_heads: HEADS,
            joint_attention_dim: DIM,
            caption_projection_dim: DIM,
            pooled_projection_dim: DIM,
            pos_embed_max_size: 4,
            dual_attention_layers: vec![0],
            qk_norm: true,
        }
    }

    /// Every weight of a block with both additions, under diffusers' names.
    fn weights() -> HashMap<String, Tensor> {
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("norm1.linear".into(), vec![9 * DIM, DIM]),
            ("norm1_context.linear".into(), vec![6 * DIM, DIM]),
            ("ff.net.0.proj".into(), vec![4 * DIM, DIM]),
            ("ff.net.2".into(), vec![DIM, 4 * DIM]),
            ("ff_context.net.0.proj".into(), vec![4 * DIM, DIM]),
            ("ff_context.net.2".into(), vec![DIM, 4 * DIM]),
            ("attn.to_add_out".into(), vec![DIM, DIM]),
        ];
        for name in [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
        ] {
            shapes.push((name.into(), vec![DIM, DIM]));
        }
        let mut weights = HashMap::new();
        for (seed, (name, shape)) in shapes.into_iter().enumerate() {
            let bias = values(&[shape[0]], 1000 + seed as u32);
            weights.insert(format!("{name}.weight"), values(&shape, seed as u32));
            weights.insert(format!("{name}.bias"), bias);
        }
        for (seed, name) in [
            "attn.norm_q",
            "attn.norm_k",
            "attn.norm_added_q",
            "attn.norm_added_k",
            "attn2.norm_q",
            "attn2.norm_k",
        ]
        .into_iter()
        .enumerate()
        {
            // Norm weights around 1, each different, so a swapped norm shows.
            let weight = (values(&[HEAD_DIM], 2000 + seed as u32) + 1.0).expect("norm weight");
            weights.insert(format!("{name}.weight"), weight);
        }
        weights
    }

    /// Straight from the Python, one operation at a time.
    struct Reference(HashMap<String, Tensor>);

    impl Reference {
        fn linear(&self, name: &str, x: &Tensor) -> Tensor {
            let w = &self.0[&format!("{name}.weight")];
            let b = &self.0[&format!("{name}.bias")];
            x.broadcast_matmul(&w.t().unwrap())
                .and_then(|y| y.broadcast_add(b))
                .expect("linear")
        }

        /// `nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)`.
        fn layer_norm(x: &Tensor) -> Tensor {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let centred = x.broadcast_sub(&mean).unwrap();
            let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            centred
                .broadcast_div(&(var + EPS).unwrap().sqrt().unwrap())
                .unwrap()
        }

        /// `x * (1 + scale[:, None]) + shift[:, None]`.
        fn affine(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
            x.broadcast_mul(&(scale + 1.0).unwrap().unsqueeze(1).unwrap())
                .and_then(|y| y.broadcast_add(&shift.unsqueeze(1)?))
                .unwrap()
        }

        /// `RMSNorm(head_dim, eps=1e-6)` on (batch, heads, tokens, head_dim).
        fn rms(&self, name: &str, x: &Tensor) -> Tensor {
            let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(var + EPS).unwrap().sqrt().unwrap())
                .and_then(|y| y.broadcast_mul(&self.0[&format!("{name}.weight")]))
                .unwrap()
        }

        /// `.view(batch, -1, heads, head_dim).transpose(1, 2)`.
        fn heads(x: &Tensor) -> Tensor {
            let (b, t, _) = x.dims3().unwrap();
            x.reshape((b, t, HEADS, HEAD_DIM))
                .and_then(|y| y.transpose(1, 2))
                .and_then(|y| y.contiguous())
                .unwrap()
        }

        /// `F.scaled_dot_product_attention`, then `.transpose(1, 2).reshape(b, -1, dim)`.
        fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (HEAD_DIM as f64).sqrt()).unwrap();
            let weights = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let out = weights.matmul(v).unwrap();
            let (b, _, t, _) = out.dims4().unwrap();
            out.transpose(1, 2)
                .and_then(|y| y.reshape((b, t, DIM)))
                .unwrap()
        }

        fn feed_forward(&self, name: &str, x: &Tensor) -> Tensor {
            let hidden = self
                .linear(&format!("{name}.net.0.proj"), x)
                .gelu()
                .unwrap();
            self.linear(&format!("{name}.net.2"), &hidden)
        }

        fn gated(gate: &Tensor, x: &Tensor) -> Tensor {
            x.broadcast_mul(&gate.unsqueeze(1).unwrap()).unwrap()
        }

        /// `JointTransformerBlock.forward` with `use_dual_attention` and `qk_norm`.
        fn block(&self, hidden: &Tensor, context: &Tensor, temb: &Tensor) -> (Tensor, Tensor) {
            // SD35AdaLayerNormZeroX
            let emb = self.linear("norm1.linear", &candle_nn::ops::silu(temb).unwrap());
            let c = emb.chunk(9, 1).unwrap();
            let (shift_msa, scale_msa, gate_msa) = (&c[0], &c[1], &c[2]);
            let (shift_mlp, scale_mlp, gate_mlp) = (&c[3], &c[4], &c[5]);
            let (shift_msa2, scale_msa2, gate_msa2) = (&c[6], &c[7], &c[8]);
            let normed = Self::layer_norm(hidden);
            let norm_hidden = Self::affine(&normed, shift_msa, scale_msa);
            let norm_hidden2 = Self::affine(&normed, shift_msa2, scale_msa2);
            // AdaLayerNormZero of the context
            let emb = self.linear("norm1_context.linear", &candle_nn::ops::silu(temb).unwrap());
            let e = emb.chunk(6, 1).unwrap();
            let norm_context = Self::affine(&Self::layer_norm(context), &e[0], &e[1]);
            // JointAttnProcessor2_0: image tokens first, then the context's.
            let q = self.rms(
                "attn.norm_q",
                &Self::heads(&self.linear("attn.to_q", &norm_hidden)),
            );
            let k = self.rms(
                "attn.norm_k",
                &Self::heads(&self.linear("attn.to_k", &norm_hidden)),
            );
            let v = Self::heads(&self.linear("attn.to_v", &norm_hidden));
            let cq = self.rms(
                "attn.norm_added_q",
                &Self::heads(&self.linear("attn.add_q_proj", &norm_context)),
            );
            let ck = self.rms(
                "attn.norm_added_k",
                &Self::heads(&self.linear("attn.add_k_proj", &norm_context)),
            );
            let cv = Self::heads(&self.linear("attn.add_v_proj", &norm_context));
            let cat = |a: Tensor, b: Tensor| Tensor::cat(&[a, b], 2).unwrap();
            let joint = Self::attend(&cat(q, cq), &cat(k, ck), &cat(v, cv));
            let image_len = hidden.dim(1).unwrap();
            let text_len = context.dim(1).unwrap();
            let attn_output = self.linear("attn.to_out.0", &joint.narrow(1, 0, image_len).unwrap());
            let context_attn_output = self.linear(
                "attn.to_add_out",
                &joint.narrow(1, image_len, text_len).unwrap(),
            );
            let mut hidden = (hidden + Self::gated(gate_msa, &attn_output)).unwrap();
            // attn2: AttnProcessor2_0 on norm_hidden_states2 alone.
            let q = self.rms(
                "attn2.norm_q",
                &Self::heads(&self.linear("attn2.to_q", &norm_hidden2)),
            );
            let k = self.rms(
                "attn2.norm_k",
                &Self::heads(&self.linear("attn2.to_k", &norm_hidden2)),
            );
            let v = Self::heads(&self.linear("attn2.to_v", &norm_hidden2));
            let attn_output2 = self.linear("attn2.to_out.0", &Self::attend(&q, &k, &v));
            hidden = (hidden + Self::gated(gate_msa2, &attn_output2)).unwrap();
            let norm_hidden = Self::affine(&Self::layer_norm(&hidden), shift_mlp, scale_mlp);
            hidden =
                (&hidden + Self::gated(gate_mlp, &self.feed_forward("ff", &norm_hidden))).unwrap();
            let context = (context + Self::gated(&e[2], &context_attn_output)).unwrap();
            let norm_context = Self::affine(&Self::layer_norm(&context), &e[3], &e[4]);
            let context_ff = self.feed_forward("ff_context", &norm_context);
            let context = (&context + Self::gated(&e[5], &context_ff)).unwrap();
            (context, hidden)
        }
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }

    #[test]
    fn a_dual_attention_block_with_rms_normed_queries_follows_diffusers_formulas() {
        let weights = weights();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let block = JointBlock::load(vb, &config(), false, true).expect("block");
        let hidden = values(&[2, 5, DIM], 7001);
        let context = values(&[2, 3, DIM], 7002);
        let temb = values(&[2, DIM], 7003);
        let (text, image) = block.forward(&hidden, &context, &temb).expect("forward");
        let (want_text, want_image) = Reference(weights).block(&hidden, &context, &temb);
        let image_error = max_difference(&image, &want_image);
        let text_error = max_difference(&text.expect("a full block keeps its text"), &want_text);
        assert!(image_error < 1e-5, "image stream off by {image_error}");
        assert!(text_error < 1e-5, "text stream off by {text_error}");
        let moved = max_difference(&image, &hidden);
        assert!(moved > 1e-2, "the block left the image as it was ({moved})");
    }
}
