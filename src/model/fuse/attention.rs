//! Attention as one tract op. The exported graph spells each layer's attention as tract runs
//! fastest among standard ONNX forms (BENCHMARKS.md "Model forward"): scores
//! `Einsum(nqhd,nkhd->hqnk)`, plus the key-padding mask, `Softmax`, weighted sum
//! `Einsum(hqnk,nkhd->nqhd)`. tract runs the two products on its general matmul kernels,
//! which for these shapes (a 32-wide head) spend about as long storing results as computing
//! them, and repacks their operands every time. [`rule`] replaces the four nodes with
//! [`FusedAttention`], which does the same arithmetic in one pass per head
//! (`attention_kernel.rs`).

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::math::Add;
use tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_core::{rule_if, rule_if_some};

use super::attention_kernel::{self as kernel, Dims};
use crate::simd::Simd;

/// Scores, mask, softmax and weighted sum of one attention layer, all heads.
///
/// Inputs: queries `[N, S_q, heads, d]` (already scaled) or `[N, heads, d]` for one query per
/// row (the last layer, `<cls>` only), keys and values `[N, S_k, heads, d]`, the additive key
/// mask as `[1, 1, N, S_k]` (how the graph broadcasts it). Output: the queries' shape, as the
/// weighted-sum `Einsum` it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FusedAttention {
    /// Which kernel runs the arithmetic.
    pub simd: Simd,
}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "CellstreamFusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {}", self.simd.name())])
    }

    op_as_typed_op!();
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v, mask) = args_4!(inputs);
        let (qs, ks) = (q.shape(), k.shape());
        ensure!(
            ks.len() == 4 && (qs.len() == 4 || qs.len() == 3),
            "q {qs:?}, k {ks:?}: expected [N, (S,) heads, d] and [N, S, heads, d]"
        );
        ensure!(v.shape() == ks, "values {:?}, keys {ks:?}", v.shape());
        let sq = if qs.len() == 4 { qs[1] } else { 1 };
        ensure!(
            qs[0] == ks[0] && qs[qs.len() - 2..] == ks[2..],
            "queries {qs:?} and keys {ks:?} disagree"
        );
        let dims = Dims {
            n: qs[0],
            sq,
            sk: ks[1],
            heads: ks[2],
            head_dim: ks[3],
        };
        ensure!(
            mask.len() == dims.mask_len(),
            "mask {:?} for {} rows of {} keys",
            mask.shape(),
            dims.n,
            dims.sk
        );
        // SAFETY: f32 has no invalid bit patterns, and the kernel writes every output.
        let mut out = unsafe { Tensor::uninitialized::<f32>(qs)? };
        kernel::attend(
            self.simd,
            dims,
            q.try_as_plain_ram()?.as_slice::<f32>()?,
            k.try_as_plain_ram()?.as_slice::<f32>()?,
            v.try_as_plain_ram()?.as_slice::<f32>()?,
            mask.try_as_plain_ram()?.as_slice::<f32>()?,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedAttention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 4, "queries, keys, values and mask");
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "f32 only"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // Two products of S_q × S_k × d per row and head.
        let (q, k) = (&inputs[0].shape, &inputs[1].shape);
        let fma = q.iter().product::<TDim>() * &k[1] * 2;
        Ok(tvec!((Cost::FMA(f32::datum_type()), fma)))
    }
}

/// Letters renamed in order of first appearance, so that an einsum reads the same whatever
/// letters the exporter chose: `nqhd,nkhd->hqnk` is `abcd,aecd->cbae`.
fn canonical(expr: &str) -> String {
    let mut seen = Vec::new();
    expr.chars()
        .map(|c| {
            if !c.is_ascii_alphabetic() {
                return c;
            }
            let i = seen.iter().position(|&s| s == c).unwrap_or_else(|| {
                seen.push(c);
                seen.len() - 1
            });
            (b'a' + i as u8) as char
        })
        .collect()
}

