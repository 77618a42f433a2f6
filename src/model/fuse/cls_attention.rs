//! The last layer's attention, for its one query, without the keys and values of every token.
//!
//! The export computes the last layer for the `<cls>` row alone, but its attention still needs
//! keys and values of all `S` tokens: `k = x·Wk + bk`, `v = x·Wv + bv`, a `S × D × 2D`
//! product (about 5% of the forward pass at 256 tokens). With one query per row the products
//! can be taken the other way round, per head `h`:
//!
//! ```text
//! q·k_j       = (Wk_h q_h) · x_j + q_h · bk_h      (the last term is the same for every key:
//!                                                    softmax drops it)
//! Σ_j p_j v_j = Wv_hᵀ (Σ_j p_j x_j) + bv_h         (the weights sum to 1)
//! ```
//!
//! which is `4·S·D` multiply-adds per head instead of `2·S·D·d`. [`rule`] replaces a one-query
//! [`FusedAttention`] whose keys and values are affine, token by token, in the same tensor
//! `x` with [`ClsAttention`]; the affine maps are read off the graph by running the part
//! between `x` and the keys/values on `x = 0` and the unit vectors. Results differ from the
//! original by rounding alone.

use tract_core::internal::*;
use tract_core::ops::array::Gather;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::change_axes::AxisOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;
use tract_core::ops::math::{Add, Mul};
use tract_core::{rule_if, rule_if_some};

use super::FusedAttention;
use crate::simd::{dot, Simd};

/// Attention of one query per row against keys `x·Wk` and values `x·Wv + bv`, computed
/// without them (module comment).
///
/// Inputs: queries `[N, heads, d]` (scaled), the keys' and values' source `x` `[N, S, D]`, the
/// additive key mask `[1, 1, N, S]`. Output `[N, heads, d]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsAttention {
    /// The kernel of the attention op it replaces (the fusion's choice for this CPU).
    pub simd: Simd,
    pub heads: usize,
    pub head_dim: usize,
    /// `[D, heads·d]`: key `j` is `x_j · wk` (its constant part dropped).
    pub wk: Arc<Tensor>,
    /// `[D, heads·d]` and `[heads·d]`: value `j` is `x_j · wv + bv`.
    pub wv: Arc<Tensor>,
    pub bv: Arc<Tensor>,
}

impl Eq for ClsAttention {}

impl Op for ClsAttention {
    fn name(&self) -> StaticName {
        "CellstreamClsAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} heads of {}, from {} features",
            self.heads,
            self.head_dim,
            self.wk.shape()[0]
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ClsAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, x, mask) = args_3!(inputs);
        let (n, hd) = (q.shape()[0], self.heads * self.head_dim);
        let (s, d) = (x.shape()[1], x.shape()[2]);
        ensure!(q.len() == n * hd, "queries {:?}", q.shape());
        ensure!(
            x.shape()[0] == n && d == self.wk.shape()[0],
            "x {:?}",
            x.shape()
        );
        ensure!(
            mask.len() == n * s,
            "mask {:?} for {n} rows of {s}",
            mask.shape()
        );
        let mut out = Tensor::zero::<f32>(q.shape())?;
        let (wk, wv, bv) = (
            self.wk.try_as_plain_ram()?,
            self.wv.try_as_plain_ram()?,
            self.bv.try_as_plain_ram()?,
        );
        let weights = Weights {
            simd: self.simd,
            heads: self.heads,
            head_dim: self.head_dim,
            wk: wk.as_slice::<f32>()?,
            wv: wv.as_slice::<f32>()?,
            bv: bv.as_slice::<f32>()?,
        };
        let (q, x, mask) = (
            q.try_as_plain_ram()?,
            x.try_as_plain_ram()?,
            mask.try_as_plain_ram()?,
        );
        let (q, x, mask) = (
            q.as_slice::<f32>()?,
            x.as_slice::<f32>()?,
            mask.as_slice::<f32>()?,
        );
        {
            let mut o = out.try_as_plain_ram_mut()?;
            let o = o.as_slice_mut::<f32>()?;
            let mut scratch = Scratch::default();
            for row in 0..n {
                weights.attend(
                    &q[row * hd..][..hd],
                    &x[row * s * d..][..s * d],
                    &mask[row * s..][..s],
                    &mut o[row * hd..][..hd],
                    &mut scratch,
                );
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ClsAttention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "queries, x and mask");
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // Per row and head: q' (D·d), scores (S·D), weighted sum (S·D), output (D·d).
        let x = &inputs[1].shape;
        let per_head = (x[1].clone() * 2 + self.head_dim * 2) * &x[2];
        let fma = x[0].clone() * per_head * self.heads;
        Ok(tvec!((Cost::FMA(f32::datum_type()), fma)))
    }
}

/// The op's constants as slices.
struct Weights<'a> {
    simd: Simd,
    heads: usize,
    head_dim: usize,
    wk: &'a [f32],
    wv: &'a [f32],
    bv: &'a [f32],
}

/// Per-call buffers: each head's key-side query, scores, and weighted sum of `x`.
#[derive(Default)]
struct Scratch {
    qx: Vec<f32>,
    p: Vec<f32>,
    u: Vec<f32>,
}

