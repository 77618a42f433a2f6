//! The tokenizer's two per-entry loops, in portable Rust and, on x86-64 CPUs that have it, in
//! AVX2 chosen at run time (the binary itself targets plain x86-64).
//!
//! - [`select_in_vocab`]: keep a cell's non-zero, in-vocabulary entries (token id and count),
//!   in input order, and count its coverage;
//! - [`seeded_bins`]: the default tie mode's bin for every kept count of a cell whose counts
//!   are all below [`SMALL`].
//!
//! Both versions compute the same integers: the AVX2 loops are the scalar ones eight entries
//! at a time (a gather for each table lookup, a permute for the compaction, the hash and the
//! multiply-shift in 32-bit lanes), so their output is bit-identical, which the tests below
//! check on random cells.

use std::mem::MaybeUninit;

use super::binning::SMALL;
use super::tokenizer::CellCoverage;
use super::vocab::NOT_IN_VOCAB;
use crate::simd::Simd;

/// Room past a cell's entries that [`select_in_vocab`]'s output buffers must have: the AVX2
/// loop stores eight lanes at the cursor and advances it only by the kept ones.
pub const SELECT_SLACK: usize = 8;

/// What [`select_in_vocab`] found in a cell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Selected {
    pub coverage: CellCoverage,
    /// The largest kept count (0 when none is kept), so that binning need not look for it.
    pub max_count: u32,
}

/// A cell's kept entries, at the front of `tokens` and `kept` (each at least
/// `gene_idx.len() + SELECT_SLACK` long; what lies past the kept ones is scratch). `tokens`
/// may be uninitialised (a `Vec`'s spare capacity): the first `coverage.n_in_vocab` of it are
/// written, which is what lets the caller `set_len` over them.
///
/// Panics if a gene index is outside `token_of_gene`, as indexing would: the batch readers
/// validate indices, so this is a bug, never bad input.
pub fn select_in_vocab(
    kernels: Simd,
    gene_idx: &[u32],
    counts: &[u32],
    token_of_gene: &[u32],
    tokens: &mut [MaybeUninit<u32>],
    kept: &mut [u32],
) -> Selected {
    assert_eq!(gene_idx.len(), counts.len());
    assert!(tokens.len() >= gene_idx.len() + SELECT_SLACK);
    assert!(kept.len() >= gene_idx.len() + SELECT_SLACK);
    assert!(kernels <= Simd::detect(), "{} on this CPU", kernels.name());
    match kernels {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU runs the tier (asserted above), which has AVX2 and POPCNT; the
        // lengths the function relies on are asserted above.
        Simd::Avx2 | Simd::Avx512 => unsafe {
            avx2::select(gene_idx, counts, token_of_gene, tokens, kept)
        },
        _ => select_scalar(gene_idx, counts, token_of_gene, tokens, kept),
    }
}

/// Appends the seeded bin of every count (all below [`SMALL`]) to `values`; `lut` is the
/// cell's packed digit table (`left | right << 16`), `key` the cell's hash key.
pub fn seeded_bins(
    kernels: Simd,
    lut: &[u32; SMALL],
    counts: &[u32],
    key: u32,
    values: &mut Vec<f32>,
) {
    assert!(kernels <= Simd::detect(), "{} on this CPU", kernels.name());
    match kernels {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `select_in_vocab`; the gather indices are masked below SMALL.
        Simd::Avx2 | Simd::Avx512 => unsafe { avx2::seeded_bins(lut, counts, key, values) },
        _ => seeded_bins_scalar(lut, counts, key, values),
    }
}

/// Branch-free: every entry is written, the cursor advances only for kept ones.
fn select_scalar(
    gene_idx: &[u32],
    counts: &[u32],
    token_of_gene: &[u32],
    tokens: &mut [MaybeUninit<u32>],
    kept_counts: &mut [u32],
) -> Selected {
    let mut cov = CellCoverage::default();
    let (mut k, mut max_count) = (0, 0);
    for (&g, &c) in gene_idx.iter().zip(counts) {
        let t = token_of_gene[g as usize];
        tokens[k] = MaybeUninit::new(t);
        kept_counts[k] = c;
        let expressed = c != 0;
        cov.n_genes += expressed as u32;
        cov.total_counts += c as u64;
        let kept = expressed & (t != NOT_IN_VOCAB);
        let kept_count = if kept { c } else { 0 };
        cov.counts_in_vocab += kept_count as u64;
        max_count = max_count.max(kept_count);
        k += kept as usize;
    }
    cov.n_in_vocab = k as u32;
    Selected {
        coverage: cov,
        max_count,
    }
}