/// An f32 einsum (no quantisation) computing exactly `expr`, up to letter names.
fn einsum_is(node: &TypedNode, expr: &str) -> bool {
    node.op_as::<EinSum>().is_some_and(|op| {
        op.q_params.is_none()
            && op.operating_dt == f32::datum_type()
            && canonical(&op.axes.to_string()) == canonical(expr)
    })
}

/// The rule, anchored on the softmax: scores einsum → add (mask) → softmax (last axis) →
/// weighted-sum einsum, each feeding only the next.
pub(super) fn rule(
    simd: Simd,
    model: &TypedModel,
    softmax: &TypedNode,
    op: &Softmax,
) -> TractResult<Option<TypedModelPatch>> {
    rule_if!(op.kind == SoftmaxKind::Softmax && op.quant_output_dt.is_none());
    rule_if!(op.axes.as_slice() == [3]);
    rule_if_some!(add = model.single_prec(softmax.id)?);
    rule_if!(add.outputs[0].successors.len() == 1);
    rule_if!(add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()));
    rule_if!(add.inputs.len() == 2);
    // Every query of a row, or one (tract drops the unit query axis of the `<cls>`-only
    // last layer from the query and the output).
    const FORMS: [(&str, &str); 2] = [
        ("nqhd,nkhd->hqnk", "hqnk,nkhd->nqhd"),
        ("nhd,nkhd->hqnk", "hqnk,nkhd->nhd"),
    ];
    let (a, b) = (
        model.node(add.inputs[0].node),
        model.node(add.inputs[1].node),
    );
    rule_if_some!(
        (scores, mask, weighted_form) = FORMS.iter().find_map(|&(s, w)| {
            if einsum_is(a, s) {
                Some((a, add.inputs[1], w))
            } else if einsum_is(b, s) {
                Some((b, add.inputs[0], w))
            } else {
                None
            }
        })
    );
    rule_if!(scores.outputs[0].successors.len() == 1);
    rule_if_some!(weighted = model.single_succ(softmax.id)?);
    rule_if!(einsum_is(weighted, weighted_form));
    rule_if!(weighted.inputs[0] == softmax.id.into());

    let (q, k, v) = (scores.inputs[0], scores.inputs[1], weighted.inputs[1]);
    let [qf, kf, vf, mf] = [q, k, v, mask].map(|o| model.outlet_fact(o));
    let (qf, kf, vf, mf) = (qf?, kf?, vf?, mf?);
    rule_if!([qf, kf, vf, mf]
        .iter()
        .all(|f| f.datum_type == f32::datum_type()));
    rule_if!(kf.shape == vf.shape);
    let qr = qf.rank();
    rule_if!(qf.shape[0] == kf.shape[0] && qf.shape[qr - 2..] == kf.shape[2..]);
    // The mask broadcast over heads and queries: [1, 1, N, S_k].
    rule_if!(mf.rank() == 4 && mf.shape[0].is_one() && mf.shape[1].is_one());
    rule_if!(mf.shape[2] == qf.shape[0] && mf.shape[3] == kf.shape[1]);
    rule_if!(kf.shape[3].as_i64().is_some());

    let mut patch = TypedModelPatch::new(format!("fuse attention at {}", softmax.name));
    let inputs = patch.taps(model, &[q, k, v, mask])?;
    let out = patch.wire_node(
        format!("{}.fused_attention", softmax.name),
        FusedAttention { simd },
        &inputs,
    )?;
    patch.shunt_outside(model, weighted.id.into(), out[0])?;
    Ok(Some(patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_letters_by_first_appearance() {
        assert_eq!(canonical("nqhd,nkhd->hqnk"), "abcd,aecd->cbae");
        assert_eq!(canonical("bxhy,bzhy->hxbz"), "abcd,aecd->cbae");
        assert_ne!(canonical("nqhd,nkhd->hqnk"), canonical("hqnk,nkhd->nqhd"));
    }
}
