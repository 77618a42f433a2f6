//! The arithmetic of an int8 [`super::Linear`]: an f32 product of activations by constant weights,
//! carried out in 8-bit integers (issue 18's precision lever; `tools/precision-probe` measured
//! the recipe and its agreement with f32 before it was built).
//!
//! - Weights per output column in 7 bits (|w| ≤ 63 after scaling by the column's largest),
//!   so that AVX2's `vpmaddubsw`, which adds two u8 × i8 products into a saturating i16,
//!   never saturates: 2 · 255 · 63 < 32767. Packed at load into panels of 16 columns,
//!   `[K/4][16][4]`, so that one k-quad of a panel is two 32-byte loads.
//! - Activations per row (per token) in 8 bits, scaled by the row's largest and stored offset
//!   by 128 as u8 (`vpmaddubsw` multiplies unsigned by signed bytes). The offset comes back
//!   out through the columns' weight sums, `128 · Σ_k w`, computed at packing.
//! - A 6 × 16 tile of i32 accumulators over all of K, then `(acc − 128 Σw) · s_row · s_col`
//!   (+ bias) in f32.
//!
//! The integer sums are exact, and the quantisation and the dequantisation are the same
//! Rust code on every tier (the compiler vectorises them; no fused multiply-add is ever
//! formed implicitly), so every tier returns the same bits: only the tile's inner loop
//! differs (AVX2 intrinsics, or a portable loop). AVX-512 CPUs run the AVX2 tile; their
//! 512-bit `vpmaddubsw` (and VNNI's `vpdpbusd`) are not used, as no such CPU was at hand to
//! measure them.

use crate::simd::Simd;

/// Rows of a tile (the integer attention's tile too).
pub(super) const MR: usize = 6;
/// Columns of a tile, and of a packed panel.
pub(super) const NR: usize = 16;
/// Rows per block: a block's quantised activations (96 × K bytes) stay in L2 while every
/// panel of the weights streams past them.
const ROWS_PER_BLOCK: usize = 16 * MR;
/// Largest weight magnitude after scaling (7 bits: see the module comment).
const WEIGHT_MAX: f32 = 63.0;

/// Constant weights `[K, N]` (row-major), quantised and packed.
#[derive(Debug, Clone)]
pub struct QuantWeights {
    k: usize,
    n: usize,
    /// K rounded up to whole k-quads.
    kp: usize,
    /// `[N/16][K/4][16][4]`, zero where padded.
    panels: Vec<i8>,
    /// Per column (padded to whole panels): the weight's scale, and 128 · Σ_k of its 7-bit
    /// values.
    scale: Vec<f32>,
    offset: Vec<i32>,
}

impl PartialEq for QuantWeights {
    fn eq(&self, other: &Self) -> bool {
        let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.k == other.k
            && self.n == other.n
            && self.panels == other.panels
            && self.offset == other.offset
            && bits(&self.scale) == bits(&other.scale)
    }
}

impl Eq for QuantWeights {}

impl QuantWeights {
    /// Quantises `w`, `[k, n]` row-major, column by column.
    pub fn pack(w: &[f32], k: usize, n: usize) -> QuantWeights {
        assert_eq!(w.len(), k * n, "weights of {k} × {n}");
        let kp = k.next_multiple_of(4);
        let np = n.next_multiple_of(NR);
        let mut panels = vec![0i8; kp * np];
        let mut scale = vec![0f32; np];
        let mut offset = vec![0i32; np];
        for c in 0..n {
            let largest = (0..k).fold(0f32, |m, i| m.max(w[i * n + c].abs()));
            let s = if largest > 0.0 && largest.is_finite() {
                largest / WEIGHT_MAX
            } else {
                1.0
            };
            let mut sum = 0i32;
            let base = (c / NR) * kp * NR + (c % NR) * 4;
            for i in 0..k {
                let q = (w[i * n + c] / s).round().clamp(-WEIGHT_MAX, WEIGHT_MAX) as i32;
                panels[base + (i / 4) * NR * 4 + i % 4] = q as i8;
                sum += q;
            }
            scale[c] = s;
            offset[c] = 128 * sum;
        }
        QuantWeights {
            k,
            n,
            kp,
            panels,
            scale,
            offset,
        }
    }

    /// Inner (contracted) length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// What the packed form holds in memory.
    pub fn bytes(&self) -> usize {
        self.panels.len() + 4 * (self.scale.len() + self.offset.len())
    }

