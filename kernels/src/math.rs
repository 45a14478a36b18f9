//! Branch-free `exp` and `erf` for f32 that the compiler can vectorise, for softmax, SiLU
//! and GELU (the standard library's call libm one value at a time).
//!
//! `exp` is Cephes' single-precision algorithm: split x = n·ln2 + r with |r| ≤ ln2/2, approximate
//! e^r with a degree-6 polynomial, and build 2^n from its exponent bits. The relative error
//! is below 2e-7 over the range where the result is a normal f32; inputs are clamped to
//! that range, so very negative inputs give about 1e-38 instead of 0 (harmless in a sum of
//! exponentials) and large ones do not overflow.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, so that n·ln2 is subtracted exactly.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2^23 rounds to the nearest integer without a branch.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x, vectorisable; see the module documentation for its accuracy.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let r2 = r * r;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r2 + r + 1.0;
    let two_to_n = f32::from_bits(((n as i32 + 127) << 23) as u32);
    e_r * two_to_n
}

/// erf(x) by Abramowitz and Stegun's formula 7.1.26 (absolute error below 1.5e-7 in exact
/// arithmetic, 6e-7 in f32), on the vectorisable `exp`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// The exact (erf) GELU: x · Φ(x).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series (small |x|) or continued fraction, in f64.
    fn erf_f64(x: f64) -> f64 {
        // The series converges everywhere; 200 terms are plenty for |x| <= 6.
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        (2.0 / std::f64::consts::PI.sqrt() * sum).clamp(-1.0, 1.0)
    }

    #[test]
    fn erf_is_within_its_published_error_bound() {
        let mut worst = 0f64;
        let mut x = -5.0f32;
        while x < 5.0 {
            worst = worst.max((erf(x) as f64 - erf_f64(x as f64)).abs());
            x += 0.001_7;
        }
        assert!(worst < 6e-7, "worst absolute error {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(f32::INFINITY), 1.0);
    }

    #[test]
    fn matches_the_standard_library_to_within_a_few_ulps() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let expected = (x as f64).exp();
            let relative = ((exp(x) as f64) - expected).abs() / expected;
            worst = worst.max(relative);
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn saturates_instead_of_overflowing_or_going_negative() {
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }
}
