//! Group normalisation, optionally followed by SiLU, in two passes over each group.
//!
//! A group's channels are contiguous in NCHW order, so each (image, group) pair is one
//! contiguous run: the first pass computes its mean and variance (accumulated in f64, as
//! the statistics of a million values need), the second writes
//! `(x - mean) / sqrt(var + eps) · weight[c] + bias[c]` (and its SiLU) folded into one
//! multiply-add per element. Groups are spread over threads.

use rayon::prelude::*;

/// The sizes of one group norm: input (batch, channels, spatial...) with `spatial` the
/// product of the trailing dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupNormShape {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
}

/// `input` normalised per (image, group), scaled and shifted per channel, then passed
/// through SiLU when `silu` is set.
///
/// # Panics
/// When the slices do not match `shape` or `groups` does not divide `channels`.
pub fn group_norm(
    shape: &GroupNormShape,
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let &GroupNormShape {
        batch,
        channels,
        spatial,
        groups,
    } = shape;
    assert!(groups > 0 && channels % groups == 0, "group norm groups");
    assert_eq!(input.len(), batch * channels * spatial, "group norm input");
    assert_eq!(weight.len(), channels, "group norm weight");
    assert_eq!(bias.len(), channels, "group norm bias");
    let channels_per_group = channels / groups;
    let group_len = channels_per_group * spatial;
    let mut output = vec![0f32; input.len()];
    if group_len == 0 {
        return output;
    }
    output
        .par_chunks_mut(group_len)
        .zip(input.par_chunks(group_len))
        .enumerate()
        .for_each(|(index, (out, x))| {
            let group = index % groups;
            let (mean, inv_std) = statistics(x, eps);
            for (local, (out, x)) in out
                .chunks_exact_mut(spatial)
                .zip(x.chunks_exact(spatial))
                .enumerate()
            {
                let channel = group * channels_per_group + local;
                let scale = weight[channel] * inv_std;
                let shift = bias[channel] - mean * scale;
                scale_shift(out, x, scale, shift, silu);
            }
        });
    output
}

crate::widest! {
    /// `out = x · scale + shift`, then SiLU when `silu`.
    fn scale_shift(out: &mut [f32], x: &[f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for (o, &v) in out.iter_mut().zip(x) {
                let y = v * scale + shift;
                *o = y / (1.0 + crate::exp(-y));
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale + shift;
            }
        }
    }
}

/// Mean and 1/sqrt(variance + eps) of `x`, variance with the 1/n of PyTorch's group norm.
fn statistics(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v) / n;
    let mean_f32 = mean as f32;
    let variance = sum_f64(x, |v| {
        let d = v - mean_f32;
        d * d
    }) / n;
    (mean_f32, (1.0 / (variance + eps as f64).sqrt()) as f32)
}

/// The sum of `f` over `x`: blocks of 1024 values summed in eight f32 lanes (so the loop
/// vectorises), each block's total added in f64 (so millions of values stay accurate).
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut eights = block.chunks_exact(8);
        for eight in &mut eights {
            for (lane, &v) in lanes.iter_mut().zip(eight) {
                *lane += f(v);
            }
        }
        let rest: f32 = eights.remainder().iter().map(|&v| f(v)).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + rest as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        shape: &GroupNormShape,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        silu: bool,
    ) -> Vec<f32> {
        let cpg = shape.channels / shape.groups;
        let len = cpg * shape.spatial;
        let mut out = vec![0f32; x.len()];
        for (i, chunk) in x.chunks(len).enumerate() {
            let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = chunk
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / len as f64;
            let group = i % shape.groups;
            for (j, &v) in chunk.iter().enumerate() {
                let c = group * cpg + j / shape.spatial;
                let y = (v as f64 - mean) / (var + eps as f64).sqrt() * w[c] as f64 + b[c] as f64;
                let y = if silu { y / (1.0 + (-y).exp()) } else { y };
                out[i * len + j] = y as f32;
            }
        }
        out
    }

    fn values(count: usize, seed: usize, offset: f32) -> Vec<f32> {
        (0..count)
            .map(|i| (((i + seed) * 7919) % 2003) as f32 / 401.0 - 2.5 + offset)
            .collect()
    }

    fn check(shape: GroupNormShape, silu: bool, offset: f32) {
        let x = values(shape.batch * shape.channels * shape.spatial, 1, offset);
        let w = values(shape.channels, 2, 0.0);
        let b = values(shape.channels, 3, 0.0);
        let expected = naive(&shape, &x, &w, &b, 1e-5, silu);
        let got = group_norm(&shape, &x, &w, &b, 1e-5, silu);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "{shape:?} silu={silu}: max abs diff {worst}");
    }

    #[test]
    fn normalises_each_group_of_each_image() {
        check(
            GroupNormShape {
                batch: 2,
                channels: 8,
                spatial: 13,
                groups: 4,
            },
            false,
            0.0,
        );
        check(
            GroupNormShape {
                batch: 1,
                channels: 6,
                spatial: 5,
                groups: 6,
            },
            false,
            0.0,
        );
    }

    #[test]
    fn fused_silu_equals_silu_after_the_norm() {
        check(
            GroupNormShape {
                batch: 2,
                channels: 64,
                spatial: 100,
                groups: 32,
            },
            true,
            0.0,
        );
    }

    #[test]
    fn large_groups_with_a_large_mean_keep_their_precision() {
        // One group of 2M values centred on 20: a plain f32 running sum would drift.
        check(
            GroupNormShape {
                batch: 1,
                channels: 32,
                spatial: 65536,
                groups: 1,
            },
            false,
            20.0,
        );
    }
}
