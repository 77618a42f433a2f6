//! Attention's weighted sum in integers, for int8 packages (`precision = "int8"`): the
//! scores and the softmax stay f32 (`attention_kernel.rs` computes them, every tier), and
//! the product of the weights by the values runs in 16-bit integers with exact i32 sums.
//!
//! - Values per channel in 8 bits (|v| ≤ 127 after scaling by the channel's largest over the
//!   row's keys), packed once per row and head into panels of 16 channels, `[S/2][16][2]`.
//! - Each weight `e^(s − max)` (in [0, 1], the row's largest exactly 1) as
//!   `round(w_max · e)` in i16, `w_max` as large as keeps every sum exact in i32
//!   (`(2^31 − 1) / (127 · S)`, at most 32,767): 14 bits at S = 1,024. Weights in 8 bits were
//!   tried first: on the shipped model they moved a pbmc68k_reduced cell across the
//!   confidence threshold (small weights round to nothing at 8 bits, and at long S there are
//!   many of them).
//! - AVX2's `vpmaddwd` multiplies 16-bit pairs and adds each pair into i32: as many products
//!   per instruction as `vpmaddubsw` + `vpmaddwd` give for bytes, with no saturation.
//! - The sum is divided by the sum of the integer weights themselves, so that the weights it
//!   uses add up to exactly 1.
//!
//! The integer sums are exact and every float step here is the same Rust code on every tier,
//! so the same weights give the same bits on every tier (the weights themselves come from the
//! f32 softmax, whose tiers differ by rounding). Rows of weights gather until a block is full
//! (or the head ends) so that the tiles run over whole blocks; memory per worker is one block
//! of weights, O(block · S), and one head's packed values.

// A tile is `MR` rows by `NR` channels, as the int8 products' (a panel packs `NR` channels).
use super::int8_kernel::{MR, NR};
use crate::simd::Simd;

/// Queries per block of the weighted sum.
const BLOCK: usize = 8 * MR;
/// Largest value magnitude after scaling (8 bits).
const VALUE_MAX: f32 = 127.0;
/// Most keys the integer sum takes: beyond, `w_max` would fall under 8 bits.
pub(super) const MAX_KEYS: usize = 65_536;

/// One worker's integer weighted sum: the head's packed values and a block of weight rows.
pub(super) struct IntegerSum {
    simd: Simd,
    /// Keys of the head, that rounded up to pairs, and the channels.
    keys: usize,
    stride: usize,
    width: usize,
    /// `[channels / 16][stride / 2][16][2]`, zero where padded.
    values: Vec<i16>,
    /// Per channel (padded to whole panels): the value's scale, and its inverse.
    value_scale: Vec<f32>,
    value_inv: Vec<f32>,
    /// What a weight of 1 becomes.
    weight_max: f32,
    /// `[BLOCK][stride]`: a gathered row's weights, zero past `keys`.
    weights: Vec<i16>,
    /// Per gathered row: 1 / the sum of its integer weights, and where its output starts.
    scale: Vec<f32>,
    at: Vec<usize>,
}

impl IntegerSum {
    pub(super) fn new() -> IntegerSum {
        IntegerSum {
            simd: Simd::Portable,
            keys: 0,
            stride: 0,
            width: 0,
            values: Vec::new(),
            value_scale: Vec::new(),
            value_inv: Vec::new(),
            weight_max: 0.0,
            weights: Vec::new(),
            scale: Vec::with_capacity(BLOCK),
            at: Vec::with_capacity(BLOCK),
        }
    }

