//! Pays a GPU's first-use costs when the device opens rather than in the first run.
//!
//! The first time a CUDA process uses an operation, the driver loads (and, the first time
//! on a machine, compiles) the module of kernels it belongs to, and cuBLAS sets up its
//! workspace: on an H100 that is about 160 MiB of device memory, held until the process
//! ends, and up to 20 s. Done here, before any model is loaded, the memory reported before
//! a load already includes it, so unloading everything returns the device to that figure,
//! and the first run costs what a later cold load costs. On the CPU there is nothing to do.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};

/// Runs one small instance of every kind of operation a pipeline uses, in each floating
/// point type a pipeline may run in, and waits for the device to finish. A type the device
/// cannot run is skipped with a warning (a pipeline asking for it fails with the reason).
pub fn warm_up(device: &Device) -> candle_core::Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if let Err(e) = exercise(device, dtype) {
            tracing::warn!("warm-up in {dtype:?} failed: {e}");
        }
    }
    device.synchronize()
}

fn exercise(device: &Device, dtype: DType) -> candle_core::Result<()> {
    // fill, arange, cast
    let x = Tensor::arange(0f32, 64f32, device)?
        .to_dtype(dtype)?
        .reshape((1, 4, 4, 4))?;
    let ones = Tensor::ones((1, 4, 4, 4), dtype, device)?;
    // affine, binary, unary
    let y = ((x.affine(0.01, -0.3)? + &ones)? * &ones)?;
    let y = candle_nn::ops::silu(&y.exp()?.sqrt()?.gelu_erf()?.gelu()?.tanh()?)?;
    // reduce, softmax, ternary, indexing
    let _ = y.sum_keepdim(D::Minus1)?.max(D::Minus1)?;
    let _ = candle_nn::ops::softmax_last_dim(&y)?;
    let mask = y.ge(&y.mean_all()?.broadcast_as(y.shape())?)?;
    let _ = mask.where_cond(&y, &ones)?;
    let ids = Tensor::new(&[0u32, 2], device)?;
    let _ = y.index_select(&ids, 1)?;
    // convolution, resize, concatenation
    let weight = Tensor::ones((4, 4, 3, 3), dtype, device)?;
    let conv = y.conv2d(&weight, 1, 1, 1, 1)?;
    let _ = Tensor::cat(
        &[&conv.upsample_nearest2d(8, 8)?.i((.., .., ..4, ..4))?, &y],
        1,
    )?;
    // matrix products (cuBLAS), as attention and linear layers call them
    let m = y.reshape((4, 4, 4))?;
    let _ = m.matmul(&m.t()?)?;
    // layer and group norm
    let norm = candle_nn::LayerNorm::new(
        Tensor::ones(4, dtype, device)?,
        Tensor::zeros(4, dtype, device)?,
        1e-5,
    );
    let _ = norm.forward(&m)?;
    let _ = crate::pipelines::ops::GroupNorm::new(
        Tensor::ones(4, dtype, device)?,
        Tensor::zeros(4, dtype, device)?,
        2,
        1e-5,
    )?
    .forward(&y)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_warm_up_operation_is_well_formed() {
        // On a GPU a shape error here would stop the daemon from starting; the CPU runs the
        // same operations.
        exercise(&Device::Cpu, DType::F32).expect("f32 warm-up");
        exercise(&Device::Cpu, DType::F16).expect("f16 warm-up");
        warm_up(&Device::Cpu).expect("nothing to do on the CPU");
    }
}
