//! The arithmetic of an f32 [`super::Linear`] on AVX2+FMA: the products of computed
//! activations by constant weights (projections, feed-forward), which tract's own AVX2 kernel
//! runs at about four fifths of this CPU's sgemm rate (BENCHMARKS.md, "A cache-blocked AVX2
//! GEMM, probed", and "Our own f32 products on AVX2").
//!
//! - Weights packed once, at load, into panels of 16 columns, `[N/16][K][16]`: one k-step of
//!   a panel is two 32-byte loads, and a panel (32 KB at K = 512) stays in L1 while a block
//!   of rows streams past it.
//! - Activations read in place, six rows at a time, one broadcast per row and k-step; the
//!   rows of a block (96 × K floats) stay in L2 while every panel passes over them.
//! - A 6 × 16 tile of accumulators over all of K, then the bias added.
//!
//! Each output is summed over k in ascending order by fused multiply-adds from zero, and the
//! bias added last, as tract's own kernels do: replacing tract's product by this one moves
//! time, never a bit of the result (the tests here and `tests/integration/embed.rs`).

use crate::simd::Simd;

/// Columns of a tile, and of a packed panel.
const NR: usize = 16;

/// Constant weights `[K, N]` (row-major), packed into panels of 16 columns.
#[derive(Debug, Clone)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    /// `[N/16][K][16]`, zero where padded.
    panels: Vec<f32>,
}

