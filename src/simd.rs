//! Which instruction set the hand-written loops run on, chosen once at run time.
//!
//! The binary targets plain x86-64 (or aarch64); every loop that has a vector version (the
//! tokenizer's per-entry loops, the model's attention, LayerNorm and one-query attention)
//! looks up its implementation here, from the best tier this CPU runs. The graph rewrites
//! (`model::fuse`) are algebra and run on every CPU: only the arithmetic inside an op picks a
//! kernel. `CELLSTREAM_SIMD` forces a lower tier, for tests and benchmarks: what an AVX2-only
//! CPU runs, measured on this one (the model also caps tract's own matmul kernels to the same
//! tier, `model::kernel_choice`).

/// A tier of vector instructions, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// Portable Rust, written so that the compiler vectorises it for the target's baseline
    /// (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// AVX2 with FMA (and POPCNT): x86-64 CPUs since Haswell and Zen 1.
    Avx2,
    /// AVX-512F on top of AVX2 and FMA: Skylake-SP and later Xeons, Ice Lake, Zen 4 and 5.
    Avx512,
}

impl Simd {
    /// The highest tier this CPU runs.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("popcnt") {
                return if has!("avx512f") {
                    Simd::Avx512
                } else {
                    Simd::Avx2
                };
            }
        }
        Simd::Portable
    }

    /// Every tier this CPU runs, lowest first (for tests and benchmarks).
    pub fn available() -> Vec<Simd> {
        let best = Simd::detect();
        Simd::ALL.into_iter().filter(|&s| s <= best).collect()
    }

    /// The vector tiers this CPU runs, i.e. what a test that compares kernels must cover.
    pub fn vector() -> Vec<Simd> {
        Simd::available()
            .into_iter()
            .filter(|&s| s != Simd::Portable)
            .collect()
    }

    pub const ALL: [Simd; 3] = [Simd::Portable, Simd::Avx2, Simd::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// [`Simd::detect`], unless `CELLSTREAM_SIMD` names a tier this CPU runs (`portable`,
    /// `avx2`, `avx512`): a knob for comparisons, not a setting.
    pub fn from_env() -> Result<Simd, String> {
        const VAR: &str = "CELLSTREAM_SIMD";
        let Ok(wanted) = std::env::var(VAR) else {
            return Ok(Simd::detect());
        };
        let available = Simd::available();
        available
            .iter()
            .copied()
            .find(|s| s.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = available.iter().map(|s| s.name()).collect();
                format!("{VAR}={wanted:?}: this CPU runs one of {names:?}")
            })
    }
}

/// Asks the CPU to start loading `row` into cache: for rows read in an order the hardware
/// prefetcher cannot guess (a token's table row, a graph neighbour's embedding).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch is a hint and cannot fault; SSE is part of x86_64.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
}

/// Lanes of [`dot`]'s partial sums: wide enough for the compiler to keep them in vector
/// registers of any tier.
const LANES: usize = 16;

/// `a · b` (as long as the shorter), summed in [`LANES`] partial sums then those in order: a
/// fixed order that the compiler vectorises for whatever target features the caller is
/// compiled with (inline it into a `#[target_feature]` function to get that tier's code).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
        half /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_ordered_and_the_best_is_available() {
        assert!(Simd::Portable < Simd::Avx2 && Simd::Avx2 < Simd::Avx512);
        let all = Simd::available();
        assert_eq!(all.first(), Some(&Simd::Portable));
        assert_eq!(all.last(), Some(&Simd::detect()));
    }

    /// On a CPU with vector instructions (every x86-64 CI machine has AVX2), the kernel
    /// tests must cover a vector tier: a comparison that only ran the portable loops would
    /// pass vacuously.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn an_x86_64_machine_with_avx2_runs_a_vector_tier() {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert!(Simd::vector().contains(&Simd::Avx2));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(Simd::vector().contains(&Simd::Avx512));
        }
    }
}