    /// Starts a head of `keys` keys (at most [`MAX_KEYS`]) whose value rows `value(j)` are
    /// `width` wide, on `simd`'s tile (one this CPU runs).
    pub(super) fn start<'a>(
        &mut self,
        simd: Simd,
        keys: usize,
        width: usize,
        value: impl Fn(usize) -> &'a [f32],
    ) {
        assert!(keys <= MAX_KEYS, "{keys} keys");
        debug_assert!(self.at.is_empty(), "a block left unwritten");
        self.simd = simd;
        self.keys = keys;
        self.stride = keys.next_multiple_of(2);
        self.width = width;
        let wp = width.next_multiple_of(NR);
        // Each channel's largest magnitude, then its scale (1 where padded or all zero).
        self.value_scale.clear();
        self.value_scale.resize(wp, 0.0);
        for j in 0..keys {
            for (l, v) in self.value_scale.iter_mut().zip(&value(j)[..width]) {
                *l = l.max(v.abs());
            }
        }
        self.value_inv.clear();
        for s in self.value_scale.iter_mut() {
            *s = if *s > 0.0 && s.is_finite() {
                *s / VALUE_MAX
            } else {
                1.0
            };
            self.value_inv.push(1.0 / *s);
        }
        self.values.clear();
        self.values.resize(wp * self.stride, 0);
        let panel = self.stride * NR;
        for j in 0..keys {
            let at = (j / 2) * NR * 2 + j % 2;
            for (c, (&v, &inv)) in value(j)[..width].iter().zip(&self.value_inv).enumerate() {
                self.values[(c / NR) * panel + at + (c % NR) * 2] =
                    round(v * inv, VALUE_MAX) as i16;
            }
        }
        // Exact i32 sums: each of `stride` products is at most w_max · 127.
        let exact = (i32::MAX as usize / (VALUE_MAX as usize * self.stride.max(1))) as f32;
        self.weight_max = exact.min(i16::MAX as f32);
        // Kept from head to head: `push` writes every byte a row's sums read.
        if self.weights.len() < BLOCK * self.stride {
            self.weights.resize(BLOCK * self.stride, 0);
        }
    }

    /// Adds one query's unnormalised weights (`keys` of them, in [0, 1]), whose output row
    /// starts at `out[at]`; writes the block out when it is full.
    pub(super) fn push(&mut self, weights: &[f32], at: usize, out: &mut [f32]) {
        let r = self.at.len();
        let (row, pad) = self.weights[r * self.stride..][..self.stride].split_at_mut(self.keys);
        pad.fill(0);
        let weights = &weights[..self.keys];
        let sum = match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `start` was given a tier this CPU runs.
            Simd::Avx2 | Simd::Avx512 => unsafe { to_integers_avx2(weights, self.weight_max, row) },
            _ => to_integers(weights, self.weight_max, row),
        };
        self.scale.push(1.0 / sum as f32);
        self.at.push(at);
        if self.at.len() == BLOCK {
            self.finish(out);
        }
    }

    /// Writes out the rows gathered so far.
    pub(super) fn finish(&mut self, out: &mut [f32]) {
        if self.at.is_empty() {
            return;
        }
        match self.simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `push`.
            Simd::Avx2 | Simd::Avx512 => unsafe { self.sum_avx2(out) },
            _ => self.sum::<Portable>(out),
        }
        self.scale.clear();
        self.at.clear();
    }

    /// # Safety
    /// The CPU runs AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_avx2(&self, out: &mut [f32]) {
        self.sum::<Avx2>(out)
    }

    #[inline(always)]
    fn sum<T: Tile>(&self, out: &mut [f32]) {
        let rows = self.at.len();
        let panel = self.stride * NR;
        for p in 0..self.width.div_ceil(NR) {
            let (c0, cols) = (p * NR, NR.min(self.width - p * NR));
            let values = &self.values[p * panel..][..panel];
            let scale = &self.value_scale[c0..c0 + NR];
            for r in (0..rows).step_by(MR) {
                // SAFETY: `weights` holds BLOCK (a multiple of MR) rows of `stride` values,
                // the panel `stride / 2` pairs of 32; `start` was given a tier this CPU runs.
                // Rows past `rows` hold stale weights (or zeros) whose sums are not written.
                let acc = unsafe {
                    T::tile(
                        self.weights[r * self.stride..].as_ptr(),
                        self.stride,
                        values.as_ptr(),
                        self.stride / 2,
                    )
                };
                for (i, acc) in acc.iter().enumerate().take((rows - r).min(MR)) {
                    let row_scale = self.scale[r + i];
                    let o = &mut out[self.at[r + i] + c0..][..cols];
                    for c in 0..cols {
                        o[c] = acc[c] as f32 * (row_scale * scale[c]);
                    }
                }
            }
        }
    }
}

/// `x` rounded to the nearest integer (ties to even) within ±`max` (< 2^22): 1.5 · 2^23
/// added holds it in the low mantissa bits, integer steps where a float-to-int conversion
/// would not vectorise.
#[inline(always)]
fn round(x: f32, max: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    (x.clamp(-max, max) + ROUND)
        .to_bits()
        .wrapping_sub(ROUND.to_bits()) as i32
}

/// [`to_integers`] compiled with AVX2.
///
/// # Safety
/// The CPU runs AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn to_integers_avx2(weights: &[f32], max: f32, out: &mut [i16]) -> u32 {
    to_integers(weights, max, out)
}

