//! LayerNorm as one tract op. The export spells each LayerNorm as tract's own ops run it
//! fastest among standard forms (`models/train/common.py::export_module`): the row mean as a
//! matmul by a constant 1/d column, a subtraction, `RMSNormalization` (tract's `RmsNorm`),
//! then scale and bias. That is five ops and three passes over the activations, and the
//! matmul repacks its operand first (about 10 µs for 256 rows of 128, three times what the
//! whole norm costs in one loop). [`rule`] replaces the chain with [`FusedLayerNorm`], and
//! takes in the residual sum before it where there is one (the encoder is post-norm: each
//! norm reads `x + sublayer(x)`): left in the graph, tract fuses that add into the matmul
//! that produces `sublayer(x)`, where it reads the other operand a column of tiles at a time
//! and costs about twice what it does in the norm's first pass (BENCHMARKS.md).

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::math::{Add, Mul, Sub};
use tract_core::ops::nn::{Reduce, Reducer, RmsNorm};
use tract_core::{rule_if, rule_if_some};

use super::const_and_other;
use crate::simd::Simd;

/// `(x - mean(x)) / sqrt(var(x) + eps) * gamma + beta` over the last axis, where `x` is the
/// op's one input, or the sum of its two (the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FusedLayerNorm {
    /// Scalar f32.
    pub eps: Arc<Tensor>,
    /// f32, as long as the last axis.
    pub gamma: Arc<Tensor>,
    pub beta: Arc<Tensor>,
    /// Which kernel runs the arithmetic.
    pub simd: Simd,
}

impl Op for FusedLayerNorm {
    fn name(&self) -> StaticName {
        "CellstreamFusedLayerNorm".into()
    }

    op_as_typed_op!();
}

impl EvalOp for FusedLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // In place: the first input's last user is this op, so this moves its buffer.
        let mut inputs = inputs.into_iter();
        let mut x = inputs.next().context("no input")?.into_tensor();
        let other = inputs.next();
        ensure!(inputs.next().is_none(), "more than two inputs");
        let other = match &other {
            Some(o) => {
                ensure!(
                    o.shape() == x.shape(),
                    "sum of {:?} and {:?}",
                    x.shape(),
                    o.shape()
                );
                Some(o.try_as_plain_ram()?.as_slice::<f32>()?)
            }
            None => None,
        };
        let gamma = self.gamma.try_as_plain_ram()?;
        let beta = self.beta.try_as_plain_ram()?;
        let (gamma, beta) = (gamma.as_slice::<f32>()?, beta.as_slice::<f32>()?);
        let d = gamma.len();
        ensure!(
            x.shape().last() == Some(&d),
            "input {:?}, norm over {d}",
            x.shape()
        );
        let eps = self.eps.cast_to_scalar::<f32>()?;
        normalise(
            self.simd,
            x.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            other,
            gamma,
            beta,
            eps,
        );
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for FusedLayerNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 || inputs.len() == 2);
        ensure!(inputs.iter().all(|i| i.datum_type == f32::datum_type()));
        ensure!(inputs.iter().all(|i| i.shape == inputs[0].shape));
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    // Rows are independent: a slice of the output over any axis but the normalised one is
    // the op on the same slice of its inputs (tract's declutter pushes such slices up, e.g.
    // the `<cls>` row of a graph that computes every token's last layer).
    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn slice(
        &self,
        patch: &mut TypedModelPatch,
        _model: &TypedModel,
        node: &TypedNode,
        prefix: &str,
        inputs: &[OutletId],
        output_axis: usize,
        _start: &TDim,
        _end: &TDim,
    ) -> TractResult<Option<TVec<OutletId>>> {
        rule_if!(output_axis + 1 < node.outputs[0].fact.rank());
        patch.wire_node(prefix, self.clone(), inputs).map(Some)
    }
}

