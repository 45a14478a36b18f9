//! A branch-free `exp` for f32 that the compiler can vectorise, for softmax and SiLU.
//!
//! Cephes' single-precision algorithm: split x = n·ln2 + r with |r| ≤ ln2/2, approximate
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

#[cfg(test)]
mod tests {
    use super::*;

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
