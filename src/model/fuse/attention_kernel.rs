//! The arithmetic behind [`super::FusedAttention`]: for every row `n`, head `h` and query `i`,
//!
//! ```text
//! out[n, i, h, :] = Σ_j softmax_j(q[n, i, h, :] · k[n, j, h, :] + mask[n, j]) · v[n, j, h, :]
//! ```
//!
//! with `q` already scaled by 1/√d (the graph does it), tensors laid out `[N, S, heads, d]`
//! and the key-padding mask `[N, S_key]` (0 or -inf). One blocked kernel, written once
//! ([`attention_kernels!`]) over a handful of vector operations and compiled three times: with
//! AVX-512 intrinsics, with AVX2+FMA intrinsics, and over plain `[f32; 8]` arrays that the
//! compiler vectorises for whatever the target's baseline is (SSE2, NEON). Each does a block
//! of queries at a time against the head's keys and values, packed into contiguous panels
//! of a scratch block (one stream each, whatever S), keeps the block's scores in rows of the
//! same scratch (memory per worker O(block · S), never S²), and only ever stores whole
//! vectors. Head widths that are not a multiple of 8 take [`reference`], one query at a time.
//!
//! Keys after a row's last unmasked key get no weight, so they are skipped; in
//! self-attention (as many queries as keys) the queries there are padding tokens, which
//! nothing downstream reads (their rows are masked keys in the next layer, and the model's
//! outputs are the `<cls>` row), so their outputs are written as zeros instead of computed.
//! A row whose keys are all masked (a filler row) gets zeros too.
//!
//! int8 packages run the weighted sum in integers instead (`attention_int8.rs`, [`attend_int8`]):
//! the score rows' weights go to it a row at a time.
//!
//! The implementations differ by rounding alone (fused multiply-adds, a polynomial `exp`, the
//! order of the sums); the tests below hold each to the formula, computed in f64, within 1e-5.

use std::cell::RefCell;

use super::attention_int8::{IntegerSum, MAX_KEYS};
use crate::simd::Simd;

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

/// Runs attention over every row and head into `out` (`[N, S_q, heads, d]`) on `simd`'s
/// kernel.
///
/// Panics if a slice's length disagrees with `dims`, or if this CPU does not run `simd`: the
/// op checks the lengths against the graph before it calls this.
pub fn attend(
    simd: Simd,
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
) {
    run(simd, false, dims, q, k, v, mask, out)
}

/// As [`attend`], with the weighted sum in integers (`attention_int8.rs`) where the head width
/// takes the blocked kernels; the scores and softmax stay f32.
pub fn attend_int8(
    simd: Simd,
    dims: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
) {
    run(simd, true, dims, q, k, v, mask, out)
}

#[allow(clippy::too_many_arguments)]
fn run(
    simd: Simd,
    int8: bool,
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
    assert!(simd <= Simd::detect(), "{} on this CPU", simd.name());
    if dims.head_dim == 0 {
        return;
    }
    // The integer weighted sum's tile, where its sums stay exact.
    let int8 = (int8 && dims.sk <= MAX_KEYS).then_some(simd);
    SCRATCH.with_borrow_mut(|scratch| match simd {
        // SAFETY (each arm): the CPU runs the tier (asserted above), the lengths were checked
        // above, and the head width is a multiple of the kernel's vector.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 if dims.head_dim.is_multiple_of(16) => unsafe {
            avx512::attend(dims, q, k, v, mask, out, scratch, int8)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx2 if dims.head_dim.is_multiple_of(8) => unsafe {
            avx2::attend(dims, q, k, v, mask, out, scratch, int8)
        },
        // SAFETY: as above (the portable build needs no CPU feature).
        _ if dims.head_dim.is_multiple_of(8) => unsafe {
            portable::attend(dims, q, k, v, mask, out, scratch, int8)
        },
        _ => reference(dims, q, k, v, mask, out),
    })
}

