//! Scaled dot-product attention, a block of queries at a time.
//!
//! softmax(q kᵀ · scale) v is exact row by row: each query's softmax needs only that
//! query's scores. So the scores are computed for a block of queries sized to stay in
//! cache (about 1 MiB), normalised in place with a vectorised exp, and multiplied by v into
//! the output, instead of writing the whole (queries × keys) matrix for every head — 1 GiB
//! for one self-attention of a 512x512 image — and reading it back twice. Blocks of all
//! heads are spread over threads; each block's matrix products run on one.

use rayon::prelude::*;

use crate::matmul::{multiply, Threads, View};

/// Score elements per block of queries (1 MiB of f32).
const BLOCK_SCORES: usize = 256 * 1024;

/// The sizes of one attention: query (heads, query_len, head_dim), key and value
/// (heads, key_len, head_dim), where `heads` counts batch × heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub query_len: usize,
    pub key_len: usize,
    pub head_dim: usize,
}

/// softmax(query · keyᵀ · scale) · value, shaped like `query`.
///
/// # Panics
/// When the slices do not match `shape`.
pub fn attention(
    shape: &AttentionShape,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    scale: f32,
) -> Vec<f32> {
    let &AttentionShape {
        heads,
        query_len,
        key_len,
        head_dim,
    } = shape;
    assert_eq!(query.len(), heads * query_len * head_dim, "attention query");
    assert_eq!(key.len(), heads * key_len * head_dim, "attention key");
    assert_eq!(value.len(), heads * key_len * head_dim, "attention value");
    let mut output = vec![0f32; query.len()];
    if output.is_empty() || key_len == 0 {
        return output;
    }
    let block = (BLOCK_SCORES / key_len).clamp(1, query_len);
    output
        .par_chunks_mut(query_len * head_dim)
        .enumerate()
        .for_each(|(head, head_output)| {
            let query = &query[head * query_len * head_dim..][..query_len * head_dim];
            let key = &key[head * key_len * head_dim..][..key_len * head_dim];
            let value = &value[head * key_len * head_dim..][..key_len * head_dim];
            head_output
                .par_chunks_mut(block * head_dim)
                .enumerate()
                .for_each_init(Vec::new, |scores, (index, out)| {
                    let rows = out.len() / head_dim;
                    let query = &query[index * block * head_dim..][..rows * head_dim];
                    scores.resize(rows * key_len, 0.0);
                    // Scores: query (rows × head_dim) times key read transposed.
                    multiply(
                        scores,
                        key_len,
                        (rows, key_len, head_dim),
                        View::rows(query, head_dim),
                        View::transposed(key, head_dim),
                        false,
                        scale,
                        Threads::One,
                    );
                    let totals = exponentiate_rows(scores, key_len);
                    multiply(
                        out,
                        head_dim,
                        (rows, head_dim, key_len),
                        View::rows(scores, key_len),
                        View::rows(value, head_dim),
                        false,
                        1.0,
                        Threads::One,
                    );
                    // The softmax's division, on head_dim values per row instead of key_len.
                    for (row, total) in out.chunks_exact_mut(head_dim).zip(totals) {
                        let inverse = 1.0 / total;
                        row.iter_mut().for_each(|v| *v *= inverse);
                    }
                });
        });
    output
}

/// Replaces each row of `key_len` scores by exp(score - row max) and returns each row's
/// sum: the softmax without its division, which is applied to the (much narrower) output.
fn exponentiate_rows(scores: &mut [f32], key_len: usize) -> Vec<f32> {
    let mut totals = vec![0f32; scores.len() / key_len];
    exponentiate_rows_into(scores, key_len, &mut totals);
    totals
}

crate::widest! {
    fn exponentiate_rows_into(scores: &mut [f32], key_len: usize, totals: &mut [f32]) {
        for (row, total) in scores.chunks_exact_mut(key_len).zip(totals.iter_mut()) {
            *total = exponentiate(row);
        }
    }
}

/// Replaces `row` by exp(x - max(row)) and returns the sum. Sixteen independent lanes let
/// the compiler vectorise the max, the exp and the sum.
#[inline(always)]
fn exponentiate(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut sixteens = row.chunks_exact(16);
    for sixteen in &mut sixteens {
        for (lane, &v) in lanes.iter_mut().zip(sixteen) {
            *lane = lane.max(v);
        }
    }
    let max = sixteens
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0f32; 16];
    let mut sixteens = row.chunks_exact_mut(16);
    for sixteen in &mut sixteens {
        for (sum, v) in sums.iter_mut().zip(sixteen.iter_mut()) {
            *v = crate::exp(*v - max);
            *sum += *v;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for v in sixteens.into_remainder() {
        *v = crate::exp(*v - max);
        total += *v;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f32> {
        let d = shape.head_dim;
        let mut out = vec![0f32; q.len()];
        for h in 0..shape.heads {
            for i in 0..shape.query_len {
                let scores: Vec<f64> = (0..shape.key_len)
                    .map(|j| {
                        (0..d)
                            .map(|x| {
                                q[(h * shape.query_len + i) * d + x] as f64
                                    * k[(h * shape.key_len + j) * d + x] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for x in 0..d {
                    let value: f64 = (0..shape.key_len)
                        .map(|j| exps[j] / total * v[(h * shape.key_len + j) * d + x] as f64)
                        .sum();
                    out[(h * shape.query_len + i) * d + x] = value as f32;
                }
            }
        }
        out
    }

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| (((i + seed) * 7919) % 2003) as f32 / 501.0 - 2.0)
            .collect()
    }

    fn check(shape: AttentionShape) {
        let q = values(shape.heads * shape.query_len * shape.head_dim, 1);
        let k = values(shape.heads * shape.key_len * shape.head_dim, 2);
        let v = values(shape.heads * shape.key_len * shape.head_dim, 3);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let expected = naive(&shape, &q, &k, &v, scale);
        let got = attention(&shape, &q, &k, &v, scale);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{shape:?}: max abs diff {worst}");
    }

    #[test]
    fn self_attention_matches_the_definition() {
        check(AttentionShape {
            heads: 3,
            query_len: 37,
            key_len: 37,
            head_dim: 8,
        });
    }

    #[test]
    fn cross_attention_with_fewer_keys_matches_the_definition() {
        check(AttentionShape {
            heads: 2,
            query_len: 50,
            key_len: 7,
            head_dim: 5,
        });
    }

    #[test]
    fn long_sequences_are_split_into_query_blocks() {
        // 4100 keys: blocks of 63 queries, the last one shorter.
        check(AttentionShape {
            heads: 1,
            query_len: 130,
            key_len: 4100,
            head_dim: 4,
        });
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let mut row = vec![1000.0, 999.0, -1000.0];
        let total = exponentiate(&mut row);
        assert_eq!(row[0], 1.0);
        assert!((total - 1.0 - (-1f32).exp()).abs() < 1e-6 && row[2] < 1e-30);
    }
}
