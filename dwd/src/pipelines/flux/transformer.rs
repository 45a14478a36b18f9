//! diffusers' `FluxTransformer2DModel`: the rectified-flow transformer of FLUX.1, loaded
//! from a diffusers folder under diffusers' weight names, every tensor accounted for
//! (a missing or left-over weight is an error naming it).
//!
//! It takes packed latents (batch, tokens, 64): each token a 2x2 patch of the 16-channel
//! latent image. The image tokens and the T5 tokens are embedded to the model width, run
//! through the double-stream blocks side by side and the single-stream blocks joined, and
//! the image tokens come out as the predicted velocity, packed like the input.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{DoubleStreamBlock, OutputLayer, Rotary, SingleStreamBlock};
use super::embeddings::{in_dtype, rotary_embedding, TimeTextEmbedding};
use crate::pipelines::lora::{adaptable_modules, LoraModules};
use crate::pipelines::ops::Linear;
use crate::pipelines::placement::{load_adaptable_host, BlockStream, HostWeights, Movable};
use crate::pipelines::strict::load_component_strict;
use crate::pipelines::{ConfigJson, InComponent, PipelineError};

const COMPONENT: &str = "transformer";

/// What the transformer needs from its `config.json`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev embeds the guidance scale; schnell has no guidance embedder.
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let config = ConfigJson::load(dir.join("config.json"))?;
        let patch_size = config.usize_or("patch_size", 1)?;
        if patch_size != 1 {
            return Err(PipelineError::unsupported(
                "patch_size",
                patch_size.to_string(),
                "1",
            ));
        }
        let in_channels = config.usize_or("in_channels", 64)?;
        let heads = config.usize_or("num_attention_heads", 24)?;
        let head_dim = config.usize_or("attention_head_dim", 128)?;
        let axes_dims_rope = match config.value("axes_dims_rope") {
            Some(_) => config.usize_list("axes_dims_rope")?,
            None => vec![16, 56, 56],
        };
        if axes_dims_rope.len() != 3 || axes_dims_rope.iter().sum::<usize>() != head_dim {
            return Err(config.bad(
                "axes_dims_rope",
                format!("{axes_dims_rope:?} must be three even sizes adding up to attention_head_dim {head_dim}"),
            ));
        }
        if axes_dims_rope.iter().any(|d| d % 2 != 0) || heads == 0 {
            return Err(config.bad("axes_dims_rope", "every axis needs an even size"));
        }
        Ok(Self {
            in_channels,
            out_channels: config.usize_or("out_channels", in_channels)?,
            num_layers: config.usize_or("num_layers", 19)?,
            num_single_layers: config.usize_or("num_single_layers", 38)?,
            attention_head_dim: head_dim,
            num_attention_heads: heads,
            joint_attention_dim: config.usize_or("joint_attention_dim", 4096)?,
            pooled_projection_dim: config.usize_or("pooled_projection_dim", 768)?,
            guidance_embeds: config.bool_or("guidance_embeds", false)?,
            axes_dims_rope,
        })
    }

    /// The model width.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// The inputs of one call, as the pipeline makes them.
pub struct FluxInputs<'a> {
    /// Packed latents (batch, image tokens, in_channels).
    pub hidden_states: &'a Tensor,
    /// T5's states (batch, text tokens, joint_attention_dim).
    pub encoder_hidden_states: &'a Tensor,
    /// CLIP's pooled output (batch, pooled_projection_dim).
    pub pooled_projections: &'a Tensor,
    /// The timestep divided by 1000, as the pipeline passes it.
    pub timestep: f32,
    /// The guidance scale, for a model with a guidance embedder.
    pub guidance: Option<f32>,
    /// Ids of the text tokens and of the image tokens (row, column in the packed grid).
    pub txt_ids: &'a [[f32; 3]],
    pub img_ids: &'a [[f32; 3]],
}