    /// `out[m, n] = a[m, k] · w (+ bias[n])`, `m = a.len() / k`, on `simd`'s tile.
    ///
    /// Panics if the lengths disagree, or if this CPU does not run `simd`.
    pub fn product(&self, simd: Simd, a: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        assert_eq!(
            a.len() % self.k.max(1),
            0,
            "activations of {} by {}",
            a.len(),
            self.k
        );
        let m = a.len().checked_div(self.k).unwrap_or(0);
        assert_eq!(out.len(), m * self.n, "output of {m} × {}", self.n);
        assert!(bias.is_none_or(|b| b.len() == self.n));
        assert!(simd <= Simd::detect(), "{} on this CPU", simd.name());
        match simd {
            Simd::Portable => product::<Portable>(self, a, m, bias, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: this CPU runs AVX2 (asserted above; AVX-512 implies it).
            Simd::Avx2 | Simd::Avx512 => unsafe { product_avx2(self, a, m, bias, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => product::<Portable>(self, a, m, bias, out),
        }
    }
}

/// One tile: `acc[r][c] = Σ_k a[r][k] · panel[k][c]`, the activations u8 rows `lda` apart.
trait Tile {
    /// # Safety
    /// `a` holds `MR` rows of `4 · quads` bytes, `lda` apart; `panel` holds `quads · 64`
    /// bytes; the CPU runs the tile's instructions.
    unsafe fn tile(a: *const u8, lda: usize, panel: *const i8, quads: usize) -> [[i32; NR]; MR];
}

struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile(a: *const u8, lda: usize, panel: *const i8, quads: usize) -> [[i32; NR]; MR] {
        let mut acc = [[0i32; NR]; MR];
        for q in 0..quads {
            // SAFETY: within the bounds the caller promised.
            let b = unsafe { std::slice::from_raw_parts(panel.add(q * NR * 4), NR * 4) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { std::slice::from_raw_parts(a.add(r * lda + q * 4), 4) };
                for (c, acc) in acc.iter_mut().enumerate() {
                    let w = &b[c * 4..c * 4 + 4];
                    *acc += (0..4).map(|j| x[j] as i32 * w[j] as i32).sum::<i32>();
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx2 {
    #[inline(always)]
    unsafe fn tile(a: *const u8, lda: usize, panel: *const i8, quads: usize) -> [[i32; NR]; MR] {
        // SAFETY: as the trait says.
        unsafe { tile_avx2(a, lda, panel, quads) }
    }
}

/// Per k-quad: the panel's 16 columns × 4 bytes in two registers, each row's four
/// activation bytes broadcast, `vpmaddubsw` (pairs into i16) then `vpmaddwd` by ones (pairs
/// of those into i32), added into 12 accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(a: *const u8, lda: usize, panel: *const i8, quads: usize) -> [[i32; NR]; MR] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for q in 0..quads {
        // SAFETY: within the bounds the caller promised; unaligned loads.
        unsafe {
            let b0 = _mm256_loadu_si256(panel.add(q * 64) as *const __m256i);
            let b1 = _mm256_loadu_si256(panel.add(q * 64 + 32) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = (a.add(r * lda + q * 4) as *const i32).read_unaligned();
                let x = _mm256_set1_epi32(x);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones);
                acc[0] = _mm256_add_epi32(acc[0], p0);
                acc[1] = _mm256_add_epi32(acc[1], p1);
            }
        }
    }
    // SAFETY: this function's target features are the callee's.
    unsafe { accumulators_avx2(&acc) }
}

/// A tile's accumulators (two registers of eight i32 per row) as plain integers: the AVX2
/// tiles' last step, here and in `attention_int8.rs`.
///
/// # Safety
/// The CPU runs AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn accumulators_avx2(
    acc: &[[std::arch::x86_64::__m256i; 2]; MR],
) -> [[i32; NR]; MR] {
    use std::arch::x86_64::*;
    let mut out = [[0i32; NR]; MR];
    for (o, acc) in out.iter_mut().zip(acc) {
        // SAFETY: 16 i32 = two 256-bit stores into the row.
        unsafe {
            _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, acc[0]);
            _mm256_storeu_si256(o.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
        }
    }
    out
}

/// The whole product on AVX2: [`product`] compiled with AVX2 so that its quantisation and
/// dequantisation loops vectorise to 8 lanes too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_avx2(
    w: &QuantWeights,
    a: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    product::<Avx2>(w, a, m, bias, out)
}

#[inline(always)]
fn product<T: Tile>(w: &QuantWeights, a: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let (k, n, kp) = (w.k, w.n, w.kp);
    if m == 0 || n == 0 {
        return;
    }
    // Whole tiles of rows; the rows past `m` (and the columns past `k`) are activation 0.
    let mp = m.next_multiple_of(MR);
    let mut aq = vec![128u8; mp * kp];
    let mut row_scale = vec![0f32; mp];
    for r in 0..m {
        row_scale[r] = quantise_row(&a[r * k..(r + 1) * k], &mut aq[r * kp..r * kp + k]);
    }
    let panels = n.div_ceil(NR);
    for r0 in (0..mp).step_by(ROWS_PER_BLOCK) {
        let r1 = (r0 + ROWS_PER_BLOCK).min(mp);
        for p in 0..panels {
            let panel = &w.panels[p * kp * NR..(p + 1) * kp * NR];
            let c0 = p * NR;
            let cols = NR.min(n - c0);
            for r in (r0..r1).step_by(MR) {
                // SAFETY: `aq` holds rows r..r + MR of `kp` bytes (mp is whole tiles), the
                // panel `kp / 4` quads of 64 bytes; `product`'s callers checked the CPU.
                let acc = unsafe { T::tile(aq[r * kp..].as_ptr(), kp, panel.as_ptr(), kp / 4) };
                for (i, acc) in acc.iter().enumerate().take(m.saturating_sub(r).min(MR)) {
                    let row = &mut out[(r + i) * n + c0..(r + i) * n + c0 + cols];
                    dequantise(
                        acc,
                        row_scale[r + i],
                        &w.scale[c0..c0 + cols],
                        &w.offset[c0..c0 + cols],
                        bias.map(|b| &b[c0..c0 + cols]),
                        row,
                    );
                }
            }
        }
    }
}

/// One row into u8 offset by 128, scaled by its largest magnitude; returns the scale.
#[inline(always)]
fn quantise_row(a: &[f32], out: &mut [u8]) -> f32 {
    // Eight running maxima, so that the compiler keeps them in one vector.
    let mut lanes = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l = l.max(x.abs());
        }
    }
    let largest = rest
        .iter()
        .fold(lanes.iter().fold(0f32, |m, &l| m.max(l)), |m, x| {
            m.max(x.abs())
        });
    let scale = if largest > 0.0 && largest.is_finite() {
        largest / 127.0
    } else {
        1.0
    };
    let inv = 1.0 / scale;
    // Round to nearest even by the 1.5 · 2^23 trick (exact below 2^22; here |x| ≤ 127), which
    // vectorises on every tier where `round_ties_even` would call libm on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    for (o, &x) in out.iter_mut().zip(a) {
        let q = (x * inv + ROUND) - ROUND;
        *o = (q as i32 + 128).clamp(0, 255) as u8;
    }
    scale
}

