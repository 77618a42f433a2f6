//! Attention as one tract op. The exported graph spells each layer's attention as tract runs
//! fastest among standard ONNX forms (BENCHMARKS.md "Model forward"): scores
//! `Einsum(nqhd,nkhd->hqnk)`, plus the key-padding mask, `Softmax`, weighted sum
//! `Einsum(hqnk,nkhd->nqhd)`. tract runs the two products on its general matmul kernels,
//! which for these shapes (a 32-wide head) spend about as long storing results as computing
//! them, and repacks their operands every time. [`rule`] replaces the four nodes with
//! [`FusedAttention`], which does the same arithmetic in one pass per head
//! (`attention_kernel.rs`).

use tract_core::internal::*;
use tract_core::ops::array::MultiBroadcastTo;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::change_axes::AxisOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::konst::Const;
use tract_core::ops::logic::Iff;
use tract_core::ops::math::{Add, Mul};
use tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_core::{rule_if, rule_if_some};

use super::attention_kernel::{self as kernel, Dims};
use super::const_and_other;
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
    /// The weighted sum in integers (`attention_int8.rs`; int8 packages: `int8.rs` sets it).
    pub int8: bool,
}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "CellstreamFusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "kernel: {}, weighted sum: {}",
            self.simd.name(),
            if self.int8 { "int8" } else { "f32" }
        )])
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
        let attend = if self.int8 {
            kernel::attend_int8
        } else {
            kernel::attend
        };
        attend(
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

    // Queries are independent: a slice of the output over the query axis is the op on the
    // same queries (tract's declutter pushes such slices up: a graph that computes every
    // token's last layer then keeps `<cls>` attends from that one query).
    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        let mapping = AxesMapping::disconnected(inputs, outputs)?;
        if inputs[0].rank() != 4 {
            return Ok(mapping);
        }
        let queries = mapping.axis((InOut::In(0), 1))?.repr;
        mapping.linking(queries, (InOut::Out(0), 1))
    }

    fn slice(
        &self,
        patch: &mut TypedModelPatch,
        model: &TypedModel,
        node: &TypedNode,
        prefix: &str,
        inputs: &[OutletId],
        output_axis: usize,
        _start: &TDim,
        _end: &TDim,
    ) -> TractResult<Option<TVec<OutletId>>> {
        rule_if!(output_axis == 1 && model.outlet_fact(node.inputs[0])?.rank() == 4);
        patch.wire_node(prefix, self.clone(), inputs).map(Some)
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
/// weighted-sum einsum, each feeding only the next. Two layouts: token-major (the fast
/// export's, [`token_major`]) and head-major (torch's `scaled_dot_product_attention`,
/// [`head_major`]).
pub(super) fn rule(
    simd: Simd,
    model: &TypedModel,
    softmax: &TypedNode,
    op: &Softmax,
) -> TractResult<Option<TypedModelPatch>> {
    rule_if!(op.kind == SoftmaxKind::Softmax && op.quant_output_dt.is_none());
    rule_if!(op.axes.as_slice() == [3]);
    rule_if_some!(before = model.single_prec(softmax.id)?);
    rule_if!(before.outputs[0].successors.len() == 1);
    rule_if_some!(weighted = model.single_succ(softmax.id)?);
    rule_if!(weighted.inputs.len() == 2 && weighted.inputs[0] == softmax.id.into());
    if before.op_is::<Iff>() {
        return masked_fill(simd, model, softmax, before, weighted);
    }
    let add = before;
    rule_if!(add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()));
    rule_if!(add.inputs.len() == 2);
    if let Some(patch) = token_major(simd, model, softmax, add, weighted)? {
        return Ok(Some(patch));
    }
    head_major(simd, model, softmax, add, weighted)
}

/// Queries `[N, S_q, heads, d]` (or `[N, heads, d]`), keys and values `[N, S_k, heads, d]`,
/// scores `[heads, S_q, N, S_k]` and a `[1, 1, N, S_k]` mask: the kernel's own layout.
fn token_major(
    simd: Simd,
    model: &TypedModel,
    softmax: &TypedNode,
    add: &TypedNode,
    weighted: &TypedNode,
) -> TractResult<Option<TypedModelPatch>> {
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
    rule_if!(einsum_is(weighted, weighted_form));

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
        FusedAttention { simd, int8: false },
        &inputs,
    )?;
    patch.shunt_outside(model, weighted.id.into(), out[0])?;
    Ok(Some(patch))
}

