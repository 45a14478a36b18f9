//! torch's CPU generator, bit for bit: what `torch.Generator("cpu").manual_seed(seed)` and
//! then `torch.randn(shape)` give (torch 2.x on x86-64 with AVX2), so a seed in a workflow
//! gives the noise diffusers-workflow draws on a machine without CUDA.
//!
//! - **Seeding**: MT19937 keyed with the low 32 bits of the 64-bit seed (a negative seed is
//!   its two's complement); seeding clears the cached normal.
//! - **Fewer than 16 elements**: Box–Muller in double precision from two 53-bit uniforms,
//!   `r·cos θ` returned and `r·sin θ` cached in the generator for the next such draw.
//! - **16 or more**: N 24-bit float uniforms; every block of 16 pairs element `j` with
//!   `j + 8` through float32 Box–Muller with torch's AVX2 `log`/`sin`/`cos` (Cephes-style
//!   polynomials, every multiply-add fused), nothing cached; a partial last block is made
//!   from 16 fresh uniforms and written over the last 16 outputs.
//!
//! `tests/fixtures/torch-rng` holds torch's own draws; the tests here reproduce them.

use candle_core::{Device, Tensor};
use rand_mt::Mt;

use super::noise::NoiseSource;
use super::{InComponent, PipelineError};

/// 2π rounded to float32, as torch's kernel multiplies by it.
const TWO_PI_F32: f32 = std::f32::consts::TAU;
/// Draws of at least this many elements take the blockwise float32 path.
const BLOCK_PATH_MIN: usize = 16;

/// torch's CPU generator: its Mersenne Twister and its cached normal.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    mt: Mt,
    cached_normal: Option<f64>,
}