/// Every row of `x` (plus `other`'s, where given; rows as long as `gamma`) normalised in
/// place, on `simd`'s kernel where rows are whole vectors of it, else portably. They differ
/// by rounding only (fused multiply-adds, the order of the sums).
///
/// Panics if this CPU does not run `simd`.
pub fn normalise(
    simd: Simd,
    x: &mut [f32],
    other: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert_eq!(gamma.len(), beta.len());
    assert_eq!(x.len() % gamma.len(), 0);
    assert!(other.is_none_or(|o| o.len() == x.len()));
    assert!(simd <= Simd::detect(), "{} on this CPU", simd.name());
    match simd {
        // SAFETY (both arms): the CPU runs the tier (asserted above), rows are whole
        // vectors, `other` is as long as `x`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 if gamma.len().is_multiple_of(16) => unsafe {
            avx512::rows(x, other, gamma, beta, eps)
        },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx2 if gamma.len().is_multiple_of(8) => unsafe {
            avx2::rows(x, other, gamma, beta, eps)
        },
        _ => rows(x, other, gamma, beta, eps),
    }
}

/// The vector kernels: one row at a time, three passes (sum, squared deviations, output),
/// over the vector operations of the module it is expanded in (`load`, `store`, `add`, `sub`,
/// `mul`, `fma`, `splat`, `zero`, `hsum` and the width `L`).
#[cfg(target_arch = "x86_64")]
macro_rules! layer_norm_rows {
    ($features:literal) => {
        /// # Safety
        /// The module's target features; `gamma.len()` a multiple of `L` dividing
        /// `x.len()`; `beta` as long as `gamma`, `other` as `x`.
        #[target_feature(enable = $features)]
        pub unsafe fn rows(
            x: &mut [f32],
            other: Option<&[f32]>,
            gamma: &[f32],
            beta: &[f32],
            eps: f32,
        ) {
            let d = gamma.len();
            let (g, b) = (gamma.as_ptr(), beta.as_ptr());
            for (r, row) in x.chunks_exact_mut(d).enumerate() {
                let p = row.as_mut_ptr();
                let o = other.map(|o| o[r * d..].as_ptr());
                // SAFETY (all loads and stores below): offsets c < d on rows of d.
                unsafe {
                    let mut sum = zero();
                    for c in (0..d).step_by(L) {
                        let mut v = load(p.add(c));
                        if let Some(o) = o {
                            v = add(v, load(o.add(c)));
                            store(p.add(c), v);
                        }
                        sum = add(sum, v);
                    }
                    let mean = splat(hsum(sum) / d as f32);
                    let mut sq = zero();
                    for c in (0..d).step_by(L) {
                        let t = sub(load(p.add(c)), mean);
                        sq = fma(t, t, sq);
                    }
                    let var = hsum(sq) / d as f32;
                    let inv = splat(1.0 / (var + eps).sqrt());
                    for c in (0..d).step_by(L) {
                        let t = mul(sub(load(p.add(c)), mean), inv);
                        store(p.add(c), fma(t, load(g.add(c)), load(b.add(c))));
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const L: usize = 16;
    use {
        _mm512_add_ps as add, _mm512_fmadd_ps as fma, _mm512_loadu_ps as load,
        _mm512_mul_ps as mul, _mm512_reduce_add_ps as hsum, _mm512_set1_ps as splat,
        _mm512_setzero_ps as zero, _mm512_storeu_ps as store, _mm512_sub_ps as sub,
    };

    layer_norm_rows!("avx512f,fma");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const L: usize = 8;
    use {
        _mm256_add_ps as add, _mm256_fmadd_ps as fma, _mm256_loadu_ps as load,
        _mm256_mul_ps as mul, _mm256_set1_ps as splat, _mm256_setzero_ps as zero,
        _mm256_storeu_ps as store, _mm256_sub_ps as sub,
    };

    /// The lanes summed pairwise: halves, then quarters, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(a: __m256) -> f32 {
        let m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
    }

    layer_norm_rows!("avx2,fma");
}

/// The portable reference.
fn rows(x: &mut [f32], other: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    if let Some(other) = other {
        x.iter_mut().zip(other).for_each(|(x, o)| *x += o);
    }
    for x in x.chunks_exact_mut(d) {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &g), &b) in x.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// A constant f32 tensor holding `d` values (any leading unit axes), flattened.
fn vector_of(t: &Tensor, d: usize) -> Option<Arc<Tensor>> {
    (t.datum_type() == f32::datum_type() && t.len() == d && t.shape().last() == Some(&d))
        .then(|| t.clone().into_shape(&[d]).ok().map(Arc::new))
        .flatten()
}

/// The rule, anchored on the `RmsNorm`: x → (einsum by a constant 1/d column → mean) →
/// sub → `RmsNorm` (last axis) → mul by a constant → add a constant, each intermediate
/// feeding only the next.
pub(super) fn rule(
    simd: Simd,
    model: &TypedModel,
    norm: &TypedNode,
    _name: &str,
    op: &RmsNorm,
) -> TractResult<Option<TypedModelPatch>> {
    let fact = model.outlet_fact(norm.id.into())?;
    rule_if!(fact.datum_type == f32::datum_type() && op.axis + 1 == fact.rank());
    rule_if_some!(d = fact.shape[op.axis].as_i64());
    let d = d as usize;
    // Centring: sub(x, mean) with mean = einsum(x, 1/d).
    rule_if_some!(sub = model.single_prec(norm.id)?);
    rule_if!(sub.outputs[0].successors.len() == 1);
    rule_if!(sub.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Sub>()));
    rule_if!(sub.inputs.len() == 2);
    let (x, mean) = (sub.inputs[0], model.node(sub.inputs[1].node));
    rule_if!(mean.outputs[0].successors.len() == 1);
    rule_if_some!(() = is_mean_of_last_axis(model, mean, x, d)?);
    // Scale, then bias.
    rule_if_some!(mul = model.single_succ(norm.id)?);
    rule_if!(mul.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()));
    rule_if_some!((gamma, _) = const_and_other(model, mul));
    rule_if!(mul.outputs[0].successors.len() == 1);
    rule_if_some!(add = model.single_succ(mul.id)?);
    rule_if!(add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()));
    rule_if_some!((beta, _) = const_and_other(model, add));
    rule_if_some!(gamma = vector_of(&gamma, d));
    rule_if_some!(beta = vector_of(&beta, d));
    rule_if!(model.outlet_fact(add.id.into())?.shape == fact.shape);
    let eps = op.eps.cast_to::<f32>()?.into_owned().into_arc_tensor();

    let inputs = residual_sum(model, x)?.unwrap_or_else(|| tvec![x]);
    let mut patch = TypedModelPatch::new(format!("fuse layer norm at {}", norm.name));
    let taps = patch.taps(model, &inputs)?;
    let op = FusedLayerNorm {
        eps,
        gamma,
        beta,
        simd,
    };
    let out = patch.wire_node(format!("{}.fused_layer_norm", norm.name), op, &taps)?;
    patch.shunt_outside(model, add.id.into(), out[0])?;
    Ok(Some(patch))
}

/// Whether `mean` is the mean of `x`'s last axis (`d` long) into a unit axis, as either form
/// spells it: an einsum by a constant 1/d column (the fast export), or tract's expansion of
/// ONNX `LayerNormalization`, a sum then a product by 1/d (a plain torch export).
fn is_mean_of_last_axis(
    model: &TypedModel,
    mean: &TypedNode,
    x: OutletId,
    d: usize,
) -> TractResult<Option<()>> {
    let (xf, mf) = (model.outlet_fact(x)?, model.outlet_fact(mean.id.into())?);
    rule_if!(mf.rank() == xf.rank() && mf.shape[mf.rank() - 1].is_one());
    rule_if!(mf.shape[..mf.rank() - 1] == xf.shape[..xf.rank() - 1]);
    let is_reciprocal = |t: &Tensor| -> TractResult<bool> {
        Ok(t.datum_type() == f32::datum_type()
            && t.len() >= 1
            && t.try_as_plain_ram()?
                .as_slice::<f32>()?
                .iter()
                .all(|&c| c == 1.0 / d as f32))
    };
    if mean.op_as::<EinSum>().is_some_and(|e| e.q_params.is_none()) {
        rule_if!(mean.inputs.len() == 2 && mean.inputs[0] == x);
        rule_if_some!(column = model.outlet_fact(mean.inputs[1])?.konst.clone());
        return Ok((column.len() == d && is_reciprocal(&column)?).then_some(()));
    }
    rule_if!(mean.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()));
    rule_if_some!((scale, sum) = const_and_other(model, mean));
    rule_if!(scale.len() == 1 && is_reciprocal(&scale)?);
    let sum_node = model.node(sum.node);
    rule_if!(sum_node.outputs[0].successors.len() == 1 && sum_node.inputs == [x]);
    let last = xf.rank() - 1;
    Ok(sum_node
        .op_as::<Reduce>()
        .is_some_and(|r| r.reducer == Reducer::Sum && r.axes.as_slice() == [last])
        .then_some(()))
}