/// Torch's attention as tract reads it: scaled queries `[N, heads, S_q, d]` times keys
/// transposed `[N, heads, d, S_k]` into scores `[N, heads, S_q, S_k]`, plus the key mask
/// broadcast from `[N, 1, 1, S_k]`, softmax, times values `[N, heads, S_k, d]` into any
/// order of `(N, heads, S_q, d)`. The operands move into the kernel's layout and its output
/// into the einsum's (copies of `N·S·D` floats each, beside the `S²` work they replace).
fn head_major(
    simd: Simd,
    model: &TypedModel,
    softmax: &TypedNode,
    add: &TypedNode,
    weighted: &TypedNode,
) -> TractResult<Option<TypedModelPatch>> {
    let (a, b) = (
        model.node(add.inputs[0].node),
        model.node(add.inputs[1].node),
    );
    // Scores: abmk,abkn->abmn (a rows, b heads, m queries, n keys, k features).
    let scores_form = |n: &TypedNode| {
        einsum_letters(n, [4, 4, 4]).is_some_and(|[x, y, o]| {
            let distinct = [x[0], x[1], x[2], x[3], y[3]];
            distinct
                .iter()
                .enumerate()
                .all(|(i, c)| !distinct[..i].contains(c))
                && y[..3] == [x[0], x[1], x[3]]
                && o == [x[0], x[1], x[2], y[3]]
        })
    };
    let found = if scores_form(a) {
        Some((a, add.inputs[1]))
    } else if scores_form(b) {
        Some((b, add.inputs[0]))
    } else {
        None
    };
    rule_if_some!((scores, mask) = found);
    rule_if!(scores.outputs[0].successors.len() == 1);
    // Weighted sum: abmk,abkn->(a permutation of abmn), the softmax first.
    rule_if_some!([x, y, out] = einsum_letters(weighted, [4, 4, 4]));
    let distinct = [x[0], x[1], x[2], x[3], y[3]];
    rule_if!(distinct
        .iter()
        .enumerate()
        .all(|(i, c)| !distinct[..i].contains(c)));
    rule_if!(y[..3] == [x[0], x[1], x[3]]);
    let (rows, heads, queries, features) = (x[0], x[1], x[2], y[3]);
    rule_if!(
        out.len() == 4
            && [rows, heads, queries, features]
                .iter()
                .all(|c| out.contains(c))
    );

    let (q, kt, v) = (scores.inputs[0], scores.inputs[1], weighted.inputs[1]);
    let [qf, kf, vf] = [q, kt, v].map(|o| model.outlet_fact(o));
    let (qf, kf, vf) = (qf?, kf?, vf?);
    rule_if!([qf, kf, vf]
        .iter()
        .all(|f| f.datum_type == f32::datum_type() && f.rank() == 4));
    let (n, h, d) = (&qf.shape[0], &qf.shape[1], &qf.shape[3]);
    let sk = &kf.shape[3];
    rule_if!(kf.shape[..3] == [n.clone(), h.clone(), d.clone()]);
    rule_if!(vf.shape.as_ref() == [n.clone(), h.clone(), sk.clone(), d.clone()]);
    rule_if!(d.as_i64().is_some() && h.as_i64().is_some());
    // The mask: one row of S_k per row, the same for every head and query.
    let broadcast = model.node(mask.node);
    let mask = if broadcast.op_is::<MultiBroadcastTo>() {
        broadcast.inputs[0]
    } else {
        mask
    };
    let mf = model.outlet_fact(mask)?;
    rule_if!(mf.datum_type == f32::datum_type() && mf.rank() == 4);
    rule_if!(mf.shape[0] == *n && mf.shape[1].is_one() && mf.shape[2].is_one());
    rule_if!(mf.shape[3] == *sk);

    let name = &softmax.name;
    let mut patch = TypedModelPatch::new(format!("fuse head-major attention at {name}"));
    let [q, kt, v, mask] = patch.taps(model, &[q, kt, v, mask])?[..] else {
        unreachable!("four taps")
    };
    let mut wire = |suffix: &str, op: AxisOp, input: OutletId| {
        patch
            .wire_node(format!("{name}.{suffix}"), op, &[input])
            .map(|o| o[0])
    };
    // [N, H, S, d] → [N, S, H, d]; keys [N, H, d, S] → [N, S, H, d]; mask → [1, 1, N, S].
    let q = wire("queries", AxisOp::Move(1, 2), q)?;
    let k = wire("keys", AxisOp::Move(3, 1), kt)?;
    let v = wire("values", AxisOp::Move(1, 2), v)?;
    let mask = wire("mask.rm1", AxisOp::Rm(1), mask)?;
    let mask = wire("mask.rm2", AxisOp::Rm(1), mask)?;
    let mask = wire("mask.add1", AxisOp::Add(0), mask)?;
    let mask = wire("mask.add2", AxisOp::Add(0), mask)?;
    let mut result = patch.wire_node(
        format!("{name}.fused_attention"),
        FusedAttention { simd, int8: false },
        &[q, k, v, mask],
    )?[0];
    let order = [rows, queries, heads, features];
    result = into_order(&mut patch, name, result, order, &out)?;
    ensure!(
        patch.outlet_fact(result)?.shape == model.outlet_fact(weighted.id.into())?.shape,
        "head-major attention at {name}: output shape"
    );
    patch.shunt_outside(model, weighted.id.into(), result)?;
    Ok(Some(patch))
}