impl std::fmt::Debug for TorchCpuGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchCpuGenerator")
            .field("cached_normal", &self.cached_normal)
            .finish_non_exhaustive()
    }
}

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: only the low 32 bits key the twister.
    pub fn new(seed: u64) -> Self {
        TorchCpuGenerator {
            mt: Mt::new(seed as u32),
            cached_normal: None,
        }
    }

    /// `torch.rand(n)` in float32: one 24-bit uniform per word.
    pub fn rand_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randn(n)` in float32 (any shape is a row-major view of this).
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        self.randn_blocks(n, false)
    }

    /// The float32 values of `torch.randn(n, dtype=float16 or bfloat16)`, before they are
    /// rounded to that dtype: as [`TorchCpuGenerator::randn_f32`], except that a partial
    /// last block takes the leftover uniforms and only as many fresh ones as it lacks.
    pub fn randn_half_f32(&mut self, n: usize) -> Vec<f32> {
        self.randn_blocks(n, true)
    }

    /// `n` normals: the small cached path below 16, else blocks of 16 and, for a partial
    /// last block, 16 uniforms written over the last 16 outputs: fresh ones, or (`half`)
    /// the leftover ones topped up with fresh ones.
    fn randn_blocks(&mut self, n: usize, half: bool) -> Vec<f32> {
        if n < BLOCK_PATH_MIN {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut uniforms = self.rand_f32(n);
        let mut out = vec![0f32; n];
        for (block, chunk) in out.chunks_exact_mut(16).zip(uniforms.chunks_exact(16)) {
            box_muller_block(chunk, block);
        }
        let leftover = n % 16;
        if leftover != 0 {
            let tail = match half {
                true => {
                    let mut tail = uniforms.split_off(n - leftover);
                    tail.extend(self.rand_f32(16 - leftover));
                    tail
                }
                false => self.rand_f32(16),
            };
            box_muller_block(&tail, &mut out[n - 16..]);
        }
        out
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A 53-bit uniform from two words, the first the high half.
    fn uniform_f64(&mut self) -> f64 {
        let high = u64::from(self.mt.next_u32());
        let low = u64::from(self.mt.next_u32());
        ((high << 32 | low) & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One normal of the small-draw path: the cached one, else a new Box–Muller pair.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

impl NoiseSource for TorchCpuGenerator {
    /// `torch.randn(shape)` in float32, continuing the stream of earlier draws.
    fn next(&mut self, shape: &[usize]) -> Result<Tensor, PipelineError> {
        let values = self.randn_f32(shape.iter().product());
        Tensor::from_vec(values, shape, &Device::Cpu).in_component("noise")
    }
}

/// Sixteen normals from sixteen uniforms: element `j` with `j + 8`, cosine first.
fn box_muller_block(uniforms: &[f32], out: &mut [f32]) {
    for j in 0..8 {
        let radius = (-2.0 * avx_log(1.0 - uniforms[j])).sqrt();
        let (sin, cos) = avx_sincos(TWO_PI_F32 * uniforms[j + 8]);
        out[j] = radius * cos;
        out[j + 8] = radius * sin;
    }
}

/// torch's AVX2 `log` (the Cephes polynomial of avx_mathfun) for x in (0, 1], every
/// multiply-add fused as the compiled kernel fuses it. The constants are written as
/// published; each rounds to the float32 the kernel holds.
#[allow(clippy::excessive_precision)]
fn avx_log(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    const Q1: f32 = -2.12194440E-4;
    const Q2: f32 = 0.693359375;
    // x = m · 2^e with m in [0.5, 1).
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 126;
    let m = f32::from_bits((bits & 0x807F_FFFF) | 0x3F00_0000);
    let t = if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        (m - 1.0) + m
    } else {
        m - 1.0
    };
    let e = e as f32;
    let z = t * t;
    let y = P[1..].iter().fold(P[0], |y, p| y.mul_add(t, *p)) * t;
    let y = y.mul_add(z, e * Q1);
    let y = y - z * 0.5;
    (t + y) + e * Q2
}

/// torch's AVX2 `sincos` (avx_mathfun) for θ >= 0: (sin θ, cos θ), constants as
/// published.
#[allow(clippy::excessive_precision)]
fn avx_sincos(theta: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.27323954473516;
    let j = (((theta * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = j as f32;
    let x = y.mul_add(-0.78515625, theta);
    let x = y.mul_add(-2.4187564849853515625E-4, x);
    let x = y.mul_add(-3.77489497744594108E-8, x);
    let z = x * x;
    let c = 2.443315711809948E-5f32.mul_add(z, -1.388731625493765E-3);
    let c = c.mul_add(z, 4.166664568298827E-2) * z;
    let c = c.mul_add(z, -(z * 0.5)) + 1.0;
    let s = (-1.9515295891E-4f32).mul_add(z, 8.3321608736E-3);
    let s = s.mul_add(z, -1.6666654611E-1) * z;
    let s = s.mul_add(x, x);
    let (mut sin, mut cos) = match j & 2 {
        0 => (s, c),
        _ => (c, s),
    };
    if j & 4 != 0 {
        sin = -sin;
    }
    if (j - 2) & 4 == 0 {
        cos = -cos;
    }
    (sin, cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MT19937 keyed with 0 starts 2357136044, 2546248239, 3071714933; seeds equal modulo
    /// 2^32 (and a negative seed's two's complement) give the same stream.
    #[test]
    fn the_twister_is_keyed_with_the_low_32_bits() {
        let mut zero = TorchCpuGenerator::new(0);
        let words: Vec<u32> = (0..3).map(|_| zero.mt.next_u32()).collect();
        assert_eq!(words, [2357136044, 2546248239, 3071714933]);
        let mut a = TorchCpuGenerator::new(4_294_967_295);
        let mut b = TorchCpuGenerator::new(u64::MAX);
        assert_eq!(a.randn_f32(20), b.randn_f32(20));
    }

    /// Seven small draws leave one normal cached; the next small draw starts with it, and a
    /// block draw in between neither uses nor clears it.
    #[test]
    fn the_small_path_caches_its_second_normal_across_block_draws() {
        let mut reference = TorchCpuGenerator::new(3);
        let eight = reference.randn_f32(8);
        let mut generator = TorchCpuGenerator::new(3);
        let seven = generator.randn_f32(7);
        assert_eq!(seven, eight[..7]);
        assert!(generator.cached_normal.is_some());
        let _block = generator.randn_f32(16);
        assert_eq!(generator.randn_f32(1), [eight[7]]);
    }
}