/// Reusable buffers of the blocked kernels, one set per thread (each inference worker is one).
struct Scratch {
    /// One head's keys packed in panels of two vectors, `[S_key / 2L][d][2L]` (S_key
    /// rounded up to the panel).
    key_panels: Vec<f32>,
    /// One head's values packed in groups of the weighted sum's tile, `[d / w][S_key][w]`.
    values: Vec<f32>,
    /// One row's mask, padded with -inf to the rounded length.
    mask: Vec<f32>,
    /// Scores, then weights, of one block of queries, `[block][rounded S_key]`.
    scores: Vec<f32>,
    /// The integer weighted sum, for int8 packages.
    int8: IntegerSum,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        key_panels: Vec::new(),
        values: Vec::new(),
        mask: Vec::new(),
        scores: Vec::new(),
        int8: IntegerSum::new(),
    });
}

/// The last unmasked key of a row, plus one (0 when every key is masked).
pub(super) fn unmasked_len(mask: &[f32]) -> usize {
    mask.iter()
        .rposition(|&m| m != f32::NEG_INFINITY)
        .map_or(0, |j| j + 1)
}

/// How many of a row's queries are computed (the rest are written as zeros): in
/// self-attention those up to the last unmasked key, else all of them.
pub(super) fn live_queries(d: &Dims, keys: usize) -> usize {
    if keys == 0 {
        0
    } else if d.sq == d.sk {
        keys
    } else {
        d.sq
    }
}

