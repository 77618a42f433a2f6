//! The arithmetic behind [`super::FusedAttention`]: for every row `n`, head `h` and query `i`,
//!
//! ```text
//! out[n, i, h, :] = Σ_j softmax_j(q[n, i, h, :] · k[n, j, h, :] + mask[n, j]) · v[n, j, h, :]
//! ```
//!
//! with `q` already scaled by 1/√d (the graph does it), tensors laid out `[N, S, heads, d]`
//! and the key-padding mask `[N, S_key]` (0 or -inf). Two implementations: portable Rust, one
//! query at a time, which is the reference; and AVX-512, chosen at run time, which does eight
//! queries at a time against the keys transposed into a scratch block, keeps each query's
//! scores in a row of the same scratch, and only ever stores whole vectors (what tract's
//! kernels lose most time on for these shapes, see BENCHMARKS.md "Model forward").
//!
//! The two differ by rounding alone (fused multiply-adds, a polynomial `exp`, the order of
//! the sums); the tests below hold them to the reference within 1e-5.

use std::cell::RefCell;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows of the batch.
    pub n: usize,
    /// Queries per row.
    pub sq: usize,
    /// Keys (and values) per row.
    pub sk: usize,
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Dims {
    pub fn q_len(&self) -> usize {
        self.n * self.sq * self.heads * self.head_dim
    }

    pub fn kv_len(&self) -> usize {
        self.n * self.sk * self.heads * self.head_dim
    }

    pub fn mask_len(&self) -> usize {
        self.n * self.sk
    }
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    Portable,
    /// AVX-512F with FMA, for head widths of 16 and 32.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernels {
    /// The fastest this CPU runs.
    pub fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            return Kernels::Avx512;
        }
        Kernels::Portable
    }

    /// Every implementation this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Kernels> {
        let best = Kernels::detect();
        let mut all = vec![Kernels::Portable];
        if best != Kernels::Portable {
            all.push(best);
        }
        all
    }

    /// Whether this implementation handles heads of `head_dim`.
    pub fn supports(self, head_dim: usize) -> bool {
        match self {
            Kernels::Portable => head_dim > 0,
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => head_dim == 16 || head_dim == 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => "avx512",
        }
    }
}

/// Runs attention over every row and head into `out` (`[N, S_q, heads, d]`).
///
/// Panics if a slice's length disagrees with `dims` or `kernels` does not support the head
/// width: the op checks both against the graph before it calls this.
pub fn attend(
    kernels: Kernels,
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
) {
    assert_eq!(q.len(), dims.q_len(), "queries");
    assert_eq!(k.len(), dims.kv_len(), "keys");
    assert_eq!(v.len(), dims.kv_len(), "values");
    assert_eq!(mask.len(), dims.mask_len(), "mask");
    assert_eq!(out.len(), dims.q_len(), "output");
    assert!(
        kernels.supports(dims.head_dim),
        "head width {}",
        dims.head_dim
    );
    match kernels {
        Kernels::Portable => portable(dims, q, k, v, mask, out),
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: `Avx512` is only detected where the CPU has AVX-512F and FMA, and the
            // lengths were checked above.
            unsafe { avx512::attend(dims, q, k, v, mask, out, scratch) }
        }),
    }
}

