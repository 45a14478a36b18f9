//! The operations a denoising step spends its time in: 2-D convolution, group
//! normalisation and attention, as layers the UNet and the VAE are built from.
//!
//! On the CPU in f32 each runs on the `kernels` crate (convolution as a column copy and one
//! matrix product written straight into the output, group norm in two passes with SiLU
//! fused, attention a block of queries at a time so the score matrix never exists whole).
//! Everywhere else, and as the reference the fast paths are tested against, they run on
//! candle's own operations.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::lora::{self, LayerKind};

/// A 2-D convolution with a square kernel, as diffusers' `nn.Conv2d` layers are.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// (out_channels, in_channels, kernel, kernel)
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Its module name (`up_blocks.0.attentions.1.proj_in`), for LoRA branches.
    module: Arc<str>,
}

impl Conv2d {
    /// Loads `weight` and `bias` from `vb`.
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let module = adaptable(&vb, &weight);
        Ok(Self {
            weight,
            bias,
            kernel,
            stride,
            padding,
            module,
        })
    }

    /// (batch, in_channels, height, width) to (batch, out_channels, height', width'), with
    /// the branches of any LoRA active on it.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match runs_on_kernels(xs) {
            true => self.forward_kernels(xs)?,
            false => self.forward_reference(xs)?,
        };
        let kind = LayerKind::Conv2d {
            stride: self.stride,
            padding: self.padding,
        };
        lora::add_branches(&self.module, kind, xs, ys)
    }

    /// candle's own convolution.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }

    fn forward_kernels(&self, xs: &Tensor) -> Result<Tensor> {
        let op = ConvOp {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight, &self.bias, &op)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, xs)
    }
}

/// The module name of a layer built from `vb` with `weight`, registered as one that
/// applies LoRA branches.
fn adaptable(vb: &VarBuilder, weight: &Tensor) -> Arc<str> {
    let module = vb.prefix();
    lora::register_adaptable(&module, weight.dims());
    module.into()
}

/// Group normalisation over (batch, channels, ...) with a per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` from `vb`.
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Self::new(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    /// A group norm with the given per-channel scale and shift.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        if groups == 0 || !channels.is_multiple_of(groups) || bias.elem_count() != channels {
            candle_core::bail!(
                "group norm: {groups} groups, {channels} scales and {} shifts do not fit",
                bias.elem_count()
            )
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The normalised input.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, false)
    }

    /// SiLU of the normalised input, in one pass: what every ResNet block does first.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, true)
    }

    fn forward_with(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if runs_on_kernels(xs) {
            let op = GroupNormOp {
                groups: self.groups,
                eps: self.eps as f32,
                silu,
            };
            return xs
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let ys = if xs.device().is_cpu() {
            self.forward_reference(xs)?
        } else {
            self.forward_fused(xs)?
        };
        if silu {
            candle_nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }

    /// Group norm as candle's fused layer norm over each (image, group) row, then the
    /// per-channel scale and shift: four passes over the tensor in its own type instead of
    /// about ten, half of them in f32, which is what it costs on a GPU. Statistics are
    /// accumulated in f32 by the kernel.
    pub fn forward_fused(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        if dims.len() < 2 {
            candle_core::bail!("group norm: expected (batch, channels, ...), got {dims:?}")
        }
        let (batch, channels) = (dims[0], dims[1]);
        let row = xs.elem_count() / (batch * self.groups).max(1);
        let grouped = xs.contiguous()?.reshape((batch, self.groups, row))?;
        let ones = Tensor::ones(row, xs.dtype(), xs.device())?;
        let zeros = Tensor::zeros(row, xs.dtype(), xs.device())?;
        let normed = candle_nn::ops::layer_norm(&grouped, &ones, &zeros, self.eps as f32)?
            .reshape(dims.as_slice())?;
        let mut per_channel = vec![1; dims.len()];
        per_channel[1] = channels;
        let weight = self
            .weight
            .to_dtype(xs.dtype())?
            .reshape(per_channel.as_slice())?;
        let bias = self
            .bias
            .to_dtype(xs.dtype())?
            .reshape(per_channel.as_slice())?;
        normed.broadcast_mul(&weight)?.broadcast_add(&bias)
    }

    /// candle's group norm (f32 statistics, as diffusers computes them).
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.groups,
            self.eps,
        )?
        .forward(xs)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        GroupNorm::forward(self, xs)
    }
}

