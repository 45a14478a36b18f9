//! A linear layer, `x · Wᵀ + b`, with PyTorch's (out_features, in_features) weight read
//! transposed in place and the product added onto the bias in the output, so the bias
//! costs no pass of its own.

use crate::matmul::{multiply, Threads, View};

/// `rows × in_features` input times the transposed `out_features × in_features` weight,
/// plus `bias` (one per output feature) when given: `rows × out_features` values.
///
/// # Panics
/// When a slice's length does not match the sizes.
pub fn linear(
    input: &[f32],
    rows: usize,
    in_features: usize,
    weight: &[f32],
    out_features: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(input.len(), rows * in_features, "linear input");
    assert_eq!(weight.len(), out_features * in_features, "linear weight");
    let mut output = match bias {
        Some(bias) => {
            assert_eq!(bias.len(), out_features, "linear bias");
            let mut output = Vec::with_capacity(rows * out_features);
            for _ in 0..rows {
                output.extend_from_slice(bias);
            }
            output
        }
        None => vec![0f32; rows * out_features],
    };
    if output.is_empty() || in_features == 0 {
        return output;
    }
    // The weight read with rows and columns swapped is its (in × out) transpose.
    multiply(
        &mut output,
        out_features,
        (rows, out_features, in_features),
        View::rows(input, in_features),
        View::transposed(weight, in_features),
        bias.is_some(),
        1.0,
        Threads::All,
    );
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_x_times_w_transposed_plus_b() {
        // x: 2×3, W: 2×3 (out × in), b: 2
        let x = [1.0, 2.0, 3.0, -1.0, 0.0, 1.0];
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5];
        let b = [10.0, 20.0];
        assert_eq!(linear(&x, 2, 3, &w, 2, Some(&b)), [8.0, 23.0, 8.0, 20.0]);
        assert_eq!(linear(&x, 2, 3, &w, 2, None), [-2.0, 3.0, -2.0, 0.0]);
    }

    #[test]
    fn large_products_match_the_definition() {
        let (rows, inf, outf) = (67, 129, 33);
        let x: Vec<f32> = (0..rows * inf)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..outf * inf)
            .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..outf).map(|i| i as f32).collect();
        let got = linear(&x, rows, inf, &w, outf, Some(&b));
        for r in 0..rows {
            for o in 0..outf {
                let expected: f64 = b[o] as f64
                    + (0..inf)
                        .map(|k| x[r * inf + k] as f64 * w[o * inf + k] as f64)
                        .sum::<f64>();
                assert!((got[r * outf + o] as f64 - expected).abs() < 1e-3);
            }
        }
    }
}