/// One query at a time, exactly as the formula reads: for head widths the blocked kernels do
/// not take.
fn reference(d: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], out: &mut [f32]) {
    let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
    let mut weights = vec![0f32; d.sk];
    for n in 0..d.n {
        let mask = &mask[n * d.sk..][..d.sk];
        let sk = unmasked_len(mask);
        let live = live_queries(&d, sk);
        out[(n * d.sq + live) * hd..(n + 1) * d.sq * hd].fill(0.0);
        let key = |j: usize, h: usize| (n * d.sk + j) * hd + h * dh;
        for h in 0..d.heads {
            for i in 0..live {
                let at = (n * d.sq + i) * hd + h * dh;
                let qi = &q[at..][..dh];
                let mut max = f32::NEG_INFINITY;
                for (j, w) in weights[..sk].iter_mut().enumerate() {
                    let kj = &k[key(j, h)..][..dh];
                    *w = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() + mask[j];
                    max = max.max(*w);
                }
                let mut sum = 0f32;
                for w in weights[..sk].iter_mut() {
                    *w = (*w - max).exp();
                    sum += *w;
                }
                let o = &mut out[at..][..dh];
                o.fill(0.0);
                for (j, w) in weights[..sk].iter().enumerate() {
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

/// The blocked kernel, over the vector operations of the module it is expanded in: `V` (a
/// vector of `L` lanes), `zero`, `splat`, `load`, `store`, `fma`, `add`, `sub`, `mul`,
/// `vmax`, `hmax`, `hsum` and `exp` (of `x ≤ 0`, 0 at -inf); `R`, the most queries a block
/// holds; and `tile(d / L)`, the queries and vectors of one weighted-sum tile for heads of
/// `d` (what fits in the module's registers). Every function gets the module's target
/// features, so that the operations inline into it.
macro_rules! attention_kernels {
    ($($features:literal)?) => {
        use super::{live_queries, unmasked_len, Dims, Scratch};

        /// Keys a score panel holds: two vectors, so that every score step is two whole loads.
        const W: usize = 2 * L;

        /// With `int8`, the weighted sum runs in integers on that tier's tile
        /// (`attention_int8.rs`).
        ///
        /// # Safety
        /// The CPU has this module's target features and runs `int8`'s tier; the slices have
        /// the lengths `d` gives them; the head width is a multiple of `L`.
        #[allow(clippy::too_many_arguments)]
        $(#[target_feature(enable = $features)])?
        pub(super) unsafe fn attend(
            d: Dims,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            mask: &[f32],
            out: &mut [f32],
            s: &mut Scratch,
            int8: Option<crate::simd::Simd>,
        ) {
            let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
            let most = d.sk.next_multiple_of(W);
            // The weighted sum's tile, which the values are packed for.
            let (rows, cols) = tile(dh / L);
            s.key_panels.resize(dh * most, 0.0);
            if int8.is_none() {
                s.values.resize(dh * d.sk, 0.0);
            }
            s.mask.resize(most, 0.0);
            s.scores.resize(R * most, 0.0);
            for n in 0..d.n {
                let row_mask = &mask[n * d.sk..][..d.sk];
                let sk = unmasked_len(row_mask);
                let live = live_queries(&d, sk);
                out[(n * d.sq + live) * hd..(n + 1) * d.sq * hd].fill(0.0);
                // Padding keys are 0 and masked by -inf, so that every panel is whole.
                let skp = sk.next_multiple_of(W);
                s.mask[..sk].copy_from_slice(&row_mask[..sk]);
                s.mask[sk..skp].fill(f32::NEG_INFINITY);
                for h in 0..d.heads {
                    let kbase = n * d.sk * hd + h * dh;
                    // Keys of this head packed `[panel][feature][W keys]`: the score loop
                    // reads one contiguous stream, where a plain transpose would read dh
                    // streams a row apart (too many for the prefetchers at long S).
                    for j in 0..sk {
                        let panel = (j / W) * dh * W + j % W;
                        for (c, &x) in k[kbase + j * hd..][..dh].iter().enumerate() {
                            s.key_panels[panel + c * W] = x;
                        }
                    }
                    for j in sk..skp {
                        let panel = (j / W) * dh * W + j % W;
                        for c in 0..dh {
                            s.key_panels[panel + c * W] = 0.0;
                        }
                    }
                    // Values packed `[group of cols vectors][key][cols · L]`: each pass of
                    // the weighted sum reads one contiguous stream too.
                    let gw = cols * L;
                    match int8 {
                        Some(tile) => s.int8.start(tile, sk, dh, |j| &v[kbase + j * hd..][..dh]),
                        None => {
                            for j in 0..sk {
                                let vrow = &v[kbase + j * hd..][..dh];
                                for (g, chunk) in vrow.chunks_exact(gw).enumerate() {
                                    s.values[(g * sk + j) * gw..][..gw].copy_from_slice(chunk);
                                }
                            }
                        }
                    }
                    let at = Head {
                        skp,
                        sk,
                        hd,
                        dh,
                        rows,
                        cols,
                        key_panels: s.key_panels.as_ptr(),
                        mask: s.mask.as_ptr(),
                        scores: s.scores.as_mut_ptr(),
                        values: s.values.as_ptr(),
                    };
                    let mut i = 0;
                    while i < live {
                        let row = (n * d.sq + i) * hd + h * dh;
                        let qp = q[row..].as_ptr();
                        if int8.is_some() {
                            // SAFETY: the block's queries lie inside q (i + rows <= live <= sq),
                            // and the scratch holds R score rows. (The row sums `weights`
                            // returns are the f32 sum's: only their count is used here.)
                            let rows = unsafe {
                                match live - i {
                                    r if r >= 8 && R >= 8 => at.weights::<8>(qp).len(),
                                    r if r >= 4 && R >= 4 => at.weights::<4>(qp).len(),
                                    r if r >= 2 => at.weights::<2>(qp).len(),
                                    _ => at.weights::<1>(qp).len(),
                                }
                            };
                            for r in 0..rows {
                                // SAFETY: score row r of skp ≥ sk values, just written.
                                let w = unsafe {
                                    std::slice::from_raw_parts(at.scores.add(r * skp), sk)
                                };
                                s.int8.push(w, row + r * hd, out);
                            }
                            i += rows;
                            continue;
                        }
                        let op = out[row..].as_mut_ptr();
                        // SAFETY: the block's queries and outputs lie inside q and out
                        // (i + rows <= live <= sq), and the scratch holds R score rows.
                        i += unsafe {
                            match live - i {
                                r if r >= 8 && R >= 8 => at.block::<8>(qp, op),
                                r if r >= 4 && R >= 4 => at.block::<4>(qp, op),
                                r if r >= 2 => at.block::<2>(qp, op),
                                _ => at.block::<1>(qp, op),
                            }
                        };
                    }
                    s.int8.finish(out);
                }
            }
        }

        /// One row's head: where its packed keys, mask, scores and packed values are.
        struct Head {
            /// Unmasked keys rounded up to whole panels (the stride of `scores`).
            skp: usize,
            /// Unmasked keys.
            sk: usize,
            /// Distance between consecutive tokens in q, v and out (heads × d).
            hd: usize,
            /// Width of the head.
            dh: usize,
            /// The weighted sum's tile: queries and vectors ([`tile`] of the head's vectors).
            rows: usize,
            cols: usize,
            /// `[skp / W][dh][W]`.
            key_panels: *const f32,
            mask: *const f32,
            scores: *mut f32,
            /// `[dh / (cols · L)][sk][cols · L]`.
            values: *const f32,
        }

        impl Head {
            /// Attention for `RB` consecutive queries starting at `q` (each `hd` apart),
            /// written at `out`; returns `RB`.
            ///
            /// # Safety
            /// `RB` ≤ `R`; `RB` queries and outputs from the pointers are in bounds; the
            /// module's target features.
            $(#[target_feature(enable = $features)])?
            unsafe fn block<const RB: usize>(&self, q: *const f32, out: *mut f32) -> usize {
                // SAFETY: the callees' contracts are this function's.
                unsafe {
                    let inv = self.weights::<RB>(q);
                    self.weighted_sum(&inv, out);
                }
                RB
            }

            /// The unnormalised weights e^(s - max) of `RB` consecutive queries into the
            /// score rows; returns 1 / each row's sum.
            ///
            /// # Safety
            /// As [`Head::block`].
            $(#[target_feature(enable = $features)])?
            unsafe fn weights<const RB: usize>(&self, q: *const f32) -> [f32; RB] {
                // SAFETY: the callees' contracts are this function's.
                unsafe {
                    let mut max = [splat(f32::NEG_INFINITY); RB];
                    for kc in (0..self.skp).step_by(W) {
                        self.scores::<RB>(q, kc, &mut max);
                    }
                    let mut inv = [0f32; RB];
                    for (r, inv) in inv.iter_mut().enumerate() {
                        *inv = self.softmax_row(r, hmax(max[r]));
                    }
                    inv
                }
            }

            /// Scores of `RB` queries against the panel of keys from `kc` (W keys), plus
            /// the mask, into the score rows; folds them into each query's running maximum.
            ///
            /// # Safety
            /// As [`Head::block`], and `kc` is a panel's first key, below `skp`.
            $(#[target_feature(enable = $features)])?
            unsafe fn scores<const RB: usize>(&self, q: *const f32, kc: usize, max: &mut [V; RB]) {
                // SAFETY: the panel holds dh × W keys, q holds RB queries of dh, the score
                // rows RB ≤ R rows of skp.
                unsafe {
                    let mut acc = [[zero(); 2]; RB];
                    let panel = self.key_panels.add(kc * self.dh);
                    for c in 0..self.dh {
                        let keys = [load(panel.add(c * W)), load(panel.add(c * W + L))];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let qb = splat(*q.add(r * self.hd + c));
                            acc[0] = fma(qb, keys[0], acc[0]);
                            acc[1] = fma(qb, keys[1], acc[1]);
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        for (x, &a) in acc.iter().enumerate() {
                            let at = kc + x * L;
                            let s = add(a, load(self.mask.add(at)));
                            store(self.scores.add(r * self.skp + at), s);
                            max[r] = vmax(max[r], s);
                        }
                    }
                }
            }

            /// Turns score row `r` into unnormalised weights exp(s - max); returns 1 / their
            /// sum.
            ///
            /// # Safety
            /// `r < R`; the module's target features.
            $(#[target_feature(enable = $features)])?
            unsafe fn softmax_row(&self, r: usize, max: f32) -> f32 {
                // SAFETY: score row r holds skp values, a multiple of L.
                unsafe {
                    let m = splat(max);
                    let row = self.scores.add(r * self.skp);
                    let mut sum = zero();
                    for c in (0..self.skp).step_by(L) {
                        let e = exp(sub(load(row.add(c)), m));
                        store(row.add(c), e);
                        sum = add(sum, e);
                    }
                    1.0 / hsum(sum)
                }
            }

            /// out[r] = inv[r] · Σ_j weight[r][j] · v[j] for the block's queries, in tiles
            /// of [`tile`]'s size.
            ///
            /// # Safety
            /// As [`Head::block`].
            $(#[target_feature(enable = $features)])?
            unsafe fn weighted_sum(&self, inv: &[f32], out: *mut f32) {
                let (dv, cols) = (self.dh / L, self.cols);
                debug_assert!(dv.is_multiple_of(cols));
                let rows = self.rows.min(inv.len());
                let mut r0 = 0;
                while r0 < inv.len() {
                    let mut c0 = 0;
                    while c0 < dv {
                        // SAFETY: rows r0.. and vectors c0.. of the tile are inside the block
                        // and the head (rows divides the block size, cols the head's vectors:
                        // `tile` picks them so, and the values were packed by them).
                        unsafe {
                            match (rows, cols) {
                                (8, 2) => self.tile::<8, 2>(r0, c0, inv, out),
                                (8, 1) => self.tile::<8, 1>(r0, c0, inv, out),
                                (4, 4) => self.tile::<4, 4>(r0, c0, inv, out),
                                (4, 2) => self.tile::<4, 2>(r0, c0, inv, out),
                                (4, 1) => self.tile::<4, 1>(r0, c0, inv, out),
                                (2, 4) => self.tile::<2, 4>(r0, c0, inv, out),
                                (2, 2) => self.tile::<2, 2>(r0, c0, inv, out),
                                (2, 1) => self.tile::<2, 1>(r0, c0, inv, out),
                                (1, 4) => self.tile::<1, 4>(r0, c0, inv, out),
                                (1, 2) => self.tile::<1, 2>(r0, c0, inv, out),
                                _ => self.tile::<1, 1>(r0, c0, inv, out),
                            }
                        }
                        c0 += cols;
                    }
                    r0 += rows;
                }
            }

            /// The weighted sum of queries `r0..r0 + RT`, vectors `c0..c0 + CT` of the head.
            ///
            /// # Safety
            /// Those queries and vectors are inside the block and the head; the module's
            /// target features.
            $(#[target_feature(enable = $features)])?
            unsafe fn tile<const RT: usize, const CT: usize>(
                &self,
                r0: usize,
                c0: usize,
                inv: &[f32],
                out: *mut f32,
            ) {
                // SAFETY: the values' group c0 / CT holds sk rows of CT·L; score rows r0 + RT
                // ≤ the block; outputs inside the head.
                unsafe {
                    let mut acc = [[zero(); CT]; RT];
                    let scores = self.scores.add(r0 * self.skp);
                    let group = self.values.add(c0 * L * self.sk);
                    for j in 0..self.sk {
                        let vj = group.add(j * CT * L);
                        let mut vals = [zero(); CT];
                        for (x, val) in vals.iter_mut().enumerate() {
                            *val = load(vj.add(x * L));
                        }
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let w = splat(*scores.add(r * self.skp + j));
                            for x in 0..CT {
                                acc[x] = fma(w, vals[x], acc[x]);
                            }
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        let scale = splat(inv[r0 + r]);
                        let o = out.add((r0 + r) * self.hd + c0 * L);
                        for (x, &a) in acc.iter().enumerate() {
                            store(o.add(x * L), mul(a, scale));
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    type V = __m512;
    const L: usize = 16;
    /// 8 queries × 2 vectors of keys = 16 accumulators (of 32 registers).
    const R: usize = 8;

    /// 16 accumulators a tile, as wide as the head allows.
    fn tile(vectors: usize) -> (usize, usize) {
        match vectors {
            1 => (8, 1),
            v if v.is_multiple_of(4) => (4, 4),
            v if v.is_multiple_of(2) => (8, 2),
            _ => (8, 1),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn zero() -> V {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn splat(x: f32) -> V {
        _mm512_set1_ps(x)
    }
    /// # Safety
    /// `L` floats readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller's.
        unsafe { _mm512_loadu_ps(p) }
    }
    /// # Safety
    /// `L` floats writable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: the caller's.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn add(a: V, b: V) -> V {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn sub(a: V, b: V) -> V {
        _mm512_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn mul(a: V, b: V) -> V {
        _mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn vmax(a: V, b: V) -> V {
        _mm512_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn hmax(a: V) -> f32 {
        _mm512_reduce_max_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn hsum(a: V) -> f32 {
        _mm512_reduce_add_ps(a)
    }

    /// e^x for x ≤ 0 (scores minus their row's maximum), 0 below -87.3 and for -inf; within
    /// about 2 ulp: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial
    /// (error below 1.3e-7 there), times 2^n by `vscalefps`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn exp(x: V) -> V {
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(super::EXP_LOW));
        let x = _mm512_max_ps(x, _mm512_set1_ps(super::EXP_LOW));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
    }

    attention_kernels!("avx512f,fma");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    type V = __m256;
    const L: usize = 8;
    /// 4 queries × 2 vectors of keys = 8 accumulators (of 16 registers).
    const R: usize = 4;

    /// 8 accumulators a tile.
    fn tile(vectors: usize) -> (usize, usize) {
        if vectors.is_multiple_of(2) {
            (4, 2)
        } else {
            (4, 1)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zero() -> V {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(x: f32) -> V {
        _mm256_set1_ps(x)
    }
    /// # Safety
    /// `L` floats readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller's.
        unsafe { _mm256_loadu_ps(p) }
    }
    /// # Safety
    /// `L` floats writable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: the caller's.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add(a: V, b: V) -> V {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sub(a: V, b: V) -> V {
        _mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul(a: V, b: V) -> V {
        _mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn vmax(a: V, b: V) -> V {
        _mm256_max_ps(a, b)
    }
    /// The lanes folded pairwise: halves, then quarters, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(a: V) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(a: V) -> f32 {
        let m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
    }

    /// As the AVX-512 `exp`, with 2^n built in the exponent bits (n ≥ -126 after the clamp,
    /// so the result is a normal float).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: V) -> V {
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(super::EXP_LOW));
        let x = _mm256_max_ps(x, _mm256_set1_ps(super::EXP_LOW));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep)
    }

    attention_kernels!("avx2,fma");
}

/// Eight lanes as a plain array: every operation is a loop the compiler turns into the
/// target's vector instructions (two SSE2 registers, two NEON ones).
mod portable {
    type V = [f32; 8];
    const L: usize = 8;
    const R: usize = 4;

    fn tile(_vectors: usize) -> (usize, usize) {
        (4, 1)
    }

    #[inline(always)]
    fn map(a: V, b: V, f: impl Fn(f32, f32) -> f32) -> V {
        std::array::from_fn(|i| f(a[i], b[i]))
    }
    #[inline(always)]
    fn zero() -> V {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(x: f32) -> V {
        [x; 8]
    }
    /// # Safety
    /// `L` floats readable at `p`.
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller's.
        unsafe { p.cast::<V>().read_unaligned() }
    }
    /// # Safety
    /// `L` floats writable at `p`.
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: the caller's.
        unsafe { p.cast::<V>().write_unaligned(v) }
    }
    /// Fused where the architecture always has it (aarch64); elsewhere a multiply, then an
    /// add (a fused one is a library call on an x86-64 without FMA).
    #[inline(always)]
    fn fma(a: V, b: V, c: V) -> V {
        #[cfg(target_arch = "aarch64")]
        return std::array::from_fn(|i| a[i].mul_add(b[i], c[i]));
        #[cfg(not(target_arch = "aarch64"))]
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn add(a: V, b: V) -> V {
        map(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(a: V, b: V) -> V {
        map(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(a: V, b: V) -> V {
        map(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn vmax(a: V, b: V) -> V {
        map(a, b, f32::max)
    }
    /// Lanes folded pairwise, halves first (a fixed order).
    #[inline(always)]
    fn fold(a: V, f: impl Fn(f32, f32) -> f32) -> f32 {
        let q: [f32; 4] = std::array::from_fn(|i| f(a[i], a[i + 4]));
        f(f(q[0], q[2]), f(q[1], q[3]))
    }
    #[inline(always)]
    fn hmax(a: V) -> f32 {
        fold(a, f32::max)
    }
    #[inline(always)]
    fn hsum(a: V) -> f32 {
        fold(a, |x, y| x + y)
    }
    /// As the AVX-512 `exp`, one step at a time over all lanes (so that each step is one
    /// vector instruction or two): n rounded by adding and removing 1.5·2^23 (exact for
    /// |n| < 2^22, and no library call), 2^n built in the exponent bits.
    #[inline(always)]
    fn exp(x: V) -> V {
        const ROUND: f32 = 12_582_912.0;
        let v: V = std::array::from_fn(|i| x[i].max(super::EXP_LOW));
        let n: V = std::array::from_fn(|i| (v[i] * std::f32::consts::LOG2_E + ROUND) - ROUND);
        let r: V = std::array::from_fn(|i| v[i] - n[i] * super::LN2_HI);
        let r: V = std::array::from_fn(|i| r[i] - n[i] * super::LN2_LO);
        let mut p = splat(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = fma(p, r, splat(*c));
        }
        // n is an integer in -126..=0 here, so the cast is exact.
        let bits: [i32; 8] = std::array::from_fn(|i| (n[i] as i32 + 127) << 23);
        std::array::from_fn(|i| {
            let e = p[i] * f32::from_bits(bits[i] as u32);
            if x[i] >= super::EXP_LOW {
                e
            } else {
                0.0
            }
        })
    }

    attention_kernels!();
}

/// Below this, e^x is 0 in the kernels (e^-87.34 is f32's smallest normal).
const EXP_LOW: f32 = -87.336_54;
/// ln 2 in two parts (Cody and Waite) so that x - n·ln2 stays exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// e^r by its degree-6 Taylor polynomial, highest coefficient first (Horner).
const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

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

    /// The formula in f64, with the kernels' contract on padding: in self-attention the
    /// queries after a row's last unmasked key, and every query of a row with no unmasked
    /// key, are 0.
    fn exact(d: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) -> Vec<f64> {
        let (hd, dh) = (d.heads * d.head_dim, d.head_dim);
        let mut out = vec![0f64; d.q_len()];
        for n in 0..d.n {
            let live = live_queries(&d, unmasked_len(&mask[n * d.sk..][..d.sk]));
            for h in 0..d.heads {
                for i in 0..live {
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

    /// Every kernel this CPU runs on `d`, f32 and with the int8 weighted sum, against
    /// [`exact`]; row `n` masks its last `n` keys (never all of them).
    fn check(d: Dims, rng: &mut CellRng) {
        // Queries already scaled as the graph scales them; scores span about ±8.
        let q = random(d.q_len(), 0.5, rng);
        let k = random(d.kv_len(), 1.0, rng);
        let v = random(d.kv_len(), 1.0, rng);
        let mut mask = vec![0f32; d.mask_len()];
        for row in 0..d.n {
            let masked = row.min(d.sk - 1);
            mask[row * d.sk + d.sk - masked..(row + 1) * d.sk].fill(f32::NEG_INFINITY);
        }
        let want = exact(d, &q, &k, &v, &mask);
        for simd in Simd::available() {
            let mut out = vec![f32::NAN; d.q_len()];
            attend(simd, d, &q, &k, &v, &mask, &mut out);
            let worst = out
                .iter()
                .zip(&want)
                .map(|(&o, &w)| (o as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{} on {d:?}: off by {worst:e}", simd.name());
            // The integer weighted sum: values in 8 bits (a step of 1/127 of their largest,
            // 1 here), weights in 14 or more; head widths the blocked kernels do not take stay
            // f32.
            let mut out = vec![f32::NAN; d.q_len()];
            attend_int8(simd, d, &q, &k, &v, &mask, &mut out);
            let errors: Vec<f64> = out
                .iter()
                .zip(&want)
                .map(|(&o, &w)| (o as f64 - w).abs())
                .collect();
            let worst = errors.iter().fold(0.0, |m: f64, &e| m.max(e));
            let mean = errors.iter().sum::<f64>() / errors.len() as f64;
            // Half a value step bounds what the values' rounding moves an average of them;
            // the weights' rounding adds a little (a quarter step, with room).
            let bound = if d.head_dim.is_multiple_of(8) {
                1.25 * 0.5 / 127.0
            } else {
                1e-5
            };
            assert!(
                worst < bound && mean < bound / 2.0,
                "int8 {} on {d:?}: off by {worst:e} at worst, {mean:e} on average",
                simd.name()
            );
        }
    }

    fn dims(n: usize, sq: usize, sk: usize, heads: usize, head_dim: usize) -> Dims {
        Dims {
            n,
            sq,
            sk,
            heads,
            head_dim,
        }
    }

    /// Cases around every block and tile size: one query (the model's last layer), tails of
    /// 1–7 queries, key counts off whole vectors, the head widths of scGPT-architecture
    /// models (16 to 128) and one no kernel takes (12: the reference), and masked keys.
    #[test]
    fn every_kernel_matches_the_formula() {
        eprintln!(
            "attention kernels covered: {:?}",
            Simd::available()
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
        );
        let mut rng = CellRng::for_cell(7, "attention kernels");
        for (n, sq, sk, heads, head_dim) in [
            (2, 5, 5, 4, 32),
            (1, 1, 17, 4, 32),
            (3, 16, 16, 4, 16),
            (2, 15, 33, 2, 32),
            (1, 64, 64, 4, 32),
            (1, 256, 256, 1, 32),
            (2, 1, 256, 4, 16),
            (2, 9, 9, 3, 8),
            (2, 13, 13, 2, 12),
            (3, 37, 37, 2, 64),
            (2, 1, 70, 8, 64),
            (2, 21, 21, 2, 128),
            (1, 1, 45, 2, 128),
            (2, 11, 11, 1, 48),
        ] {
            check(dims(n, sq, sk, heads, head_dim), &mut rng);
        }
    }

    /// scGPT's default sequence length (1,200 tokens) and a longer one, at its head width.
    #[test]
    fn long_sequences_match_the_formula() {
        let mut rng = CellRng::for_cell(11, "long attention");
        check(dims(2, 1200, 1200, 1, 64), &mut rng);
        check(dims(1, 2048, 2048, 1, 64), &mut rng);
        check(dims(3, 1, 1200, 8, 64), &mut rng);
    }

    /// A masked key gets no weight at all, whatever its value; the queries of padding
    /// tokens and rows with no unmasked key come out as zeros; with the int8 weighted sum too.
    #[test]
    fn masked_keys_get_no_weight_and_padding_gets_zeros() {
        let mut rng = CellRng::for_cell(3, "masked keys");
        for head_dim in [32, 64] {
            let d = dims(2, 20, 20, 2, head_dim);
            let q = random(d.q_len(), 0.5, &mut rng);
            let k = random(d.kv_len(), 1.0, &mut rng);
            let mut v = random(d.kv_len(), 1.0, &mut rng);
            // Row 0: keys 10.. are padding; row 1: all of them (a filler row).
            let mut mask = vec![0f32; d.mask_len()];
            mask[10..].fill(f32::NEG_INFINITY);
            let hd = 2 * head_dim;
            for simd in Simd::available() {
                let mut a = vec![f32::NAN; d.q_len()];
                attend(simd, d, &q, &k, &v, &mask, &mut a);
                let saved = v.clone();
                v[10 * hd..20 * hd].fill(1e30);
                v[20 * hd..].fill(f32::NAN);
                let mut b = vec![f32::NAN; d.q_len()];
                attend(simd, d, &q, &k, &v, &mask, &mut b);
                let mut c = vec![f32::NAN; d.q_len()];
                attend_int8(simd, d, &q, &k, &v, &mask, &mut c);
                v = saved;
                let mut a8 = vec![f32::NAN; d.q_len()];
                attend_int8(simd, d, &q, &k, &v, &mask, &mut a8);
                assert_eq!(a, b, "{}", simd.name());
                assert_eq!(a8, c, "int8 {}", simd.name());
                for a in [&a, &a8] {
                    assert!(a[..10 * hd].iter().all(|x| x.is_finite() && *x != 0.0));
                    assert!(a[10 * hd..].iter().all(|&x| x == 0.0), "{}", simd.name());
                }
            }
        }
    }
}
