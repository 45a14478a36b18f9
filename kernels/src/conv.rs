//! 2-D convolution as one matrix product per tile of output rows.
//!
//! For each image, the input patches under the kernel are copied into a column matrix of
//! (in_channels · k · k) rows, one column per output pixel, and the weights, which are
//! already (out_channels, in_channels · k · k) in PyTorch's layout, multiply it. The product
//! is written straight into the output in NCHW order, on top of the bias, so there is no
//! repacking of weights and no reordering of results. The column matrix is built a tile of
//! output rows at a time, so its size stays bounded for large images. A 1x1 convolution
//! with stride 1 needs no column matrix at all: the input already is one.

use rayon::prelude::*;

use crate::matmul::{multiply, Threads, View};

/// Largest column matrix built at once, in f32 elements (32 MiB).
const COLUMN_TILE_ELEMENTS: usize = 8 * 1024 * 1024;

/// The sizes of one convolution: input (batch, in_channels, height, width), weight
/// (out_channels, in_channels, kernel, kernel), zero padding on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dShape {
    pub fn out_height(&self) -> usize {
        out_size(self.height, self.kernel, self.stride, self.padding)
    }

    pub fn out_width(&self) -> usize {
        out_size(self.width, self.kernel, self.stride, self.padding)
    }
}

fn out_size(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    let padded = size + 2 * padding;
    if padded < kernel || stride == 0 {
        0
    } else {
        (padded - kernel) / stride + 1
    }
}

/// The convolution of `input` with `weight`, plus `bias` (one per output channel).
///
/// # Panics
/// When a slice's length does not match `shape` (the caller checks shapes).
pub fn conv2d(shape: &Conv2dShape, input: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let &Conv2dShape {
        batch,
        in_channels,
        height,
        width,
        out_channels,
        kernel,
        stride,
        padding,
    } = shape;
    let (out_height, out_width) = (shape.out_height(), shape.out_width());
    let in_plane = height * width;
    let out_plane = out_height * out_width;
    let patch_len = in_channels * kernel * kernel;
    assert_eq!(input.len(), batch * in_channels * in_plane, "conv2d input");
    assert_eq!(weight.len(), out_channels * patch_len, "conv2d weight");
    assert_eq!(bias.len(), out_channels, "conv2d bias");

    // Start every output channel at its bias; the products are added on top.
    let mut output = Vec::with_capacity(batch * out_channels * out_plane);
    for _ in 0..batch {
        for &b in bias {
            output.extend(std::iter::repeat_n(b, out_plane));
        }
    }
    if out_plane == 0 {
        return output;
    }

    let pointwise = kernel == 1 && stride == 1 && padding == 0;
    let rows_per_tile =
        (COLUMN_TILE_ELEMENTS / (patch_len * out_width).max(1)).clamp(1, out_height);
    let mut columns = if pointwise {
        Vec::new()
    } else {
        vec![0f32; patch_len * rows_per_tile * out_width]
    };
    for image in 0..batch {
        let input = &input[image * in_channels * in_plane..][..in_channels * in_plane];
        let output = &mut output[image * out_channels * out_plane..][..out_channels * out_plane];
        if pointwise {
            multiply_add(
                output,
                out_plane,
                weight,
                input,
                (out_channels, in_plane, in_channels),
            );
            continue;
        }
        let mut first_row = 0;
        while first_row < out_height {
            let rows = rows_per_tile.min(out_height - first_row);
            let tile_columns = rows * out_width;
            let tile = &mut columns[..patch_len * tile_columns];
            fill_columns(shape, input, first_row, rows, tile);
            // The tile's output starts at pixel `first_row · out_width` of channel 0; its rows
            // (channels) are `out_plane` apart.
            let output_tile = &mut output[first_row * out_width..];
            multiply_add(
                output_tile,
                out_plane,
                weight,
                tile,
                (out_channels, tile_columns, patch_len),
            );
            first_row += rows;
        }
    }
    output
}

