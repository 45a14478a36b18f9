//! CPU kernels for the operations a denoising step spends its time in, on plain f32 slices
//! in row-major (NCHW) order: 2-D convolution, group normalisation (optionally followed by
//! SiLU), scaled dot-product attention, linear layers and the GEGLU activation.
//!
//! They exist because the general-purpose versions cost more than the arithmetic: a
//! convolution that repacks its weights on every call, a group norm made of eight separate
//! passes, an attention that writes the whole (queries × keys) score matrix to memory, a bias
//! or a gate applied in passes of their own. Each
//! kernel here does its arithmetic in `gemm` (the matrix-product crate candle uses) and
//! its loops in `rayon`, and touches memory as few times as the operation allows.

#[macro_use]
mod simd;
mod attention;
mod conv;
mod geglu;
mod group_norm;
mod linear;
mod math;
mod matmul;

pub use attention::{attention, AttentionShape};
pub use conv::{conv2d, Conv2dShape};
pub use geglu::geglu;
pub use group_norm::{group_norm, GroupNormShape};
pub use linear::linear;
pub use math::{erf, exp, gelu_erf};

/// How many threads the kernels split their work over (rayon's pool).
fn threads() -> usize {
    rayon::current_num_threads()
}
