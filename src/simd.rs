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

/// `a · b[t]` for four vectors `b[t]` at once (each at least as long as `a`): `a` is loaded
/// once for the four. Each result is bit-for-bit [`dot`]`(a, b[t])`: the same partial sums
/// added in the same order, so that a batched scan finds the same neighbours as one query at
/// a time.
#[inline(always)]
pub fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a.len();
    let b = b.map(|b| &b[..n]);
    let mut acc = [[0f32; LANES]; 4];
    let whole = n - n % LANES;
    for c in (0..whole).step_by(LANES) {
        let x = &a[c..c + LANES];
        for t in 0..4 {
            let y = &b[t][c..c + LANES];
            for l in 0..LANES {
                acc[t][l] += x[l] * y[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for t in 0..4 {
        let tail: f32 = a[whole..]
            .iter()
            .zip(&b[t][whole..])
            .map(|(x, y)| x * y)
            .sum();
        let acc = &mut acc[t];
        let mut half = LANES / 2;
        while half > 0 {
            for l in 0..half {
                acc[l] += acc[l + half];
            }
            half /= 2;
        }
        out[t] = acc[0] + tail;
    }
    out
}

/// [`dot4`] in AVX registers: the compiler keeps the portable loop's 64 partial sums in
/// memory, so this writes them as eight registers. The same products and sums in the same
/// order, so bit for bit [`dot`] too.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_avx2(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = a.len();
    let b = [&b[0][..n], &b[1][..n], &b[2][..n], &b[3][..n]];
    let whole = n - n % LANES;
    let (mut lo, mut hi) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let mut c = 0;
    while c < whole {
        // SAFETY: c + LANES <= whole <= n, the length of a and of every b[t].
        unsafe {
            let x0 = _mm256_loadu_ps(a.as_ptr().add(c));
            let x1 = _mm256_loadu_ps(a.as_ptr().add(c + 8));
            for t in 0..4 {
                let y = b[t].as_ptr().add(c);
                lo[t] = _mm256_add_ps(lo[t], _mm256_mul_ps(x0, _mm256_loadu_ps(y)));
                hi[t] = _mm256_add_ps(hi[t], _mm256_mul_ps(x1, _mm256_loadu_ps(y.add(8))));
            }
        }
        c += LANES;
    }
    // dot's tree for the four at once: lanes l + 8 onto l, then l + 4, l + 2 and l + 1.
    let v = [0, 1, 2, 3].map(|t| {
        let s = _mm256_add_ps(lo[t], hi[t]);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    });
    // [v0₀ + v0₂, v0₁ + v0₃, v1₀ + v1₂, v1₁ + v1₃], and the same for v2, v3.
    let w01 = _mm_add_ps(_mm_movelh_ps(v[0], v[1]), _mm_movehl_ps(v[1], v[0]));
    let w23 = _mm_add_ps(_mm_movelh_ps(v[2], v[3]), _mm_movehl_ps(v[3], v[2]));
    let sums = _mm_add_ps(
        _mm_shuffle_ps::<0b10_00_10_00>(w01, w23),
        _mm_shuffle_ps::<0b11_01_11_01>(w01, w23),
    );
    let mut out = [0f32; 4];
    // SAFETY: out holds 4 floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    for t in 0..4 {
        let tail: f32 = a[whole..]
            .iter()
            .zip(&b[t][whole..])
            .map(|(x, y)| x * y)
            .sum();
        out[t] += tail;
    }
    out
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

    #[test]
    fn dot4_is_four_dots_bit_for_bit() {
        let v = |seed: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 37.0)
                .collect()
        };
        for n in [0, 1, 15, 16, 17, 64, 70, 128, 513] {
            let a = v(1, n);
            let b = [v(2, n), v(3, n + 5), v(4, n), v(5, n)];
            let tile = [&b[0][..], &b[1], &b[2], &b[3]];
            let mut got = vec![dot4(&a, tile)];
            #[cfg(target_arch = "x86_64")]
            if Simd::available().contains(&Simd::Avx2) {
                // SAFETY: the CPU has AVX2 and FMA.
                got.push(unsafe { dot4_avx2(&a, tile) });
            }
            for got in got {
                for t in 0..4 {
                    assert_eq!(
                        got[t].to_bits(),
                        dot(&a, &b[t][..n]).to_bits(),
                        "n {n} t {t}"
                    );
                }
            }
        }
    }
}