impl Weights<'_> {
    /// One row: `q` `[heads·d]`, `x` `[S, D]`, `mask` `[S]` into `out` `[heads·d]`; the same
    /// loops compiled for each vector tier (same arithmetic, same order).
    fn attend(&self, q: &[f32], x: &[f32], mask: &[f32], out: &mut [f32], sc: &mut Scratch) {
        assert!(
            self.simd <= Simd::detect(),
            "{} on this CPU",
            self.simd.name()
        );
        match self.simd {
            // SAFETY: the CPU runs the tier (asserted above).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { self.attend_avx512(q, x, mask, out, sc) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { self.attend_avx2(q, x, mask, out, sc) },
            _ => self.attend_any(q, x, mask, out, sc),
        }
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn attend_avx512(
        &self,
        q: &[f32],
        x: &[f32],
        mask: &[f32],
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        self.attend_any(q, x, mask, out, sc)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(
        &self,
        q: &[f32],
        x: &[f32],
        mask: &[f32],
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        self.attend_any(q, x, mask, out, sc)
    }

    #[inline(always)]
    fn attend_any(&self, q: &[f32], x: &[f32], mask: &[f32], out: &mut [f32], sc: &mut Scratch) {
        let (h, dh) = (self.heads, self.head_dim);
        let hd = h * dh;
        let d = self.wk.len() / hd;
        let s = mask.len();
        // q'_h = Wk_h q_h, [heads, D].
        sc.qx.clear();
        for head in 0..h {
            let qh = &q[head * dh..][..dh];
            sc.qx
                .extend((0..d).map(|i| dot(&self.wk[i * hd + head * dh..][..dh], qh)));
        }
        // Scores, then softmax, per head: [heads, S].
        sc.p.clear();
        sc.p.resize(h * s, 0.0);
        for (j, xj) in x.chunks_exact(d).enumerate() {
            for head in 0..h {
                sc.p[head * s + j] = dot(xj, &sc.qx[head * d..][..d]) + mask[j];
            }
        }
        for p in sc.p.chunks_exact_mut(s) {
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in p.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            p.iter_mut().for_each(|v| *v *= inv);
        }
        // u_h = Σ_j p_hj x_j, [heads, D].
        sc.u.clear();
        sc.u.resize(h * d, 0.0);
        for (j, xj) in x.chunks_exact(d).enumerate() {
            for head in 0..h {
                let pj = sc.p[head * s + j];
                let u = &mut sc.u[head * d..][..d];
                u.iter_mut().zip(xj).for_each(|(u, x)| *u += pj * x);
            }
        }
        // out_h = Wv_hᵀ u_h + bv_h.
        out.copy_from_slice(self.bv);
        for head in 0..h {
            let u = &sc.u[head * d..][..d];
            let o = &mut out[head * dh..][..dh];
            for (i, &ui) in u.iter().enumerate() {
                let w = &self.wv[i * hd + head * dh..][..dh];
                o.iter_mut().zip(w).for_each(|(o, w)| *o += ui * w);
            }
        }
    }
}

/// Walks back from `from` through ops that are affine in one input token by token (reshapes,
/// selections and einsums on the feature axes, adds and multiplies of feature constants) to
/// the first tensor that is not: the `x` they are a function of.
fn affine_source(model: &TypedModel, from: OutletId) -> TractResult<Option<OutletId>> {
    let const_input = |node: &TypedNode| -> Vec<bool> {
        node.inputs
            .iter()
            .map(|i| model.node(i.node).op_is::<Const>())
            .collect()
    };
    let mut at = from;
    loop {
        let node = model.node(at.node);
        let consts = const_input(node);
        let computed: Vec<usize> = (0..consts.len()).filter(|&i| !consts[i]).collect();
        let [input] = computed[..] else { break };
        let feature_op = if let Some(op) = node.op_as::<AxisOp>() {
            match op {
                AxisOp::Reshape(axis, ..) | AxisOp::Add(axis) | AxisOp::Rm(axis) => *axis >= 2,
                AxisOp::Move(a, b) => *a >= 2 && *b >= 2,
            }
        } else if let Some(g) = node.op_as::<Gather>() {
            g.axis >= 2 && input == 0
        } else if let Some(b) = node.op_as::<TypedBinOp>() {
            let other = model.outlet_fact(node.inputs[1 - input])?;
            (b.0.is::<Add>() || b.0.is::<Mul>()) && other.shape.iter().take(2).all(|d| d.is_one())
        } else if let Some(e) = node.op_as::<EinSum>() {
            super::keeps_token_axes(e, node.inputs.len(), input)
        } else {
            false
        };
        if !feature_op {
            break;
        }
        at = node.inputs[input];
    }
    Ok((at != from).then_some(at))
}

/// The affine map `x ↦ x·W + b` (flattened to `[D, F]` and `[F]`) from `x` to `out`, read
/// off by running that part of the graph on zero and on the unit vectors.
fn affine_map(
    model: &TypedModel,
    x: OutletId,
    outs: &[OutletId],
) -> TractResult<Vec<(Tensor, Tensor)>> {
    let d = model.outlet_fact(x)?.shape[2].to_usize()?;
    let part = super::extract(model, &[x], outs)?;
    let plan = SimplePlan::new(part.into_optimized()?)?;
    let mut probe = vec![0f32; (d + 1) * d];
    for i in 0..d {
        probe[(i + 1) * d + i] = 1.0;
    }
    let probe = Tensor::from_shape(&[1, d + 1, d], &probe)?;
    plan.run(tvec!(probe.into_tvalue()))?
        .into_iter()
        .map(|t| {
            let t = t.try_as_plain_ram()?;
            let t = t.as_slice::<f32>()?;
            let f = t.len() / (d + 1);
            let (b, rows) = t.split_at(f);
            let w: Vec<f32> = rows
                .chunks_exact(f)
                .flat_map(|r| r.iter().zip(b).map(|(r, b)| r - b))
                .collect();
            Ok((
                Tensor::from_shape(&[d, f], &w)?,
                Tensor::from_shape(&[f], b)?,
            ))
        })
        .collect()
}

/// The rule, anchored on a one-query [`FusedAttention`] (queries `[N, heads, d]`).
pub(super) fn rule(
    _ctx: &(),
    model: &TypedModel,
    node: &TypedNode,
    _name: &str,
    attention: &FusedAttention,
) -> TractResult<Option<TypedModelPatch>> {
    let [q, k, v, mask] = node.inputs[..] else {
        return Ok(None);
    };
    let qf = model.outlet_fact(q)?;
    rule_if!(qf.rank() == 3);
    rule_if_some!(heads = qf.shape[1].as_i64());
    rule_if_some!(head_dim = qf.shape[2].as_i64());
    rule_if_some!(x = affine_source(model, k)?);
    rule_if!(affine_source(model, v)? == Some(x));
    let xf = model.outlet_fact(x)?;
    rule_if!(xf.rank() == 3 && xf.datum_type == f32::datum_type());
    rule_if!(xf.shape[0] == qf.shape[0] && xf.shape[1] == model.outlet_fact(k)?.shape[1]);
    rule_if!(xf.shape[2].as_i64().is_some());
    let mut maps = affine_map(model, x, &[k, v])?.into_iter();
    let ((wk, _), (wv, bv)) = (maps.next().context("keys")?, maps.next().context("values")?);
    rule_if!(wk.shape()[1] == (heads * head_dim) as usize);
    let op = ClsAttention {
        simd: attention.simd,
        heads: heads as usize,
        head_dim: head_dim as usize,
        wk: wk.into_arc_tensor(),
        wv: wv.into_arc_tensor(),
        bv: bv.into_arc_tensor(),
    };
    let mut patch = TypedModelPatch::new(format!("one-query attention at {}", node.name));
    let inputs = patch.taps(model, &[q, x, mask])?;
    let out = patch.wire_node(format!("{}.cls", node.name), op, &inputs)?;
    patch.shunt_outside(model, node.id.into(), out[0])?;
    Ok(Some(patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reassociated products give the attention of explicit keys and values, computed
    /// in f64 from the formula, to 1e-5, with every kernel this CPU runs.
    #[test]
    fn matches_attention_over_explicit_keys_and_values() {
        for simd in Simd::available() {
            check(simd);
        }
    }

    fn check(simd: Simd) {
        let (h, dh, d, s) = (4, 8, 24, 37);
        let hd = h * dh;
        let mut seed = 7u64;
        let mut rnd = |scale: f32| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        };
        let mut take = |n: usize, scale: f32| (0..n).map(|_| rnd(scale)).collect::<Vec<f32>>();
        let (wk, bk, wv, bv) = (
            take(d * hd, 0.3),
            take(hd, 0.5),
            take(d * hd, 0.3),
            take(hd, 0.5),
        );
        let (q, x) = (take(hd, 1.0), take(s * d, 1.0));
        let mask: Vec<f32> = (0..s)
            .map(|j| if j % 5 == 3 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let w = Weights {
            simd,
            heads: h,
            head_dim: dh,
            wk: &wk,
            wv: &wv,
            bv: &bv,
        };
        let mut out = vec![0f32; hd];
        w.attend(&q, &x, &mask, &mut out, &mut Scratch::default());

        let proj = |w: &[f32], b: &[f32], j: usize, c: usize| {
            b[c] as f64
                + (0..d)
                    .map(|i| x[j * d + i] as f64 * w[i * hd + c] as f64)
                    .sum::<f64>()
        };
        for head in 0..h {
            let cols = head * dh..(head + 1) * dh;
            let scores: Vec<f64> = (0..s)
                .map(|j| {
                    let qk: f64 = cols
                        .clone()
                        .map(|c| q[c] as f64 * proj(&wk, &bk, j, c))
                        .sum();
                    qk + mask[j] as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in cols {
                let want: f64 = (0..s).map(|j| e[j] / total * proj(&wv, &bv, j, c)).sum();
                let got = out[c] as f64;
                assert!(
                    (got - want).abs() <= 1e-5,
                    "{}: head {head} col {c}: {got} vs {want}",
                    simd.name()
                );
            }
        }
    }
}