/// Copies the patches under the kernel for output rows `first_row..first_row + rows` into
/// `tile`, one row per (input channel, kernel row, kernel column), zeros where the kernel
/// hangs over the padding.
fn fill_columns(
    shape: &Conv2dShape,
    input: &[f32],
    first_row: usize,
    rows: usize,
    tile: &mut [f32],
) {
    let &Conv2dShape {
        height,
        width,
        kernel,
        stride,
        padding,
        ..
    } = shape;
    let out_width = shape.out_width();
    let tile_columns = rows * out_width;
    tile.par_chunks_mut(tile_columns)
        .enumerate()
        .for_each(|(row, column_row)| {
            let channel = row / (kernel * kernel);
            let kernel_y = (row / kernel) % kernel;
            let kernel_x = row % kernel;
            let plane = &input[channel * height * width..][..height * width];
            for (tile_row, out_row) in column_row.chunks_exact_mut(out_width).enumerate() {
                let in_y = ((first_row + tile_row) * stride + kernel_y) as isize - padding as isize;
                if in_y < 0 || in_y >= height as isize {
                    out_row.fill(0.0);
                    continue;
                }
                let line = &plane[in_y as usize * width..][..width];
                if stride == 1 {
                    // Output x reads input x + kernel_x - padding: one shifted copy.
                    let shift = kernel_x as isize - padding as isize;
                    let start = (-shift).clamp(0, out_width as isize) as usize;
                    let end =
                        (width as isize - shift).clamp(start as isize, out_width as isize) as usize;
                    out_row[..start].fill(0.0);
                    out_row[start..end].copy_from_slice(
                        &line[(start as isize + shift) as usize..(end as isize + shift) as usize],
                    );
                    out_row[end..].fill(0.0);
                } else {
                    for (out_x, value) in out_row.iter_mut().enumerate() {
                        let in_x = (out_x * stride + kernel_x) as isize - padding as isize;
                        *value = if in_x >= 0 && in_x < width as isize {
                            line[in_x as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        });
}

/// `dst[m × n] += lhs[m × k] · rhs[k × n]`, with `dst`'s rows `dst_row_stride` apart and
/// `lhs`, `rhs` dense row-major.
fn multiply_add(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
) {
    let (lhs, rhs) = (View::rows(lhs, k), View::rows(rhs, n));
    multiply(
        dst,
        dst_row_stride,
        (m, n, k),
        lhs,
        rhs,
        true,
        1.0,
        Threads::All,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output element at a time.
    fn naive(shape: &Conv2dShape, input: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let (oh, ow) = (shape.out_height(), shape.out_width());
        let mut out = vec![0f32; shape.batch * shape.out_channels * oh * ow];
        for b in 0..shape.batch {
            for o in 0..shape.out_channels {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut sum = bias[o] as f64;
                        for c in 0..shape.in_channels {
                            for ky in 0..shape.kernel {
                                for kx in 0..shape.kernel {
                                    let iy =
                                        (y * shape.stride + ky) as isize - shape.padding as isize;
                                    let ix =
                                        (x * shape.stride + kx) as isize - shape.padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= shape.height as isize
                                        || ix >= shape.width as isize
                                    {
                                        continue;
                                    }
                                    let i = ((b * shape.in_channels + c) * shape.height
                                        + iy as usize)
                                        * shape.width
                                        + ix as usize;
                                    let w = ((o * shape.in_channels + c) * shape.kernel + ky)
                                        * shape.kernel
                                        + kx;
                                    sum += input[i] as f64 * weight[w] as f64;
                                }
                            }
                        }
                        out[((b * shape.out_channels + o) * oh + y) * ow + x] = sum as f32;
                    }
                }
            }
        }
        out
    }

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| (((i + seed) * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    fn check(shape: Conv2dShape) {
        let input = values(
            shape.batch * shape.in_channels * shape.height * shape.width,
            1,
        );
        let weight = values(
            shape.out_channels * shape.in_channels * shape.kernel * shape.kernel,
            2,
        );
        let bias = values(shape.out_channels, 3);
        let expected = naive(&shape, &input, &weight, &bias);
        let got = conv2d(&shape, &input, &weight, &bias);
        assert_eq!(got.len(), expected.len(), "{shape:?}");
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{shape:?}: max abs diff {worst}");
    }

    /// [batch, in_channels, height, width, out_channels, kernel, stride, padding]
    fn shape(sizes: [usize; 8]) -> Conv2dShape {
        let [batch, in_channels, height, width, out_channels, kernel, stride, padding] = sizes;
        Conv2dShape {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel,
            stride,
            padding,
        }
    }

    #[test]
    fn three_by_three_same_padding_matches_the_definition() {
        check(shape([2, 5, 9, 7, 6, 3, 1, 1]));
    }

    #[test]
    fn strided_downsampling_matches_the_definition() {
        check(shape([2, 4, 9, 8, 3, 3, 2, 1]));
        check(shape([1, 3, 8, 8, 4, 3, 2, 0]));
    }

    #[test]
    fn pointwise_and_unpadded_kernels_match_the_definition() {
        check(shape([2, 7, 5, 6, 4, 1, 1, 0]));
        check(shape([1, 3, 6, 6, 2, 3, 1, 0]));
        check(shape([1, 2, 6, 5, 2, 1, 2, 0]));
    }

    #[test]
    fn images_larger_than_one_column_tile_are_split_into_row_tiles() {
        // 64 channels × 9 × width 2100: one row of columns is 1.2M elements, so the
        // 8M-element tile holds 6 rows and this image takes 2 tiles.
        check(shape([1, 64, 8, 2100, 2, 3, 1, 1]));
    }

    #[test]
    fn an_input_smaller_than_the_kernel_gives_an_empty_output() {
        let s = shape([1, 1, 2, 2, 1, 5, 1, 0]);
        assert_eq!((s.out_height(), s.out_width()), (0, 0));
        assert!(conv2d(&s, &[0.0; 4], &[0.0; 25], &[0.0]).is_empty());
    }
}