/// A linear layer, `x · Wᵀ + b`, over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out_features, in_features), as PyTorch stores it.
    weight: Tensor,
    bias: Option<Tensor>,
    /// Its module name (`encoder.layers.0.self_attn.q_proj`), for LoRA branches.
    module: Arc<str>,
}

impl Linear {
    /// Loads `weight` and, when `with_bias`, `bias` from `vb`.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        let module = adaptable(&vb, &weight);
        Ok(Self {
            weight,
            bias,
            module,
        })
    }

    /// The layer, with the branches of any LoRA active on it.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match runs_on_kernels(xs) {
            true => {
                let xs = xs.contiguous()?;
                match &self.bias {
                    Some(bias) => xs.apply_op3_no_bwd(&self.weight, bias, &LinearOp)?,
                    None => xs.apply_op2_no_bwd(&self.weight, &LinearOp)?,
                }
            }
            false => self.forward_reference(xs)?,
        };
        lora::add_branches(&self.module, LayerKind::Linear, xs, ys)
    }

    /// candle-nn's linear layer.
    ///
    /// The input is made contiguous first: candle-nn 0.11's linear layer gives wrong rows
    /// for a transposed view with a batch larger than one.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(&xs.contiguous()?)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// diffusers' GEGLU activation: the last dimension split in two halves, the first times
/// the exact (erf) GELU of the second.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    if runs_on_kernels(xs) {
        return xs.contiguous()?.apply_op1_no_bwd(&GegluOp);
    }
    geglu_reference(xs)
}

/// GEGLU on candle's operations.
pub fn geglu_reference(xs: &Tensor) -> Result<Tensor> {
    let hidden = xs.dim(D::Minus1)? / 2;
    let values = xs.narrow(D::Minus1, 0, hidden)?;
    let gate = xs.narrow(D::Minus1, hidden, hidden)?;
    values * gate.gelu_erf()?
}

/// Scaled dot-product attention: softmax(q kᵀ · scale) v, computed in f32 whatever the
/// input type (as diffusers' attention processors do for half-precision inputs).
///
/// `query` is (n, query_len, head_dim), `key` and `value` (n, key_len, head_dim), where `n`
/// is batch × heads; the result is (n, query_len, head_dim) in the query's dtype.
pub fn attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Result<Tensor> {
    if runs_on_kernels(query) && key.dtype() == DType::F32 && value.dtype() == DType::F32 {
        let op = AttentionOp {
            scale: scale as f32,
        };
        return query
            .contiguous()?
            .apply_op3_no_bwd(&key.contiguous()?, &value.contiguous()?, &op);
    }
    attention_reference(query, key, value, scale)
}

/// Attention on candle's operations: the whole score matrix, then the fused softmax, then
/// the product with `value`. On a GPU it runs in the input's type, as diffusers' PyTorch
/// attention does for SD 1.x/2.x (cuBLAS and candle's softmax accumulate in f32); on the
/// CPU in f32. The query is scaled before the product, which is cheaper than scaling the
/// (query_len × key_len) scores and the same up to rounding.
pub fn attention_reference(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention_with(query, key, value, scale, None)
}

/// The whole-matrix attention, with an additive mask on the scores when one is given.
fn attention_with(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let in_dtype = query.dtype();
    let compute = if query.device().is_cpu() {
        DType::F32
    } else {
        in_dtype
    };
    let query = (query.to_dtype(compute)? * scale)?;
    let scores = query.matmul(&key.to_dtype(compute)?.t()?)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(&mask.to_dtype(compute)?)?,
        None => scores,
    };
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights
        .matmul(&value.to_dtype(compute)?)?
        .to_dtype(in_dtype)
}