/// Reusable buffers of the vector path, one set per thread (each inference worker is one).
#[derive(Default)]
struct Scratch {
    /// One head's keys transposed, `[d][S_key rounded up to 16]`.
    keys_t: Vec<f32>,
    /// One row's mask, padded with -inf to the rounded length.
    mask: Vec<f32>,
    /// Scores, then weights, of up to eight queries, `[8][rounded S_key]`.
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The reference: one query at a time, exactly as the formula reads.
fn portable(d: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], out: &mut [f32]) {
    let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
    let mut weights = vec![0f32; d.sk];
    for n in 0..d.n {
        let mask = &mask[n * d.sk..][..d.sk];
        let key = |j: usize, h: usize| (n * d.sk + j) * hd + h * dh;
        for h in 0..d.heads {
            for i in 0..d.sq {
                let at = (n * d.sq + i) * hd + h * dh;
                let qi = &q[at..][..dh];
                let mut max = f32::NEG_INFINITY;
                for (j, w) in weights.iter_mut().enumerate() {
                    let kj = &k[key(j, h)..][..dh];
                    *w = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() + mask[j];
                    max = max.max(*w);
                }
                let mut sum = 0f32;
                for w in weights.iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                let o = &mut out[at..][..dh];
                o.fill(0.0);
                for (j, w) in weights.iter().enumerate() {
                    for (o, x) in o.iter_mut().zip(&v[key(j, h)..][..dh]) {
                        *o += w * x;
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Dims, Scratch};

    const L: usize = 16;
    /// Queries per block: 8 rows × 2 vectors of keys (or of the head) = 16 accumulators.
    const R: usize = 8;

    /// # Safety
    /// The CPU has AVX-512F and FMA; the slices have the lengths `dims` gives them; the head
    /// width is 16 or 32.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn attend(
        d: Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        unsafe {
            match d.head_dim {
                16 => heads::<1>(d, q, k, v, mask, out, s),
                32 => heads::<2>(d, q, k, v, mask, out, s),
                other => unreachable!("head width {other}"),
            }
        }
    }

    /// `DV` vectors per head.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn heads<const DV: usize>(
        d: Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
        let skp = d.sk.next_multiple_of(L);
        s.keys_t.resize(dh * skp, 0.0);
        s.mask.resize(skp, 0.0);
        s.scores.resize(R * skp, 0.0);
        // Padding keys are 0 (and masked by -inf), so every block is whole. The transposes
        // below only write real keys, so the padding columns are cleared once per call.
        for c in 0..dh {
            s.keys_t[c * skp + d.sk..(c + 1) * skp].fill(0.0);
        }
        for n in 0..d.n {
            s.mask[..d.sk].copy_from_slice(&mask[n * d.sk..][..d.sk]);
            s.mask[d.sk..].fill(f32::NEG_INFINITY);
            for h in 0..d.heads {
                // Keys of this head transposed: a vector load then holds 16 keys' same feature.
                let kbase = n * d.sk * hd + h * dh;
                for j in 0..d.sk {
                    for (c, &x) in k[kbase + j * hd..][..dh].iter().enumerate() {
                        s.keys_t[c * skp + j] = x;
                    }
                }
                let at = Head {
                    skp,
                    sk: d.sk,
                    hd,
                    dh,
                    keys_t: s.keys_t.as_ptr(),
                    mask: s.mask.as_ptr(),
                    scores: s.scores.as_mut_ptr(),
                    v: v[kbase..].as_ptr(),
                };
                let mut i = 0;
                while i < d.sq {
                    let row = (n * d.sq + i) * hd + h * dh;
                    let (qp, op) = (q[row..].as_ptr(), out[row..].as_mut_ptr());
                    // SAFETY: the block's rows lie inside q and out (i + rows <= sq).
                    let rows = unsafe {
                        match d.sq - i {
                            r if r >= 8 => at.block::<8, DV>(qp, op),
                            r if r >= 4 => at.block::<4, DV>(qp, op),
                            r if r >= 2 => at.block::<2, DV>(qp, op),
                            _ => at.block::<1, DV>(qp, op),
                        }
                    };
                    i += rows;
                }
            }
        }
    }

    /// One row's head: where its transposed keys, mask, scores and values are.
    struct Head {
        /// Keys rounded up to whole vectors.
        skp: usize,
        sk: usize,
        /// Distance between consecutive tokens in q, v and out (heads × d).
        hd: usize,
        /// Width of the head.
        dh: usize,
        keys_t: *const f32,
        mask: *const f32,
        scores: *mut f32,
        /// This row's and head's first value.
        v: *const f32,
    }

    impl Head {
        /// Attention for `RB` consecutive queries starting at `q` (each `hd` apart), written
        /// at `out`; returns `RB`.
        ///
        /// # Safety
        /// `RB` queries and outputs from the pointers are in bounds; AVX-512F and FMA.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn block<const RB: usize, const DV: usize>(
            &self,
            q: *const f32,
            out: *mut f32,
        ) -> usize {
            unsafe {
                let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); RB];
                let mut kc = 0;
                while kc + 2 * L <= self.skp {
                    self.scores::<RB, 2>(q, kc, &mut max);
                    kc += 2 * L;
                }
                if kc < self.skp {
                    self.scores::<RB, 1>(q, kc, &mut max);
                }
                let mut inv = [0f32; RB];
                for (r, inv) in inv.iter_mut().enumerate() {
                    *inv = self.softmax_row(r, _mm512_reduce_max_ps(max[r]));
                }
                self.weighted_sum::<RB, DV>(&inv, out);
                RB
            }
        }

        /// Scores of `RB` queries against the `C` vectors of keys from `kc`, plus the mask,
        /// into the score rows; folds them into each query's running maximum.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn scores<const RB: usize, const C: usize>(
            &self,
            q: *const f32,
            kc: usize,
            max: &mut [__m512; RB],
        ) {
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); C]; RB];
                for c in 0..self.dh {
                    let kt = self.keys_t.add(c * self.skp + kc);
                    let mut keys = [_mm512_setzero_ps(); C];
                    for (x, key) in keys.iter_mut().enumerate() {
                        *key = _mm512_loadu_ps(kt.add(x * L));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let qb = _mm512_set1_ps(*q.add(r * self.hd + c));
                        for x in 0..C {
                            acc[x] = _mm512_fmadd_ps(qb, keys[x], acc[x]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (x, &a) in acc.iter().enumerate() {
                        let at = kc + x * L;
                        let s = _mm512_add_ps(a, _mm512_loadu_ps(self.mask.add(at)));
                        _mm512_storeu_ps(self.scores.add(r * self.skp + at), s);
                        max[r] = _mm512_max_ps(max[r], s);
                    }
                }
            }
        }

        /// Turns score row `r` into unnormalised weights exp(s - max); returns 1 / their sum.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn softmax_row(&self, r: usize, max: f32) -> f32 {
            unsafe {
                let m = _mm512_set1_ps(max);
                let row = self.scores.add(r * self.skp);
                let mut sum = _mm512_setzero_ps();
                for c in (0..self.skp).step_by(L) {
                    let e = exp(_mm512_sub_ps(_mm512_loadu_ps(row.add(c)), m));
                    _mm512_storeu_ps(row.add(c), e);
                    sum = _mm512_add_ps(sum, e);
                }
                1.0 / _mm512_reduce_add_ps(sum)
            }
        }

        /// out[r] = inv[r] · Σ_j weight[r][j] · v[j] for the block's `RB` queries.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn weighted_sum<const RB: usize, const DV: usize>(
            &self,
            inv: &[f32; RB],
            out: *mut f32,
        ) {
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); DV]; RB];
                for j in 0..self.sk {
                    let vj = self.v.add(j * self.hd);
                    let mut vals = [_mm512_setzero_ps(); DV];
                    for (x, val) in vals.iter_mut().enumerate() {
                        *val = _mm512_loadu_ps(vj.add(x * L));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_ps(*self.scores.add(r * self.skp + j));
                        for x in 0..DV {
                            acc[x] = _mm512_fmadd_ps(w, vals[x], acc[x]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let scale = _mm512_set1_ps(inv[r]);
                    for (x, &a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(out.add(r * self.hd + x * L), _mm512_mul_ps(a, scale));
                    }
                }
            }
        }
    }

    /// e^x for x ≤ 0 (scores minus their row's maximum), 0 below -87.3 and for -inf; within
    /// about 2 ulp: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial
    /// (error below 1.3e-7 there), times 2^n by `vscalefps`.
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: __m512) -> __m512 {
        const LOW: f32 = -87.336_54;
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(LOW));
        let x = _mm512_max_ps(x, _mm512_set1_ps(LOW));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts (Cody and Waite) so that x - n·ln2 stays exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::rng::CellRng;

    /// Uniform in [-a, a), reproducible.
    fn random(len: usize, a: f32, rng: &mut CellRng) -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * a)
            .collect()
    }

    /// The formula in f64, for the reference itself.
    fn exact(d: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f64> {
        let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
        let mut out = vec![0f64; d.q_len()];
        for n in 0..d.n {
            for h in 0..d.heads {
                for i in 0..d.sq {
                    let at = (n * d.sq + i) * hd + h * dh;
                    let s: Vec<f64> = (0..d.sk)
                        .map(|j| {
                            let kj = (n * d.sk + j) * hd + h * dh;
                            (0..dh)
                                .map(|c| q[at + c] as f64 * k[kj + c] as f64)
                                .sum::<f64>()
                                + mask[n * d.sk + j] as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for (j, w) in w.iter().enumerate() {
                        let vj = (n * d.sk + j) * hd + h * dh;
                        for c in 0..dh {
                            out[at + c] += w / sum * v[vj + c] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Cases around every block size: one query (the model's last layer), tails of 1–7
    /// queries, key counts off whole vectors, both head widths, and masked keys.
    #[test]
    fn every_kernel_matches_the_formula() {
        let cases = [
            (2, 5, 5, 4, 32),
            (1, 1, 17, 4, 32),
            (3, 16, 16, 4, 16),
            (2, 15, 33, 2, 32),
            (1, 64, 64, 4, 32),
            (1, 256, 256, 1, 32),
            (2, 1, 256, 4, 16),
        ];
        let mut rng = CellRng::for_cell(7, "attention kernels");
        for (n, sq, sk, heads, head_dim) in cases {
            let d = Dims {
                n,
                sq,
                sk,
                heads,
                head_dim,
            };
            // Queries already scaled as the graph scales them; scores span about ±8.
            let q = random(d.q_len(), 0.5, &mut rng);
            let k = random(d.kv_len(), 1.0, &mut rng);
            let v = random(d.kv_len(), 1.0, &mut rng);
            // Each row masks its last (row index) keys, never the first.
            let mut mask = vec![0f32; d.mask_len()];
            for row in 0..n {
                let masked = row.min(sk - 1);
                mask[row * sk + sk - masked..(row + 1) * sk].fill(f32::NEG_INFINITY);
            }
            let want = exact(d, &q, &k, &v, &mask);
            for kernels in Kernels::available() {
                let mut out = vec![f32::NAN; d.q_len()];
                attend(kernels, d, &q, &k, &v, &mask, &mut out);
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(&o, &w)| (o as f64 - w).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 1e-5,
                    "{} on {d:?}: off by {worst:e}",
                    kernels.name()
                );
            }
        }
    }

    /// A masked key gets no weight at all, whatever its value.
    #[test]
    fn masked_keys_get_no_weight() {
        let d = Dims {
            n: 1,
            sq: 3,
            sk: 20,
            heads: 1,
            head_dim: 32,
        };
        let mut rng = CellRng::for_cell(3, "masked keys");
        let q = random(d.q_len(), 0.5, &mut rng);
        let k = random(d.kv_len(), 1.0, &mut rng);
        let mut v = random(d.kv_len(), 1.0, &mut rng);
        let mut mask = vec![0f32; 20];
        mask[10..].fill(f32::NEG_INFINITY);
        for kernels in Kernels::available() {
            let mut a = vec![0f32; d.q_len()];
            attend(kernels, d, &q, &k, &v, &mask, &mut a);
            v[10 * 32..].fill(1e30);
            let mut b = vec![0f32; d.q_len()];
            attend(kernels, d, &q, &k, &v, &mask, &mut b);
            assert_eq!(a, b, "{}", kernels.name());
            v[10 * 32..].fill(0.0);
        }
    }
}