#[inline(always)]
fn dequantise(
    acc: &[i32; NR],
    row_scale: f32,
    scale: &[f32],
    offset: &[i32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    match bias {
        Some(bias) => {
            for c in 0..out.len() {
                out[c] = (acc[c] - offset[c]) as f32 * (row_scale * scale[c]) + bias[c];
            }
        }
        None => {
            for c in 0..out.len() {
                out[c] = (acc[c] - offset[c]) as f32 * (row_scale * scale[c]);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Values in `[-amp, amp)` from a xorshift generator seeded by `seed` (the f32 kernel's
    /// tests use them too).
    pub(in crate::model::fuse) fn random(len: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * amp
            })
            .collect()
    }

    /// Against the f64 product: every output within a few quantisation steps of the row's
    /// and column's scales, for shapes with partial tiles, quads and panels.
    #[test]
    fn every_tier_agrees_with_f64_within_quantisation_and_bit_for_bit_with_each_other() {
        for (m, k, n) in [
            (1, 4, 16),
            (7, 37, 21),
            (13, 64, 48),
            (100, 130, 33),
            (97, 512, 40),
        ] {
            let a = random(m * k, 1 + m as u64, 3.0);
            let w = random(k * n, 2 + k as u64, 0.1);
            let bias = random(n, 3, 1.0);
            let q = QuantWeights::pack(&w, k, n);
            let mut first: Option<Vec<f32>> = None;
            for simd in Simd::available() {
                let mut out = vec![f32::NAN; m * n];
                q.product(simd, &a, Some(&bias), &mut out);
                for r in 0..m {
                    for c in 0..n {
                        let exact: f64 = (0..k)
                            .map(|i| a[r * k + i] as f64 * w[i * n + c] as f64)
                            .sum::<f64>()
                            + bias[c] as f64;
                        let magnitude: f64 = (0..k)
                            .map(|i| (a[r * k + i] * w[i * n + c]).abs() as f64)
                            .sum();
                        let err = (out[r * n + c] as f64 - exact).abs();
                        // 7-bit weights and 8-bit activations: a relative error of ~1% of
                        // the sum of magnitudes at most, far less on average.
                        assert!(
                            err <= 0.02 * magnitude + 1e-6,
                            "{} {m}×{k}×{n} [{r},{c}]: {} against {exact}",
                            simd.name(),
                            out[r * n + c]
                        );
                    }
                }
                match &first {
                    None => first = Some(out),
                    Some(f) => assert!(
                        f.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{} differs from {}",
                        simd.name(),
                        Simd::Portable.name()
                    ),
                }
            }
        }
    }

    #[test]
    fn a_zero_row_gives_zeros_and_a_rows_largest_value_is_kept() {
        let (k, n) = (8, 16);
        let mut a = vec![0f32; 2 * k];
        a[k] = -2.0; // the second row: its largest is -2, quantised to exactly -127
        let w: Vec<f32> = (0..k * n)
            .map(|i| if i % n == 3 { 0.5 } else { 0.0 })
            .collect();
        let q = QuantWeights::pack(&w, k, n);
        for simd in Simd::available() {
            let mut out = vec![f32::NAN; 2 * n];
            q.product(simd, &a, None, &mut out);
            assert!(out[..n].iter().all(|&x| x == 0.0), "{}", simd.name());
            assert!(
                (out[n + 3] + 1.0).abs() < 1e-6,
                "{}: {}",
                simd.name(),
                out[n + 3]
            );
        }
    }
}