/// [`attention`] with an additive `mask` on the scores (broadcast over (n, query_len,
/// key_len): `-inf` hides a key from a query, as CLIP's causal mask does). Computed as
/// [`attention_reference`] is.
pub fn masked_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    attention_with(query, key, value, scale, Some(mask))
}

/// Joint attention, as MMDiT blocks (SD 3, FLUX) attend: the context's and the image's
/// tokens are one sequence (context first), every token attending to all of them; the
/// result is split back into the context's part and the image's. Each of `context` and
/// `image` is (query, key, value), each (n, tokens, head_dim).
pub fn joint_attention(
    context: [&Tensor; 3],
    image: [&Tensor; 3],
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let context_len = context[0].dim(1)?;
    let joined = |i: usize| Tensor::cat(&[context[i], image[i]], 1);
    let attended = attention(&joined(0)?, &joined(1)?, &joined(2)?, scale)?;
    let total = attended.dim(1)?;
    Ok((
        attended.narrow(1, 0, context_len)?,
        attended.narrow(1, context_len, total - context_len)?,
    ))
}

/// Whether `xs` takes the `kernels` fast path: f32 on the CPU.
fn runs_on_kernels(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// The f32 elements of a contiguous CPU tensor, borrowed.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: expected f32 storage")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: not contiguous (the caller makes it so)"),
    }
}

/// A linear layer on the `kernels` crate: (input, weight) or (input, weight, bias).
struct LinearOp;

impl LinearOp {
    fn run(
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = input_layout.shape().dims();
        let (out_features, in_features) = weight_layout.shape().dims2()?;
        if dims.last() != Some(&in_features) {
            candle_core::bail!(
                "linear: input {:?} does not end in the weight's {in_features} features",
                input_layout.shape()
            )
        }
        let rows = input_layout.shape().elem_count() / in_features.max(1);
        let bias = match bias {
            Some((storage, layout)) => {
                if layout.shape().elem_count() != out_features {
                    candle_core::bail!("linear: bias {:?} for {out_features}", layout.shape())
                }
                Some(contiguous_f32(storage, layout, "linear bias")?)
            }
            None => None,
        };
        let output = kernels::linear(
            contiguous_f32(input, input_layout, "linear input")?,
            rows,
            in_features,
            contiguous_f32(weight, weight_layout, "linear weight")?,
            out_features,
            bias,
        );
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_features;
        }
        Ok((CpuStorage::F32(output), out_dims.into()))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "dw-linear"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(input, input_layout, weight, weight_layout, None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "dw-linear"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(
            input,
            input_layout,
            weight,
            weight_layout,
            Some((bias, bias_layout)),
        )
    }
}

/// GEGLU on the `kernels` crate.
struct GegluOp;

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "dw-geglu"
    }

    fn cpu_fwd(&self, input: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 || width == 0 {
            candle_core::bail!("geglu: the last dimension ({width}) must be even and non-zero")
        }
        let hidden = width / 2;
        let rows = layout.shape().elem_count() / width;
        let output = kernels::geglu(contiguous_f32(input, layout, "geglu input")?, rows, hidden);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = hidden;
        }
        Ok((CpuStorage::F32(output), out_dims.into()))
    }
}

