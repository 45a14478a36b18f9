//! Element-wise loops compiled for the widest vector unit this CPU has.
//!
//! The crate is built for the baseline x86-64 (SSE2, four f32 lanes) so that it runs on any
//! machine; the element-wise loops (softmax's exp, SiLU, GELU) are written so the compiler
//! can vectorise them, and [`widest!`](crate::widest) compiles each one three times: for
//! AVX-512 (sixteen lanes), for AVX2 with FMA (eight) and for the baseline, picking one per
//! call by what the CPU reports.

/// Defines `fn name(args)` whose body is compiled for AVX-512, AVX2+FMA and the baseline,
/// and dispatches to the widest the CPU supports at run time.
#[macro_export]
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