/// A loaded FLUX transformer.
#[derive(Debug)]
pub struct FluxTransformer {
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbedding,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    output: OutputLayer,
    config: FluxConfig,
    dtype: DType,
    device: Device,
    bytes: u64,
    /// Its weights' module names and shapes, which LoRAs are matched against.
    modules: Arc<LoraModules>,
    /// Under sequential offload: where each block is built from, on the device, as it runs
    /// (the block lists are then empty).
    stream: Option<BlockStream>,
}

impl FluxTransformer {
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
                FluxConfig::load,
                Self::new,
            )
        });
        let (mut model, bytes) = loaded?;
        model.bytes = bytes;
        model.modules = Arc::new(modules);
        Ok(model)
    }

    /// Loads it to the CPU for offload, keeping its tensors to build it on the device
    /// when it runs.
    pub fn load_host(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
    ) -> Result<HostWeights<Self>, PipelineError> {
        let (mut model, bytes, modules, tensors) = load_adaptable_host(
            dir,
            (variant, dtype),
            COMPONENT,
            FluxConfig::load,
            Self::new,
        )?;
        model.bytes = bytes;
        model.modules = Arc::new(modules);
        Ok(HostWeights::new(model, tensors))
    }

    /// Builds the model from weights under diffusers' names.
    pub fn new(vb: VarBuilder, config: FluxConfig) -> candle_core::Result<Self> {
        let double_blocks = (0..config.num_layers)
            .map(|i| double_block(&vb, &config, i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| single_block(&vb, &config, i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Self::with_blocks(vb, config, double_blocks, single_blocks)
    }

    /// The model around `double_blocks` and `single_blocks`: the embedders and the output
    /// layer built from `vb`.
    fn with_blocks(
        vb: VarBuilder,
        config: FluxConfig,
        double_blocks: Vec<DoubleStreamBlock>,
        single_blocks: Vec<SingleStreamBlock>,
    ) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        Ok(Self {
            x_embedder: Linear::load(vb.pp("x_embedder"), config.in_channels, dim, true)?,
            context_embedder: Linear::load(
                vb.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                true,
            )?,
            time_text_embed: TimeTextEmbedding::load(
                vb.pp("time_text_embed"),
                dim,
                config.pooled_projection_dim,
                config.guidance_embeds,
            )?,
            double_blocks,
            single_blocks,
            output: OutputLayer::load(&vb, dim, config.out_channels)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            bytes: 0,
            modules: Arc::default(),
            stream: None,
        })
    }

    /// Double block `i`: the model's own, or built on the device as it runs.
    fn double(&self, i: usize) -> candle_core::Result<Cow<'_, DoubleStreamBlock>> {
        match &self.stream {
            Some(stream) => double_block(&stream.vb, &self.config, i).map(Cow::Owned),
            None => Ok(Cow::Borrowed(&self.double_blocks[i])),
        }
    }

    /// Single block `i`: the model's own, or built on the device as it runs.
    fn single(&self, i: usize) -> candle_core::Result<Cow<'_, SingleStreamBlock>> {
        match &self.stream {
            Some(stream) => single_block(&stream.vb, &self.config, i).map(Cow::Owned),
            None => Ok(Cow::Borrowed(&self.single_blocks[i])),
        }
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Whether the model embeds the guidance scale (FLUX.1-dev does, schnell does not).
    pub fn has_guidance(&self) -> bool {
        self.time_text_embed.has_guidance()
    }

    /// Its layers' module names and weight shapes (empty when built from a `VarBuilder`
    /// rather than loaded from files).
    pub fn lora_modules(&self) -> &LoraModules {
        &self.modules
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The predicted velocity, packed (batch, image tokens, out_channels), in f32.
    pub fn forward(&self, inputs: &FluxInputs<'_>) -> Result<Tensor, PipelineError> {
        self.check(inputs)?;
        self.forward_model(inputs).in_component(COMPONENT)
    }

    fn forward_model(&self, inputs: &FluxInputs<'_>) -> candle_core::Result<Tensor> {
        let to_model = |xs: &Tensor| xs.to_device(&self.device)?.to_dtype(self.dtype);
        let batch = inputs.hidden_states.dim(0)?;
        let scaled = |value: f32| in_dtype(in_dtype(value, self.dtype) * 1000.0, self.dtype);
        let timestep = vec![scaled(inputs.timestep); batch];
        let guidance = inputs.guidance.map(|g| vec![scaled(g); batch]);
        let temb = self.time_text_embed.forward(
            &timestep,
            guidance.as_deref(),
            &to_model(inputs.pooled_projections)?,
        )?;
        let mut image = self.x_embedder.forward(&to_model(inputs.hidden_states)?)?;
        let mut text = self
            .context_embedder
            .forward(&to_model(inputs.encoder_hidden_states)?)?;
        let ids: Vec<[f32; 3]> = inputs
            .txt_ids
            .iter()
            .chain(inputs.img_ids)
            .copied()
            .collect();
        let (cos, sin) = rotary_embedding(&ids, &self.config.axes_dims_rope, &self.device)?;
        let rotary = Rotary {
            cos: &cos,
            sin: &sin,
        };
        for i in 0..self.config.num_layers {
            (text, image) = self.double(i)?.forward(&text, &image, &temb, &rotary)?;
        }
        let text_len = text.dim(1)?;
        let mut joined = Tensor::cat(&[text, image], 1)?;
        for i in 0..self.config.num_single_layers {
            joined = self.single(i)?.forward(&joined, &temb, &rotary)?;
        }
        let image_len = joined.dim(1)? - text_len;
        let image = joined.narrow(1, text_len, image_len)?;
        self.output.forward(&image, &temb)?.to_dtype(DType::F32)
    }

    /// Refuses inputs whose shapes disagree with the model or with each other.
    fn check(&self, inputs: &FluxInputs<'_>) -> Result<(), PipelineError> {
        let hidden = inputs.hidden_states.dims();
        let text = inputs.encoder_hidden_states.dims();
        let pooled = inputs.pooled_projections.dims();
        let config = &self.config;
        let expect = |ok: bool, name: &str, want: String, got: &[usize]| match ok {
            true => Ok(()),
            false => Err(PipelineError::invalid(
                name,
                format!("the transformer takes {want}, got {got:?}"),
            )),
        };
        expect(
            hidden.len() == 3
                && hidden[2] == config.in_channels
                && hidden[1] == inputs.img_ids.len(),
            "latents",
            format!(
                "[batch, {} image tokens, {}]",
                inputs.img_ids.len(),
                config.in_channels
            ),
            hidden,
        )?;
        expect(
            text.len() == 3
                && text[2] == config.joint_attention_dim
                && text[1] == inputs.txt_ids.len()
                && text[0] == hidden[0],
            "prompt_embeds",
            format!(
                "[{}, {} tokens, {}]",
                hidden[0],
                inputs.txt_ids.len(),
                config.joint_attention_dim
            ),
            text,
        )?;
        expect(
            pooled == [hidden[0], config.pooled_projection_dim],
            "pooled_prompt_embeds",
            format!("[{}, {}]", hidden[0], config.pooled_projection_dim),
            pooled,
        )
    }
}

/// Double block `i` from `vb`.
fn double_block(
    vb: &VarBuilder,
    config: &FluxConfig,
    i: usize,
) -> candle_core::Result<DoubleStreamBlock> {
    let (dim, heads) = (config.inner_dim(), config.num_attention_heads);
    DoubleStreamBlock::load(vb.pp("transformer_blocks").pp(i), dim, heads)
}

/// Single block `i` from `vb`.
fn single_block(
    vb: &VarBuilder,
    config: &FluxConfig,
    i: usize,
) -> candle_core::Result<SingleStreamBlock> {
    let (dim, heads) = (config.inner_dim(), config.num_attention_heads);
    SingleStreamBlock::load(vb.pp("single_transformer_blocks").pp(i), dim, heads)
}

impl Movable for FluxTransformer {
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
        let mut model = Self::with_blocks(vb.clone(), self.config.clone(), Vec::new(), Vec::new())?;
        model.bytes = self.bytes;
        model.modules = Arc::clone(&self.modules);
        model.stream = Some(BlockStream { vb });
        Ok(model)
    }

    fn weight_bytes(&self) -> u64 {
        self.bytes
    }
}
