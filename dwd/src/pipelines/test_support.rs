//! What the pipelines' unit tests share: reproducible inputs and the difference measure
//! parity is judged by.

use candle_core::{Device, Tensor};

/// A CPU f32 tensor of `shape` with values in [-1, 1) that vary along every axis; `seed`
/// shifts the pattern so that two tensors of one shape differ.
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count as u64)
        .map(|i| (((i + seed) * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("a tensor")
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("a difference")
}