/// Weights in [0, 1] as `round(max · w)`; returns their sum. One plain loop, which the
/// compiler vectorises for the caller's target features.
#[inline(always)]
fn to_integers(weights: &[f32], max: f32, out: &mut [i16]) -> u32 {
    let mut sum = 0u32;
    for (o, &w) in out.iter_mut().zip(weights) {
        let q = round(w * max, max);
        *o = q as i16;
        sum += q as u32;
    }
    sum
}

/// One tile: `acc[r][c] = Σ_k a[r][k] · panel[k][c]`, the weight rows `lda` apart.
trait Tile {
    /// # Safety
    /// `a` holds `MR` rows of `2 · pairs` values, `lda` apart; `panel` holds `pairs · 32`
    /// values; the CPU runs the tile's instructions.
    unsafe fn tile(a: *const i16, lda: usize, panel: *const i16, pairs: usize) -> [[i32; NR]; MR];
}

struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile(a: *const i16, lda: usize, panel: *const i16, pairs: usize) -> [[i32; NR]; MR] {
        let mut acc = [[0i32; NR]; MR];
        for p in 0..pairs {
            // SAFETY: within the bounds the caller promised.
            let b = unsafe { std::slice::from_raw_parts(panel.add(p * NR * 2), NR * 2) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { std::slice::from_raw_parts(a.add(r * lda + p * 2), 2) };
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc += x[0] as i32 * b[c * 2] as i32 + x[1] as i32 * b[c * 2 + 1] as i32;
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
    unsafe fn tile(a: *const i16, lda: usize, panel: *const i16, pairs: usize) -> [[i32; NR]; MR] {
        // SAFETY: as the trait says.
        unsafe { tile_avx2(a, lda, panel, pairs) }
    }
}

/// Per pair of keys: the panel's 16 channels × 2 values in two registers, each row's two
/// weights broadcast, `vpmaddwd` (the pair's products added into i32), added into 12
/// accumulators: 15 registers, no spill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(a: *const i16, lda: usize, panel: *const i16, pairs: usize) -> [[i32; NR]; MR] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for p in 0..pairs {
        // SAFETY: within the bounds the caller promised; unaligned loads.
        unsafe {
            let b0 = _mm256_loadu_si256(panel.add(p * 32) as *const __m256i);
            let b1 = _mm256_loadu_si256(panel.add(p * 32 + 16) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = (a.add(r * lda + p * 2) as *const i32).read_unaligned();
                let x = _mm256_set1_epi32(x);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, b0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, b1));
            }
        }
    }
    // SAFETY: this function's target features are the callee's.
    unsafe { super::int8_kernel::accumulators_avx2(&acc) }
}

#[cfg(test)]
mod tests {
    use super::super::attention_kernel::{attend, attend_int8, Dims};
    use super::MAX_KEYS;
    use crate::simd::Simd;

    /// At the most keys the integer sum takes, every weight 1 and every value the largest:
    /// the i32 sums are at their largest and must not wrap. One key more and the f32 sum
    /// runs instead, bit for bit.
    #[test]
    fn the_sums_stay_exact_up_to_the_most_keys_and_f32_takes_over_beyond() {
        for simd in Simd::available() {
            for sk in [MAX_KEYS, MAX_KEYS + 1] {
                let d = Dims {
                    n: 1,
                    sq: 1,
                    sk,
                    heads: 1,
                    head_dim: 16,
                };
                // Queries of 0: every score 0, every weight 1.
                let q = vec![0f32; d.q_len()];
                let k = vec![1f32; d.kv_len()];
                let v: Vec<f32> = (0..d.kv_len()).map(|i| [3.0, -2.0][i % 2]).collect();
                let mask = vec![0f32; d.mask_len()];
                let mut int8 = vec![f32::NAN; d.q_len()];
                attend_int8(simd, d, &q, &k, &v, &mask, &mut int8);
                let mut f32 = vec![f32::NAN; d.q_len()];
                attend(simd, d, &q, &k, &v, &mask, &mut f32);
                if sk > MAX_KEYS {
                    assert_eq!(int8, f32, "{} beyond {MAX_KEYS} keys", simd.name());
                } else {
                    for (c, x) in int8.iter().enumerate() {
                        let want = [3.0, -2.0][c % 2];
                        assert!((x - want).abs() < 1e-5, "{} channel {c}: {x}", simd.name());
                    }
                }
            }
        }
    }
}