/// Convolution on the `kernels` crate: (input, weight, bias).
struct ConvOp {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "dw-conv2d"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, in_channels, height, width) = input_layout.shape().dims4()?;
        let (out_channels, weight_in, kernel_h, kernel_w) = weight_layout.shape().dims4()?;
        if weight_in != in_channels || (kernel_h, kernel_w) != (self.kernel, self.kernel) {
            candle_core::bail!(
                "conv2d: input {:?} does not fit weight {:?}",
                input_layout.shape(),
                weight_layout.shape()
            )
        }
        if bias_layout.shape().elem_count() != out_channels {
            candle_core::bail!(
                "conv2d: bias {:?} for {out_channels} channels",
                bias_layout.shape()
            )
        }
        let shape = kernels::Conv2dShape {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        if shape.out_height() == 0 || shape.out_width() == 0 {
            candle_core::bail!("conv2d: input {height}x{width} is smaller than the kernel")
        }
        let output = kernels::conv2d(
            &shape,
            contiguous_f32(input, input_layout, "conv2d input")?,
            contiguous_f32(weight, weight_layout, "conv2d weight")?,
            contiguous_f32(bias, bias_layout, "conv2d bias")?,
        );
        let dims = (batch, out_channels, shape.out_height(), shape.out_width());
        Ok((CpuStorage::F32(output), dims.into()))
    }
}

/// Group norm on the `kernels` crate: (input, weight, bias).
struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "dw-group-norm"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = input_layout.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("group norm: expected (batch, channels, ...), got {dims:?}")
        }
        let (batch, channels) = (dims[0], dims[1]);
        if weight_layout.shape().elem_count() != channels
            || bias_layout.shape().elem_count() != channels
        {
            candle_core::bail!("group norm: scale and shift are not one per channel ({channels})")
        }
        let shape = kernels::GroupNormShape {
            batch,
            channels,
            spatial: dims[2..].iter().product(),
            groups: self.groups,
        };
        let output = kernels::group_norm(
            &shape,
            contiguous_f32(input, input_layout, "group norm input")?,
            contiguous_f32(weight, weight_layout, "group norm weight")?,
            contiguous_f32(bias, bias_layout, "group norm bias")?,
            self.eps,
            self.silu,
        );
        Ok((CpuStorage::F32(output), input_layout.shape().clone()))
    }
}