impl PartialEq for PackedWeights {
    fn eq(&self, other: &Self) -> bool {
        self.k == other.k
            && self.n == other.n
            && self.panels.len() == other.panels.len()
            && self
                .panels
                .iter()
                .zip(&other.panels)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for PackedWeights {}

impl PackedWeights {
    /// Packs `w`, `[k, n]` row-major.
    pub fn pack(w: &[f32], k: usize, n: usize) -> PackedWeights {
        assert_eq!(w.len(), k * n, "weights of {k} × {n}");
        let np = n.next_multiple_of(NR);
        let mut panels = vec![0f32; k * np];
        for (i, row) in w.chunks_exact(n.max(1)).enumerate().take(k) {
            for (c, &x) in row.iter().enumerate() {
                panels[(c / NR) * k * NR + i * NR + c % NR] = x;
            }
        }
        PackedWeights { k, n, panels }
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
        4 * self.panels.len()
    }

    /// Whether this CPU runs the kernel (AVX2 and FMA).
    pub fn runs_here() -> bool {
        Simd::detect() >= Simd::Avx2
    }

    /// `out[m, n] = a[m, k] · w (+ bias[n])`, `m = a.len() / k`.
    ///
    /// Panics if the lengths disagree, or if this CPU has no AVX2 and FMA.
    pub fn product(&self, a: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        assert!(
            self.k > 0 && a.len().is_multiple_of(self.k),
            "activations of {} by {}",
            a.len(),
            self.k
        );
        let m = a.len() / self.k;
        assert_eq!(out.len(), m * self.n, "output of {m} × {}", self.n);
        assert!(bias.is_none_or(|b| b.len() == self.n));
        assert!(Self::runs_here(), "the f32 products need AVX2 and FMA");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: this CPU runs AVX2 and FMA (asserted above).
        unsafe {
            avx2::product(self, a, m, bias, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PackedWeights, NR};

    /// Rows of a tile.
    const MR: usize = 6;
    /// Rows per block: their activations stay in L2 while every panel streams past them.
    const ROWS_PER_BLOCK: usize = 16 * MR;

    type Acc = [[__m256; 2]; MR];

    /// # Safety
    /// The CPU runs AVX2 and FMA; `a` holds `m · k` floats, `out` `m · n`, `bias` `n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(
        w: &PackedWeights,
        a: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (k, n) = (w.k, w.n);
        let panels = n.div_ceil(NR);
        let whole = m - m % MR;
        for r0 in (0..whole).step_by(ROWS_PER_BLOCK) {
            let r1 = (r0 + ROWS_PER_BLOCK).min(whole);
            for p in 0..panels {
                let panel = &w.panels[p * k * NR..(p + 1) * k * NR];
                for r in (r0..r1).step_by(MR) {
                    // SAFETY: rows r..r + MR of `a` exist (r + MR ≤ whole ≤ m); the panel
                    // holds k steps of NR floats.
                    let acc = unsafe { tile(a[r * k..].as_ptr(), k, panel.as_ptr()) };
                    // SAFETY: as the caller promised for `out` and `bias`.
                    unsafe { store(&acc, MR, r, p * NR, n, bias, out) };
                }
            }
        }
        if whole < m {
            // The last rows, fewer than a tile: copied after zero rows.
            let rows = m - whole;
            let mut last = vec![0f32; MR * k];
            last[..rows * k].copy_from_slice(&a[whole * k..]);
            for p in 0..panels {
                let panel = &w.panels[p * k * NR..(p + 1) * k * NR];
                // SAFETY: `last` holds MR rows of k floats; the panel k steps.
                let acc = unsafe { tile(last.as_ptr(), k, panel.as_ptr()) };
                // SAFETY: as above, `rows` rows from `whole`.
                unsafe { store(&acc, rows, whole, p * NR, n, bias, out) };
            }
        }
    }

    /// `acc[r][..] = Σ_k a[r][k] · panel[k][..]`, k ascending, one FMA per step.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile(a: *const f32, lda: usize, panel: *const f32) -> Acc {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for i in 0..lda {
            // SAFETY: within the bounds `product` checked; unaligned loads.
            unsafe {
                let b0 = _mm256_loadu_ps(panel.add(i * NR));
                let b1 = _mm256_loadu_ps(panel.add(i * NR + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(r * lda + i));
                    acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                }
            }
        }
        acc
    }

    /// The tile's first `rows` rows (+ bias) into `out` at row `r`, column `c0`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store(
        acc: &Acc,
        rows: usize,
        r: usize,
        c0: usize,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let cols = NR.min(n - c0);
        // SAFETY: `bias` holds n ≥ c0 + cols floats; loads of a full panel only when
        // cols == NR.
        let (b0, b1) = match bias {
            Some(b) if cols == NR => unsafe {
                (
                    _mm256_loadu_ps(b.as_ptr().add(c0)),
                    _mm256_loadu_ps(b.as_ptr().add(c0 + 8)),
                )
            },
            Some(b) => {
                let mut full = [0f32; NR];
                full[..cols].copy_from_slice(&b[c0..c0 + cols]);
                // SAFETY: 16 floats.
                unsafe {
                    (
                        _mm256_loadu_ps(full.as_ptr()),
                        _mm256_loadu_ps(full.as_ptr().add(8)),
                    )
                }
            }
            None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
        };
        let with_bias = bias.is_some();
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let (v0, v1) = if with_bias {
                (_mm256_add_ps(acc[0], b0), _mm256_add_ps(acc[1], b1))
            } else {
                (acc[0], acc[1])
            };
            let at = (r + i) * n + c0;
            if cols == NR {
                // SAFETY: the row has NR columns from c0.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr().add(at), v0);
                    _mm256_storeu_ps(out.as_mut_ptr().add(at + 8), v1);
                }
            } else {
                let mut full = [0f32; NR];
                // SAFETY: 16 floats.
                unsafe {
                    _mm256_storeu_ps(full.as_mut_ptr(), v0);
                    _mm256_storeu_ps(full.as_mut_ptr().add(8), v1);
                }
                out[at..at + cols].copy_from_slice(&full[..cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::int8_kernel::tests::random;
    use super::*;

    /// Bit for bit the sum tract's kernels form: k ascending by fused multiply-adds from
    /// zero, then the bias; for shapes with partial tiles of rows and of columns.
    #[test]
    fn every_output_is_the_sequential_fused_sum_bit_for_bit() {
        if !PackedWeights::runs_here() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (1, 4, 16),
            (7, 37, 21),
            (13, 64, 48),
            (100, 130, 33),
            (97, 512, 40),
            (200, 128, 384),
        ] {
            let a = random(m * k, 1 + m as u64, 3.0);
            let w = random(k * n, 2 + k as u64, 0.1);
            let bias = random(n, 3, 1.0);
            let packed = PackedWeights::pack(&w, k, n);
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias[..]);
                let mut out = vec![f32::NAN; m * n];
                packed.product(&a, b, &mut out);
                for r in 0..m {
                    for c in 0..n {
                        let mut want = 0f32;
                        for i in 0..k {
                            want = a[r * k + i].mul_add(w[i * n + c], want);
                        }
                        if with_bias {
                            want += bias[c];
                        }
                        let got = out[r * n + c];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{m}×{k}×{n} [{r},{c}] bias {with_bias}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