/// Seeded tie breaking: a uniform pick from scGPT's allowed set `right+1 ..= left`, from a
/// counter-based hash of (cell key, entry index) — no sequential generator state, so the loop
/// has no branch and no dependency between entries. Where `left == right` the pick is `left`.
/// The multiply-shift maps 32 random bits onto `left - right ≤ 50` choices with a bias below
/// 50 / 2^32 (invisible next to scGPT's own float rounding of `ceil(u*(r-l)+l)`).
#[inline(always)]
pub fn seeded_bin(left: u32, right: u32, key: u32, i: u32) -> u32 {
    let h = fmix32(key ^ i.wrapping_mul(GOLDEN));
    left - ((h as u64 * (left - right) as u64) >> 32) as u32
}

const GOLDEN: u32 = 0x9e37_79b9;
const FMIX1: u32 = 0x85eb_ca6b;
const FMIX2: u32 = 0xc2b2_ae35;

/// murmur3's 32-bit finaliser: a bijection with full avalanche.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX2);
    h ^ (h >> 16)
}

#[inline(always)]
fn seeded_bin_packed(packed: u32, key: u32, i: u32) -> f32 {
    seeded_bin(packed & 0xffff, packed >> 16, key, i) as f32
}

fn seeded_bins_scalar(lut: &[u32; SMALL], counts: &[u32], key: u32, values: &mut Vec<f32>) {
    values.extend(
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| seeded_bin_packed(lut[c as usize % SMALL], key, i as u32)),
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{CellCoverage, Selected, FMIX1, FMIX2, GOLDEN, NOT_IN_VOCAB, SMALL};

    /// For each 8-bit keep mask, the lanes to move to the front, in order (`vpermd` indices).
    static COMPRESS: [[u32; 8]; 256] = compress_table();

    const fn compress_table() -> [[u32; 8]; 256] {
        let mut table = [[0u32; 8]; 256];
        let mut mask = 0;
        while mask < 256 {
            let (mut lane, mut to) = (0, 0);
            while lane < 8 {
                if mask >> lane & 1 == 1 {
                    table[mask][to] = lane as u32;
                    to += 1;
                }
                lane += 1;
            }
            mask += 1;
        }
        table
    }

    /// # Safety
    /// Eight u32 readable at `p`; AVX2 (the caller's target features).
    #[inline(always)]
    unsafe fn load(p: *const u32) -> __m256i {
        // SAFETY: the caller's.
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    /// `acc` (four u64 lanes) plus the eight u32 lanes of `v`.
    ///
    /// # Safety
    /// AVX2 (the caller's target features).
    #[inline(always)]
    unsafe fn add_widened(acc: __m256i, v: __m256i) -> __m256i {
        let lo = _mm256_cvtepu32_epi64(_mm256_castsi256_si128(v));
        let hi = _mm256_cvtepu32_epi64(_mm256_extracti128_si256::<1>(v));
        _mm256_add_epi64(acc, _mm256_add_epi64(lo, hi))
    }

    /// # Safety
    /// AVX2 (the caller's target features).
    #[inline(always)]
    unsafe fn sum_u64(v: __m256i) -> u64 {
        let mut lanes = [0u64; 4];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
        lanes.iter().sum()
    }

    /// # Safety
    /// AVX2 (the caller's target features).
    #[inline(always)]
    unsafe fn max_u32(v: __m256i) -> u32 {
        let mut lanes = [0u32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
        lanes.into_iter().max().unwrap_or(0)
    }

    /// `select_scalar`, eight entries at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and POPCNT; `tokens` and `kept` hold `gene_idx.len() + 8`.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn select(
        gene_idx: &[u32],
        counts: &[u32],
        token_of_gene: &[u32],
        tokens: &mut [MaybeUninit<u32>],
        kept: &mut [u32],
    ) -> Selected {
        let n = gene_idx.len();
        if n == 0 {
            return Selected::default();
        }
        assert!(!token_of_gene.is_empty() && token_of_gene.len() <= i32::MAX as usize);
        // Gather indices are clamped into the table, so a bad index cannot read outside it;
        // the largest index seen is checked after the loop, and panics as indexing would.
        let last = _mm256_set1_epi32(token_of_gene.len() as i32 - 1);
        let zero = _mm256_setzero_si256();
        let not_in_vocab = _mm256_set1_epi32(NOT_IN_VOCAB as i32);
        let (mut max_gene, mut max_count, mut total, mut in_vocab) = (zero, zero, zero, zero);
        let (mut k, mut expressed, mut i) = (0usize, 0u32, 0usize);
        while i + 8 <= n {
            let g = load(gene_idx.as_ptr().add(i));
            let c = load(counts.as_ptr().add(i));
            max_gene = _mm256_max_epu32(max_gene, g);
            let t = _mm256_i32gather_epi32::<4>(
                token_of_gene.as_ptr() as *const i32,
                _mm256_min_epu32(g, last),
            );
            let zero_count = _mm256_cmpeq_epi32(c, zero);
            let drop = _mm256_or_si256(zero_count, _mm256_cmpeq_epi32(t, not_in_vocab));
            let keep = !_mm256_movemask_ps(_mm256_castsi256_ps(drop)) as usize & 0xff;
            expressed += 8 - _mm256_movemask_ps(_mm256_castsi256_ps(zero_count)).count_ones();
            let order = load(COMPRESS[keep].as_ptr());
            let to = tokens.as_mut_ptr().add(k) as *mut __m256i;
            _mm256_storeu_si256(to, _mm256_permutevar8x32_epi32(t, order));
            let to = kept.as_mut_ptr().add(k) as *mut __m256i;
            _mm256_storeu_si256(to, _mm256_permutevar8x32_epi32(c, order));
            k += keep.count_ones() as usize;
            let kept_count = _mm256_andnot_si256(drop, c);
            max_count = _mm256_max_epu32(max_count, kept_count);
            total = add_widened(total, c);
            in_vocab = add_widened(in_vocab, kept_count);
            i += 8;
        }
        let largest = max_u32(max_gene) as usize;
        assert!(
            largest < token_of_gene.len(),
            "gene index {largest} outside the batch's {} genes",
            token_of_gene.len()
        );
        let tail = super::select_scalar(
            &gene_idx[i..],
            &counts[i..],
            token_of_gene,
            &mut tokens[k..],
            &mut kept[k..],
        );
        let t = tail.coverage;
        Selected {
            coverage: CellCoverage {
                n_genes: expressed + t.n_genes,
                n_in_vocab: k as u32 + t.n_in_vocab,
                total_counts: sum_u64(total) + t.total_counts,
                counts_in_vocab: sum_u64(in_vocab) + t.counts_in_vocab,
            },
            max_count: max_u32(max_count).max(tail.max_count),
        }
    }

    /// `seeded_bins_scalar`, eight counts at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and POPCNT.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn seeded_bins(
        lut: &[u32; SMALL],
        counts: &[u32],
        key: u32,
        values: &mut Vec<f32>,
    ) {
        let n = counts.len();
        values.reserve(n);
        let start = values.len();
        let out = values.as_mut_ptr().add(start);
        let below_small = _mm256_set1_epi32(SMALL as i32 - 1);
        let low16 = _mm256_set1_epi32(0xffff);
        let key_v = _mm256_set1_epi32(key as i32);
        let golden = _mm256_set1_epi32(GOLDEN as i32);
        let (m1, m2) = (
            _mm256_set1_epi32(FMIX1 as i32),
            _mm256_set1_epi32(FMIX2 as i32),
        );
        let mut index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let eight = _mm256_set1_epi32(8);
        let mut i = 0;
        while i + 8 <= n {
            let c = load(counts.as_ptr().add(i));
            let packed = _mm256_i32gather_epi32::<4>(
                lut.as_ptr() as *const i32,
                _mm256_and_si256(c, below_small),
            );
            let left = _mm256_and_si256(packed, low16);
            let right = _mm256_srli_epi32::<16>(packed);
            // fmix32(key ^ i * GOLDEN)
            let mut h = _mm256_xor_si256(key_v, _mm256_mullo_epi32(index, golden));
            h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
            h = _mm256_mullo_epi32(h, m1);
            h = _mm256_xor_si256(h, _mm256_srli_epi32::<13>(h));
            h = _mm256_mullo_epi32(h, m2);
            h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
            // (h * (left - right)) >> 32 per lane: even lanes, then odd lanes shifted down.
            let span = _mm256_sub_epi32(left, right);
            let even = _mm256_mul_epu32(h, span);
            let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(h), _mm256_srli_epi64::<32>(span));
            let high = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
            let bin = _mm256_sub_epi32(left, high);
            _mm256_storeu_ps(out.add(i), _mm256_cvtepi32_ps(bin));
            index = _mm256_add_epi32(index, eight);
            i += 8;
        }
        for (j, &c) in counts.iter().enumerate().skip(i) {
            *out.add(j) = super::seeded_bin_packed(lut[c as usize % SMALL], key, j as u32);
        }
        values.set_len(start + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for test data.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            crate::tokenize::rng::splitmix64(&mut self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A cell of `n` entries over a 500-gene batch in which every third gene is out of the
    /// vocabulary; a third of the counts are zero, a few are huge.
    fn cell(g: &mut Gen, n: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let table: Vec<u32> = (0..500u32)
            .map(|i| if i % 3 == 0 { NOT_IN_VOCAB } else { 60_000 - i })
            .collect();
        let genes = (0..n).map(|_| g.below(500) as u32).collect();
        let counts = (0..n)
            .map(|_| match g.below(20) {
                0..=6 => 0,
                7 => u32::MAX - g.below(3) as u32,
                _ => g.below(40) as u32,
            })
            .collect();
        (genes, counts, table)
    }

    fn run_select(
        kernels: Simd,
        genes: &[u32],
        counts: &[u32],
        table: &[u32],
    ) -> (Selected, Vec<u32>, Vec<u32>) {
        let n = genes.len();
        let (mut tokens, mut kept) = (vec![MaybeUninit::new(0); n + 8], vec![0; n + 8]);
        let sel = select_in_vocab(kernels, genes, counts, table, &mut tokens, &mut kept);
        let k = sel.coverage.n_in_vocab as usize;
        // SAFETY: initialised above.
        let tokens = tokens[..k]
            .iter()
            .map(|t| unsafe { t.assume_init() })
            .collect();
        (sel, tokens, kept[..k].to_vec())
    }

    #[test]
    fn every_kernel_selects_the_same_entries_and_coverage() {
        let mut g = Gen(7);
        for n in (0..40).chain([100, 255, 256, 257, 1000]) {
            let (genes, counts, table) = cell(&mut g, n);
            let mut results = Vec::new();
            for kernels in Simd::available() {
                results.push(run_select(kernels, &genes, &counts, &table));
            }
            let (sel, tokens, kept) = &results[0];
            let cov = sel.coverage;
            let expect: Vec<(u32, u32)> = genes
                .iter()
                .zip(&counts)
                .map(|(&g, &c)| (table[g as usize], c))
                .filter(|&(t, c)| t != NOT_IN_VOCAB && c != 0)
                .collect();
            let got: Vec<(u32, u32)> = tokens.iter().copied().zip(kept.iter().copied()).collect();
            assert_eq!(got, expect, "n={n}");
            assert_eq!(
                sel.max_count,
                expect.iter().map(|&(_, c)| c).max().unwrap_or(0)
            );
            assert_eq!(
                cov.n_genes as usize,
                counts.iter().filter(|&&c| c != 0).count()
            );
            let total: u64 = counts.iter().map(|&c| c as u64).sum();
            assert_eq!(cov.total_counts, total);
            for other in &results[1..] {
                assert_eq!(other, &results[0], "n={n}");
            }
        }
    }

    #[test]
    fn every_kernel_draws_the_same_seeded_bins() {
        let mut g = Gen(11);
        let lut: Box<[u32; SMALL]> = (0..SMALL as u32)
            .map(|v| {
                let right = (v * 7 % 51).min(49);
                let left = (right + (v % 4)).min(50);
                left | right << 16
            })
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        for n in (0..40).chain([257, 1199]) {
            let counts: Vec<u32> = (0..n).map(|_| g.below(SMALL as u64) as u32).collect();
            let key = g.next() as u32;
            let outputs: Vec<Vec<f32>> = Simd::available()
                .into_iter()
                .map(|kernels| {
                    let mut values = vec![-2.0];
                    seeded_bins(kernels, &lut, &counts, key, &mut values);
                    values
                })
                .collect();
            for (i, &c) in counts.iter().enumerate() {
                let packed = lut[c as usize];
                let (left, right) = (packed & 0xffff, packed >> 16);
                let bin = outputs[0][i + 1] as u32;
                assert!(bin <= left && (bin > right || bin == left), "n={n} i={i}");
            }
            for other in &outputs[1..] {
                assert_eq!(other, &outputs[0], "n={n}");
            }
        }
    }

    #[test]
    fn a_gene_index_outside_the_table_panics_in_every_kernel() {
        let table = vec![1u32; 10];
        let genes: Vec<u32> = (0..16).map(|i| if i == 5 { 10 } else { i % 10 }).collect();
        let counts = vec![1u32; 16];
        for kernels in Simd::available() {
            let refused = std::panic::catch_unwind(|| run_select(kernels, &genes, &counts, &table));
            assert!(refused.is_err(), "{} accepted index 10", kernels.name());
        }
    }
}