/// Attention on the `kernels` crate: (query, key, value).
struct AttentionOp {
    scale: f32,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "dw-attention"
    }

    fn cpu_fwd(
        &self,
        query: &CpuStorage,
        query_layout: &Layout,
        key: &CpuStorage,
        key_layout: &Layout,
        value: &CpuStorage,
        value_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (heads, query_len, head_dim) = query_layout.shape().dims3()?;
        let (key_heads, key_len, key_dim) = key_layout.shape().dims3()?;
        if (key_heads, key_dim) != (heads, head_dim)
            || value_layout.shape().dims3()? != (heads, key_len, head_dim)
        {
            candle_core::bail!(
                "attention: query {:?}, key {:?} and value {:?} do not match",
                query_layout.shape(),
                key_layout.shape(),
                value_layout.shape()
            )
        }
        let shape = kernels::AttentionShape {
            heads,
            query_len,
            key_len,
            head_dim,
        };
        let output = kernels::attention(
            &shape,
            contiguous_f32(query, query_layout, "attention query")?,
            contiguous_f32(key, key_layout, "attention key")?,
            contiguous_f32(value, value_layout, "attention value")?,
            self.scale,
        );
        Ok((CpuStorage::F32(output), query_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::test_support::{max_abs_diff, random};
    use candle_core::Device;

    fn var_builder(tensors: &[(&str, Tensor)]) -> VarBuilder<'static> {
        let map = tensors
            .iter()
            .map(|(name, t)| (name.to_string(), t.clone()))
            .collect();
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    }

    #[test]
    fn fast_convolution_matches_candles_for_each_layer_shape_of_a_unet() {
        // 3x3 same, 3x3 stride 2 (downsample), 1x1 (shortcut / projection).
        for (kernel, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
            let vb = var_builder(&[
                ("weight", random(&[6, 5, kernel, kernel], 1)),
                ("bias", random(&[6], 2)),
            ]);
            let conv = Conv2d::load(vb, 5, 6, kernel, stride, padding).expect("a conv");
            let xs = random(&[2, 5, 9, 7], 3);
            let fast = conv.forward(&xs).expect("fast");
            let reference = conv.forward_reference(&xs).expect("reference");
            assert!(
                max_abs_diff(&fast, &reference) < 1e-4,
                "kernel {kernel} stride {stride}"
            );
        }
    }

    #[test]
    fn a_non_contiguous_input_is_convolved_like_its_contiguous_copy() {
        let vb = var_builder(&[
            ("weight", random(&[3, 4, 3, 3], 1)),
            ("bias", random(&[3], 2)),
        ]);
        let conv = Conv2d::load(vb, 4, 3, 3, 1, 1).expect("a conv");
        let xs = random(&[1, 4, 6, 5], 3).transpose(2, 3).expect("a view");
        let fast = conv.forward(&xs).expect("fast");
        let reference = conv
            .forward_reference(&xs.contiguous().expect("a copy"))
            .expect("ref");
        assert!(max_abs_diff(&fast, &reference) < 1e-4);
    }

    #[test]
    fn fast_group_norm_and_its_fused_silu_match_candles() {
        let vb = var_builder(&[("weight", random(&[8], 1)), ("bias", random(&[8], 2))]);
        let norm = GroupNorm::load(vb, 4, 8, 1e-5).expect("a norm");
        let xs = random(&[2, 8, 5, 3], 3);
        let reference = norm.forward_reference(&xs).expect("reference");
        assert!(max_abs_diff(&norm.forward(&xs).expect("fast"), &reference) < 1e-5);
        let silu = candle_nn::ops::silu(&reference).expect("silu");
        assert!(max_abs_diff(&norm.forward_silu(&xs).expect("fused"), &silu) < 1e-5);
    }

    #[test]
    fn the_gpus_fused_group_norm_matches_candles() {
        // It runs on CUDA; candle's layer norm has a CPU version too, so it is checked here.
        let vb = var_builder(&[("weight", random(&[8], 1)), ("bias", random(&[8], 2))]);
        let norm = GroupNorm::load(vb, 4, 8, 1e-5).expect("a norm");
        let xs = (random(&[2, 8, 5, 3], 3) * 4.0).expect("scaled");
        let reference = norm.forward_reference(&xs).expect("reference");
        assert!(max_abs_diff(&norm.forward_fused(&xs).expect("fused"), &reference) < 1e-5);
    }

    #[test]
    fn blockwise_attention_matches_the_whole_score_matrix() {
        let q = random(&[4, 33, 8], 1);
        let k = random(&[4, 21, 8], 2);
        let v = random(&[4, 21, 8], 3);
        let scale = 1.0 / 8f64.sqrt();
        let fast = attention(&q, &k, &v, scale).expect("fast");
        let reference = attention_reference(&q, &k, &v, scale).expect("reference");
        assert!(max_abs_diff(&fast, &reference) < 1e-5);
    }

    #[test]
    fn a_zero_mask_changes_nothing_and_a_causal_mask_hides_later_keys() {
        let q = random(&[2, 5, 4], 1);
        let k = random(&[2, 5, 4], 2);
        let v = random(&[2, 5, 4], 3);
        let zeros = Tensor::zeros((5, 5), DType::F32, &Device::Cpu).expect("zeros");
        let plain = attention_reference(&q, &k, &v, 0.5).expect("plain");
        let masked = masked_attention(&q, &k, &v, 0.5, &zeros).expect("masked");
        assert!(max_abs_diff(&plain, &masked) < 1e-6);
        // With a causal mask the first query sees only the first key: its output is the
        // first value.
        let causal: Vec<f32> = (0..5)
            .flat_map(|r| (0..5).map(move |c| if c > r { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (5, 5), &Device::Cpu).expect("mask");
        let out = masked_attention(&q, &k, &v, 0.5, &causal).expect("causal");
        let first = out.narrow(1, 0, 1).expect("row");
        assert!(max_abs_diff(&first, &v.narrow(1, 0, 1).expect("value")) < 1e-6);
    }

    #[test]
    fn joint_attention_is_attention_over_both_sequences_split_back() {
        let (context, image) = (
            [
                random(&[3, 4, 8], 1),
                random(&[3, 4, 8], 2),
                random(&[3, 4, 8], 3),
            ],
            [
                random(&[3, 6, 8], 4),
                random(&[3, 6, 8], 5),
                random(&[3, 6, 8], 6),
            ],
        );
        let scale = 1.0 / 8f64.sqrt();
        let (text_out, image_out) = joint_attention(
            [&context[0], &context[1], &context[2]],
            [&image[0], &image[1], &image[2]],
            scale,
        )
        .expect("joint");
        assert_eq!(
            (text_out.dims(), image_out.dims()),
            (&[3, 4, 8][..], &[3, 6, 8][..])
        );
        let cat = |i: usize| Tensor::cat(&[&context[i], &image[i]], 1).expect("cat");
        let whole = attention_reference(&cat(0), &cat(1), &cat(2), scale).expect("whole");
        let joined = Tensor::cat(&[text_out, image_out], 1).expect("joined");
        assert!(max_abs_diff(&joined, &whole) < 1e-5);
    }

    #[test]
    fn fast_linear_layers_match_candles_with_and_without_bias() {
        let xs = random(&[2, 7, 5], 1);
        for with_bias in [true, false] {
            let vb = var_builder(&[("weight", random(&[3, 5], 2)), ("bias", random(&[3], 3))]);
            let linear = Linear::load(vb, 5, 3, with_bias).expect("a linear layer");
            let fast = linear.forward(&xs).expect("fast");
            let reference = linear.forward_reference(&xs).expect("reference");
            assert!(max_abs_diff(&fast, &reference) < 1e-5, "bias {with_bias}");
        }
    }

    #[test]
    fn a_transposed_batch_goes_through_a_linear_layer_like_its_contiguous_copy() {
        let vb = var_builder(&[("weight", random(&[3, 8], 2)), ("bias", random(&[3], 3))]);
        let linear = Linear::load(vb, 8, 3, true).expect("a linear layer");
        let view = random(&[2, 8, 15], 1)
            .transpose(1, 2)
            .expect("a (2, 15, 8) view");
        let copy = view.contiguous().expect("a copy");
        let expected = linear.forward(&copy).expect("contiguous");
        assert!(max_abs_diff(&linear.forward(&view).expect("fast"), &expected) < 1e-5);
        let reference = linear.forward_reference(&view).expect("reference");
        assert!(max_abs_diff(&reference, &expected) < 1e-5);
    }

    #[test]
    fn fast_geglu_matches_candles_exact_gelu() {
        let xs = (random(&[2, 3, 8], 1) * 3.0).expect("scaled");
        let fast = geglu(&xs).expect("fast");
        assert_eq!(fast.dims(), &[2, 3, 4]);
        assert!(max_abs_diff(&fast, &geglu_reference(&xs).expect("reference")) < 1e-5);
        assert!(
            geglu(&random(&[2, 3], 1)).is_err(),
            "an odd width has no halves"
        );
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let q = random(&[2, 3, 4], 1);
        let k = random(&[2, 5, 3], 2);
        assert!(attention(&q, &k, &k, 1.0).is_err());
        let vb = var_builder(&[
            ("weight", random(&[3, 4, 3, 3], 1)),
            ("bias", random(&[3], 2)),
        ]);
        let conv = Conv2d::load(vb, 4, 3, 3, 1, 1).expect("a conv");
        assert!(conv.forward(&random(&[1, 5, 6, 6], 3)).is_err());
        assert!(conv
            .forward(&random(&[1, 4, 2, 2], 3).narrow(2, 0, 0).expect("empty"))
            .is_err());
    }
}