/// The two terms of `x` where `x` is an add of two same-shape, non-constant tensors used by
/// the norm's chain alone (its centring and its mean): the one only the add reads first, so
/// that the op can take over its buffer.
fn residual_sum(model: &TypedModel, x: OutletId) -> TractResult<Option<TVec<OutletId>>> {
    let add = model.node(x.node);
    rule_if!(model.outlet_fact(x)?.konst.is_none());
    rule_if!(add.outputs.len() == 1 && add.outputs[0].successors.len() == 2);
    rule_if!(add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()));
    let [a, b] = add.inputs[..] else {
        return Ok(None);
    };
    let fact = model.outlet_fact(x)?;
    for term in [a, b] {
        let f = model.outlet_fact(term)?;
        rule_if!(f.konst.is_none() && f.datum_type == fact.datum_type && f.shape == fact.shape);
    }
    let sole_use = |o: OutletId| model.outlet_successors(o).len() == 1;
    Ok(Some(if sole_use(b) && !sole_use(a) {
        tvec![b, a]
    } else {
        tvec![a, b]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::rng::CellRng;

    #[test]
    fn every_kernel_matches_the_formula_in_f64() {
        eprintln!(
            "layer norm kernels covered: {:?}",
            Simd::available()
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
        );
        for simd in Simd::available() {
            for d in [37, 24, 128, 512] {
                check(simd, d);
            }
        }
    }

    /// Rows of `d`: 37 takes the portable path, 24 the AVX2 one at most, 128 and 512 the
    /// tier's own.
    fn check(simd: Simd, d: usize) {
        let mut rng = CellRng::for_cell(11, "layer norm");
        let mut next = || rng.next_f64() as f32 * 4.0 - 1.0;
        let x: Vec<f32> = (0..5 * d).map(|_| next() * 3.0 + 2.0).collect();
        let gamma: Vec<f32> = (0..d).map(|_| next()).collect();
        let beta: Vec<f32> = (0..d).map(|_| next()).collect();
        let mut out = x.clone();
        normalise(simd, &mut out, None, &gamma, &beta, 1e-5);
        compare(&x, &out, &gamma, &beta);
        // The same rows as the sum of two terms.
        let half: Vec<f32> = x.iter().map(|v| v * 0.25).collect();
        let mut sum: Vec<f32> = x.iter().zip(&half).map(|(v, h)| v - h).collect();
        normalise(simd, &mut sum, Some(&half), &gamma, &beta, 1e-5);
        compare(&x, &sum, &gamma, &beta);
    }

    fn compare(x: &[f32], out: &[f32], gamma: &[f32], beta: &[f32]) {
        let d = gamma.len();
        for (row, got) in x.chunks(d).zip(out.chunks(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let want =
                    (row[i] as f64 - mean) / (var + 1e-5).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((got[i] as f64 - want).abs() < 1e-5, "{} vs {want}", got[i]);
            }
        }
    }
}