/// The kernel's output, its axes named by `order` (rows, queries, heads, features), moved
/// into the order `out` names, one axis at a time (a move takes an axis out and puts it back
/// at another position).
fn into_order(
    patch: &mut TypedModelPatch,
    name: &str,
    mut wire: OutletId,
    order: [char; 4],
    out: &[char],
) -> TractResult<OutletId> {
    let mut order = order.to_vec();
    for (to, want) in out.iter().enumerate() {
        let from = order
            .iter()
            .position(|c| c == want)
            .context("output axis")?;
        if from != to {
            wire = patch.wire_node(
                format!("{name}.output.{to}"),
                AxisOp::Move(from, to),
                &[wire],
            )?[0];
            let c = order.remove(from);
            order.insert(to, c);
        }
    }
    Ok(wire)
}

/// scGPT's pre-norm layers (`TorchFlashMHA`) as torch.onnx writes them: queries, keys and
/// values `[N, S, 1, heads, d]` (slices of one `[N, S, 3, heads, d]` projection), scores
/// `bqahd,bkchd->bhqk`, times a scalar scale, the padding keys filled with −∞ by `Where`
/// (a boolean `[N, 1, 1, S_k]`), softmax, then `bhqk,bkahd->` any order of `(b, q, h, d)`.
/// The scale moves onto the queries and the fill becomes the kernel's additive mask.
fn masked_fill(
    simd: Simd,
    model: &TypedModel,
    softmax: &TypedNode,
    fill: &TypedNode,
    weighted: &TypedNode,
) -> TractResult<Option<TypedModelPatch>> {
    let [cond, filler, x] = fill.inputs[..] else {
        return Ok(None);
    };
    rule_if_some!(filler = model.outlet_fact(filler)?.konst.clone());
    rule_if!(filler.datum_type() == f32::datum_type());
    rule_if!(filler
        .try_as_plain_ram()?
        .as_slice::<f32>()?
        .iter()
        .all(|&v| v == f32::NEG_INFINITY));
    // An optional scalar scale between the scores and the fill.
    let mut scores = model.node(x.node);
    let mut scale = None;
    if scores
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<Mul>())
    {
        rule_if!(scores.outputs[0].successors.len() == 1);
        rule_if_some!((k, other) = const_and_other(model, scores));
        rule_if!(k.datum_type() == f32::datum_type() && k.len() == 1);
        scale = Some(k.cast_to_scalar::<f32>()?);
        scores = model.node(other.node);
    }
    rule_if!(scores.outputs[0].successors.len() == 1);
    // Scores: bqahd,bkchd->bhqk, `a` and `c` unit axes.
    rule_if_some!([xs, ys, os] = einsum_letters(scores, [5, 5, 4]));
    rule_if!(xs[0] == ys[0] && xs[3] == ys[3] && xs[4] == ys[4] && xs[1] != ys[1]);
    rule_if!(os == [xs[0], xs[3], xs[1], ys[1]]);
    rule_if!(![xs[2], ys[2], xs[4]].iter().any(|c| os.contains(c)));
    // Weighted sum: bhqk,bkahd-> (b, q, h, d) in any order.
    rule_if_some!([ws, vs, out] = einsum_letters(weighted, [4, 5, 4]));
    let (rows, heads, queries, keys) = (ws[0], ws[1], ws[2], ws[3]);
    rule_if!(vs[0] == rows && vs[1] == keys && vs[3] == heads);
    let features = vs[4];
    rule_if!(![vs[2], features].iter().any(|c| ws.contains(c)));
    rule_if!([rows, queries, heads, features]
        .iter()
        .all(|c| out.contains(c)));

    let (q, k, v) = (scores.inputs[0], scores.inputs[1], weighted.inputs[1]);
    let [qf, kf, vf] = [q, k, v].map(|o| model.outlet_fact(o));
    let (qf, kf, vf) = (qf?, kf?, vf?);
    rule_if!([qf, kf, vf]
        .iter()
        .all(|f| f.datum_type == f32::datum_type() && f.rank() == 5 && f.shape[2].is_one()));
    rule_if!(kf.shape == vf.shape && qf.shape[0] == kf.shape[0]);
    rule_if!(qf.shape[3..] == kf.shape[3..]);
    rule_if!(qf.shape[4].as_i64().is_some() && qf.shape[3].as_i64().is_some());
    let cf = model.outlet_fact(cond)?;
    rule_if!(cf.datum_type == bool::datum_type() && cf.rank() == 4);
    rule_if!(cf.shape[0] == kf.shape[0] && cf.shape[1].is_one() && cf.shape[2].is_one());
    rule_if!(cf.shape[3] == kf.shape[1]);

    let name = &softmax.name;
    let mut patch = TypedModelPatch::new(format!("fuse masked-fill attention at {name}"));
    let [q, k, v, cond] = patch.taps(model, &[q, k, v, cond])?[..] else {
        unreachable!("four taps")
    };
    let unit = |x: f32| -> TractResult<Const> {
        Const::new(tensor0(x).into_shape(&[1, 1, 1, 1])?.into_arc_tensor())
    };
    let mut wire = |suffix: &str, op: Box<dyn TypedOp>, inputs: &[OutletId]| {
        patch
            .wire_node(format!("{name}.{suffix}"), op, inputs)
            .map(|o| o[0])
    };
    // [N, S, 1, H, d] → [N, S, H, d]; the scale on the queries.
    let mut q = wire("queries", Box::new(AxisOp::Rm(2)), &[q])?;
    if let Some(scale) = scale {
        let c = wire("scale", Box::new(unit(scale)?), &[])?;
        let mul = TypedBinOp(Box::new(Mul), None);
        q = wire("queries.scaled", Box::new(mul), &[q, c])?;
    }
    let k = wire("keys", Box::new(AxisOp::Rm(2)), &[k])?;
    let v = wire("values", Box::new(AxisOp::Rm(2)), &[v])?;
    // The boolean [N, 1, 1, S] as the additive [1, 1, N, S].
    let mut cond = wire("mask.rm1", Box::new(AxisOp::Rm(1)), &[cond])?;
    cond = wire("mask.rm2", Box::new(AxisOp::Rm(1)), &[cond])?;
    cond = wire("mask.add1", Box::new(AxisOp::Add(0)), &[cond])?;
    cond = wire("mask.add2", Box::new(AxisOp::Add(0)), &[cond])?;
    let minus_inf = wire("mask.minus_inf", Box::new(unit(f32::NEG_INFINITY)?), &[])?;
    let zero = wire("mask.zero", Box::new(unit(0.0)?), &[])?;
    let mask = wire("mask", Box::new(Iff), &[cond, minus_inf, zero])?;
    let attention = Box::new(FusedAttention { simd, int8: false });
    let result = wire("fused_attention", attention, &[q, k, v, mask])?;
    let order = [rows, queries, heads, features];
    let result = into_order(&mut patch, name, result, order, &out)?;
    ensure!(
        patch.outlet_fact(result)?.shape == model.outlet_fact(weighted.id.into())?.shape,
        "masked-fill attention at {name}: output shape"
    );
    patch.shunt_outside(model, weighted.id.into(), result)?;
    Ok(Some(patch))
}

/// The operands and output of an f32 einsum of two inputs as letters, if they have `ranks`
/// axes.
fn einsum_letters(node: &TypedNode, ranks: [usize; 3]) -> Option<[Vec<char>; 3]> {
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return None;
    }
    let expr = op.axes.to_string();
    let (ins, out) = expr.split_once("->")?;
    let (a, b) = ins.split_once(',')?;
    let letters = [a, b, out].map(|s| s.chars().collect::<Vec<_>>());
    (letters.iter().map(Vec::len).eq(ranks)).then_some(letters)
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
