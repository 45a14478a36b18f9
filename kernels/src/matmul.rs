//! The one place the kernels call gemm: `dst = [dst +] scale · lhs · rhs` on strided
//! views of slices, with each operand's extent checked against its slice before the
//! unchecked call, so that no kernel needs `unsafe` of its own.

use gemm::Parallelism;

/// A matrix laid over a slice: element (row, col) is `data[row · row_stride + col ·
/// col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A dense row-major matrix whose rows hold `row_len` elements.
    pub fn rows(data: &'a [f32], row_len: usize) -> Self {
        Self {
            data,
            row_stride: row_len,
            col_stride: 1,
        }
    }

    /// The transpose of a dense row-major matrix whose rows hold `row_len` elements.
    pub fn transposed(data: &'a [f32], row_len: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: row_len,
        }
    }
}

/// Whether a product splits its work over the thread pool or runs on the calling thread
/// (when the caller already runs many products in parallel).
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    All,
    One,
}

/// `dst[m × n] = (dst if accumulate, else 0) + scale · lhs[m × k] · rhs[k × n]`, where
/// `dst`'s rows are `dst_row_stride` apart and its columns adjacent.
///
/// # Panics
/// When an operand's last element lies beyond its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn multiply(
    dst: &mut [f32],
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: View,
    rhs: View,
    accumulate: bool,
    scale: f32,
    threads: Threads,
) {
    assert!(
        dst.len() >= extent(m, n, dst_row_stride, 1),
        "product destination"
    );
    assert!(
        lhs.data.len() >= extent(m, k, lhs.row_stride, lhs.col_stride),
        "product lhs"
    );
    assert!(
        rhs.data.len() >= extent(k, n, rhs.row_stride, rhs.col_stride),
        "product rhs"
    );
    let parallelism = match threads {
        Threads::All => Parallelism::Rayon(crate::threads()),
        Threads::One => Parallelism::None,
    };
    // SAFETY: the assertions above keep every element gemm reads or writes inside its
    // slice; `dst` is borrowed mutably, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    };
}

/// How many elements a `rows × cols` view with these strides spans (0 when empty).
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplies_accumulates_and_reads_transposed_operands() {
        // lhs 2×3, rhs 3×2 given as the transpose of a 2×3 row-major matrix.
        let lhs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rhs_t = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut dst = [10.0, 20.0, 30.0, 40.0];
        let (l, r) = (View::rows(&lhs, 3), View::transposed(&rhs_t, 3));
        multiply(&mut dst, 2, (2, 2, 3), l, r, true, 1.0, Threads::One);
        assert_eq!(dst, [8.0, 24.0, 28.0, 53.0]);
        multiply(&mut dst, 2, (2, 2, 3), l, r, false, 2.0, Threads::All);
        assert_eq!(dst, [-4.0, 8.0, -4.0, 26.0]);
    }

    #[test]
    #[should_panic(expected = "product rhs")]
    fn an_operand_shorter_than_its_view_is_refused() {
        let mut dst = [0.0; 4];
        let a = [1.0; 6];
        multiply(
            &mut dst,
            2,
            (2, 2, 3),
            View::rows(&a, 3),
            View::rows(&a[..5], 2),
            false,
            1.0,
            Threads::One,
        );
    }
}
