//! Rewrites of the parsed graph into ops of our own, where tract's general ones cost more
//! than the arithmetic (BENCHMARKS.md "Model forward"):
//!
//! - each attention layer (scores einsum, mask add, softmax, weighted-sum einsum) as one
//!   [`attention::FusedAttention`];
//! - the last layer's one-query attention as [`ClsAttention`], which never computes the
//!   keys and values of every token (`cls_attention.rs`);
//! - each LayerNorm, as the export spells it (mean by a matmul, centring, `RmsNorm`, scale,
//!   bias), as one [`layer_norm::FusedLayerNorm`];
//! - the functions of one token's own input (gene encoder, value encoder, the first layer's
//!   projection of their sum) as [`TokenTable`] lookups, computed for every possible input
//!   when the model loads ([`TokenTables`], a separate transform);
//! - every product by constant weights as a [`Linear`] with its weights packed once, in a
//!   separate transform run last (`linear.rs`): in int8 where the package opts in
//!   (`precision = "int8"`, [`Precision`]; attention's weighted sum in integers too,
//!   `attention_int8.rs`), or in f32 on our AVX2 kernel where that is the kernel choice
//!   (`f32_kernel.rs`, `model/kernel_choice.rs`).
//!
//! The rewrites are algebra: they run on every CPU ([`Fusion::best`]). Only the arithmetic
//! inside an op picks a kernel, from the [`Simd`] tier chosen once at run time (AVX-512,
//! AVX2+FMA, portable). The ONNX file is unchanged (onnxruntime runs it as before); the
//! rewrite is a tract model transform applied after parsing. `CELLSTREAM_FUSION=tract` runs
//! the graph as it is, on tract's own ops (for comparisons).

mod attention;
mod attention_int8;
mod attention_kernel;
mod cls_attention;
mod f32_kernel;
mod int8_kernel;
mod layer_norm;
mod linear;
mod token_tables;

use std::collections::HashMap;

use tract_core::internal::*;
use tract_core::model::Rewriter;
use tract_core::ops::array::{Gather, Slice};
use tract_core::ops::change_axes::AxisOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::{RmsNorm, Softmax};
use tract_core::transform::ModelTransform;
use tract_core::{rule_if, rule_if_some};

use crate::simd::Simd;

pub use attention::FusedAttention;
pub use attention_kernel::Dims;
pub use cls_attention::ClsAttention;
pub use f32_kernel::PackedWeights;
pub use int8_kernel::QuantWeights;
pub use layer_norm::FusedLayerNorm;
pub use linear::{
    Linear, LinearWeights, Precision, F32_PRODUCTS_PROPERTY, INT8_ATTENTION_PROPERTY,
    INT8_BYTES_PROPERTY, INT8_PRODUCTS_PROPERTY, OWN_F32_PRODUCTS,
};
pub use token_tables::{
    FoldSummary, TokenTable, MAX_EXTRA_TABLE_BYTES, TOKEN_TABLES_PROPERTY,
    TOKEN_TABLE_BYTES_PROPERTY, TOKEN_TABLE_REPLACED_PROPERTY, VALUE_KEYS,
};

/// The model properties where the transform records how many attention layers and
/// LayerNorms it fused.
pub const FUSED_ATTENTION_PROPERTY: &str = "cellstream.fused_attention_layers";
pub const FUSED_LAYER_NORM_PROPERTY: &str = "cellstream.fused_layer_norms";

/// Whether the graph is rewritten into our ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// As the graph spells it, on tract's own ops.
    Tract,
    /// Attention layers and LayerNorms fused (each op on the runtime's [`Simd`] tier).
    Fused,
}

impl Fusion {
    /// Fused, on every CPU: the portable kernels are vectorised by the compiler too.
    pub fn best() -> Fusion {
        Fusion::Fused
    }

    /// [`Fusion::best`], unless `CELLSTREAM_FUSION` names another (`tract`, `fused`): a
    /// knob for comparisons, not a setting.
    pub fn from_env() -> Result<Fusion, String> {
        super::knob(
            "CELLSTREAM_FUSION",
            Fusion::best(),
            &[Fusion::Tract, Fusion::Fused],
            Fusion::name,
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Fusion::Tract => "tract",
            Fusion::Fused => "fused",
        }
    }

    /// The tract transform that fuses with `simd`'s kernels, if any.
    pub fn transform(self, simd: Simd) -> Option<&'static str> {
        match self {
            Fusion::Tract => None,
            Fusion::Fused => Some(FuseGraph { simd }.registered()),
        }
    }
}

/// The model transform: fuses every attention layer and LayerNorm it recognises, then records
/// how many of each in the model's properties.
#[derive(Debug, Clone)]
pub struct FuseGraph {
    pub simd: Simd,
}

impl FuseGraph {
    /// The name it is registered under (one per tier: tract's registry builds transforms
    /// by name).
    fn registered(&self) -> &'static str {
        match self.simd {
            Simd::Portable => "cellstream_fuse_portable",
            Simd::Avx2 => "cellstream_fuse_avx2",
            Simd::Avx512 => "cellstream_fuse_avx512",
        }
    }
}

impl ModelTransform for FuseGraph {
    fn name(&self) -> StaticName {
        self.registered().into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let simd = self.simd;
        Rewriter::default()
            .with_rule_for(
                "fuse-attention",
                move |_: &(), m: &TypedModel, n: &TypedNode, _: &str, op: &Softmax| {
                    attention::rule(simd, m, n, op)
                },
            )
            .with_rule_for(
                "fuse-layer-norm",
                move |_: &(), m: &TypedModel, n: &TypedNode, name: &str, op: &RmsNorm| {
                    layer_norm::rule(simd, m, n, name, op)
                },
            )
            .with_rule_for("one-query-attention", cls_attention::rule)
            .rewrite(&(), model)?;
        // Drop the projections the one-query attention made dead (keys and values of every
        // token in the last layer), and their weights with them.
        model.compact()?;
        let count = |model: &TypedModel, is: fn(&TypedNode) -> bool| {
            rctensor0(model.nodes().iter().filter(|n| is(n)).count() as i64)
        };
        let attention = count(model, |n| {
            n.op_is::<FusedAttention>() || n.op_is::<ClsAttention>()
        });
        let norms = count(model, |n| n.op_is::<FusedLayerNorm>());
        model
            .properties
            .insert(FUSED_ATTENTION_PROPERTY.into(), attention);
        model
            .properties
            .insert(FUSED_LAYER_NORM_PROPERTY.into(), norms);
        Ok(())
    }
}

/// Every row picked out of a computed tensor (a `Gather` of one constant index) as a slice of
/// that row and the axis dropped: the same values, in the form tract's declutter pushes up
/// through the ops before it (ours included). At an output (`x[:, 0]`: a plain torch export
/// computes every token's last layer, then keeps `<cls>`) the last layer is then computed for
/// that row alone; inside the graph (torch's q, k and v picked out of a `[3, S, N, D]` copy of
/// the projection) each is sliced from the projection itself, and neither the moved copy nor
/// the picked ones are made. Runs after the token tables, which read the fast export's q/k/v
/// gathers as they are (so does the one-query rule, in [`FuseGraph`]).
#[derive(Debug, Clone)]
pub struct RowsAsSlices;

impl ModelTransform for RowsAsSlices {
    fn name(&self) -> StaticName {
        ROWS_AS_SLICES.into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        Rewriter::default()
            .with_rule_for("row-as-slice", row_as_slice)
            .rewrite(&(), model)
    }
}

/// The name [`RowsAsSlices`] is registered under.
pub const ROWS_AS_SLICES: &str = "cellstream_rows_as_slices";

register_simple_model_transform!("cellstream_rows_as_slices", RowsAsSlices);

fn row_as_slice(
    _: &(),
    model: &TypedModel,
    node: &TypedNode,
    name: &str,
    op: &Gather,
) -> TractResult<Option<TypedModelPatch>> {
    rule_if!(node.inputs.len() == 2);
    let (data, indices) = (
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    );
    rule_if!(data.datum_type == f32::datum_type() && data.konst.is_none());
    rule_if_some!(index = indices.konst.as_ref());
    rule_if!(index.rank() == 0 && op.output_type.is_none());
    // A row counted from the end only where the length is known (`S` is a symbol here).
    let i = index.cast_to_scalar::<i64>()?;
    let i = if i < 0 {
        rule_if_some!(len = data.shape[op.axis].as_i64());
        i + len
    } else {
        i
    };
    rule_if!(i >= 0);
    let mut patch = TypedModelPatch::new(format!("row as a slice at {name}"));
    let wire = patch.tap_model(model, node.inputs[0])?;
    let slice = Slice::new(op.axis, i as usize, i as usize + 1);
    let wire = patch.wire_node(format!("{name}.slice"), slice, &[wire])?;
    let wire = patch.wire_node(format!("{name}.rm"), AxisOp::Rm(op.axis), &wire)?;
    patch.shunt_outside(model, node.id.into(), wire[0])?;
    Ok(Some(patch))
}

register_simple_model_transform!(
    "cellstream_fuse_portable",
    FuseGraph {
        simd: Simd::Portable
    }
);
register_simple_model_transform!("cellstream_fuse_avx2", FuseGraph { simd: Simd::Avx2 });
register_simple_model_transform!("cellstream_fuse_avx512", FuseGraph { simd: Simd::Avx512 });

/// An f32 product of two inputs, `input` the computed one, that keeps its row and token axes
/// (the first two) as the output's first two and leaves them out of the other input: a
/// product token by token, like a projection against a constant.
pub(crate) fn keeps_token_axes(e: &EinSum, inputs: usize, input: usize) -> bool {
    e.q_params.is_none()
        && inputs == 2
        && (0..2).all(|pos| {
            e.axes.axis((InOut::In(input), pos)).is_ok_and(|axis| {
                axis.outputs[0].as_slice() == [pos] && axis.inputs[1 - input].is_empty()
            })
        })
}

/// A constant input of `node`, with the outlet of its other input.
pub(crate) fn const_and_other(
    model: &TypedModel,
    node: &TypedNode,
) -> Option<(Arc<Tensor>, OutletId)> {
    let [a, b] = node.inputs[..] else {
        return None;
    };
    let konst = |o: OutletId| model.outlet_fact(o).ok()?.konst.clone();
    konst(b)
        .map(|k| (k, a))
        .or_else(|| konst(a).map(|k| (k, b)))
}

/// A model computing `outputs` from `sources` (outlets of `model`, each made an input of the
/// new model with its fact), holding only the nodes in between.
pub(crate) fn extract(
    model: &TypedModel,
    sources: &[OutletId],
    outputs: &[OutletId],
) -> TractResult<TypedModel> {
    let mut keep = vec![false; model.nodes().len()];
    let mut stack: Vec<usize> = outputs.iter().map(|o| o.node).collect();
    while let Some(n) = stack.pop() {
        if !std::mem::replace(&mut keep[n], true) && !sources.iter().any(|s| s.node == n) {
            stack.extend(model.node(n).inputs.iter().map(|i| i.node));
        }
    }
    let mut part = TypedModel {
        symbols: model.symbols.clone(),
        ..TypedModel::default()
    };
    let mut map = HashMap::<OutletId, OutletId>::new();
    for s in sources {
        let name = format!("{}.source", model.node(s.node).name);
        map.insert(*s, part.add_source(name, model.outlet_fact(*s)?.clone())?);
    }
    let wanted: Vec<usize> = outputs.iter().map(|o| o.node).collect();
    let inputs: Vec<usize> = model.inputs.iter().map(|o| o.node).collect();
    let order =
        tract_core::model::order::eval_order_for_nodes(model.nodes(), &inputs, &wanted, &[])?;
    for id in order.into_iter().filter(|&id| keep[id]) {
        let node = model.node(id);
        if sources.iter().any(|s| s.node == id) {
            continue;
        }
        let inputs = node
            .inputs
            .iter()
            .map(|i| {
                map.get(i)
                    .copied()
                    .with_context(|| format!("{} reads outside the part", node.name))
            })
            .collect::<TractResult<TVec<_>>>()?;
        for (slot, o) in part
            .wire_node(&node.name, node.op.clone(), &inputs)?
            .into_iter()
            .enumerate()
        {
            map.insert(OutletId::new(id, slot), o);
        }
    }
    part.select_output_outlets(&outputs.iter().map(|o| map[o]).collect::<Vec<_>>())?;
    Ok(part)
}

/// Whether the functions of one token's input are folded into tables (`token_tables.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenTables {
    Folded,
    Computed,
}

impl TokenTables {
    /// Folded, unless `CELLSTREAM_TOKEN_TABLES=computed` (a knob for comparisons).
    pub fn from_env() -> Result<TokenTables, String> {
        super::knob(
            "CELLSTREAM_TOKEN_TABLES",
            TokenTables::Folded,
            &[TokenTables::Folded, TokenTables::Computed],
            TokenTables::name,
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenTables::Folded => "folded",
            TokenTables::Computed => "computed",
        }
    }

    /// The tract transform that folds, if any.
    pub fn transform(self) -> Option<&'static str> {
        match self {
            TokenTables::Folded => Some("cellstream_token_tables"),
            TokenTables::Computed => None,
        }
    }
}

/// The model transform: folds what it can into token tables, then records how many.
#[derive(Debug, Clone)]
pub struct FoldTokenTables;

impl ModelTransform for FoldTokenTables {
    fn name(&self) -> StaticName {
        "cellstream_token_tables".into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let summary = token_tables::fold(model)?;
        for (name, value) in [
            (TOKEN_TABLES_PROPERTY, summary.outputs),
            (TOKEN_TABLE_BYTES_PROPERTY, summary.table_bytes),
            (TOKEN_TABLE_REPLACED_PROPERTY, summary.replaced_bytes),
        ] {
            model
                .properties
                .insert(name.into(), rctensor0(value as i64));
        }
        Ok(())
    }
}

register_simple_model_transform!("cellstream_token_tables", FoldTokenTables);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::rng::CellRng;

    /// A graph that computes every token's attention and norm, then outputs row 0 (a plain
    /// torch export's last layer): after the rewrite and tract's declutter the attention runs
    /// for one query and the norm for one row, and the output is unchanged.
    #[test]
    fn an_output_row_is_computed_alone() -> TractResult<()> {
        let (n, s, heads, dh) = (2, 5, 2, 8);
        let mut model = TypedModel::default();
        let qkv = ["q", "k", "v"].map(|name| {
            model
                .add_source(name, f32::fact([n, s, heads, dh]))
                .unwrap()
        });
        let mask = model.add_source("mask", f32::fact([1, 1, n, s]))?;
        let simd = Simd::Portable;
        let att = model.wire_node(
            "attention",
            FusedAttention { simd, int8: false },
            &[qkv[0], qkv[1], qkv[2], mask],
        )?;
        let d = heads * dh;
        let merged = model.wire_node(
            "merge",
            AxisOp::Reshape(2, tvec![heads.into(), dh.into()], tvec![d.into()]),
            &att,
        )?;
        let norm = FusedLayerNorm {
            eps: rctensor0(1e-5f32),
            gamma: rctensor1(&(0..d).map(|i| 0.5 + i as f32 / 16.0).collect::<Vec<_>>()),
            beta: rctensor1(&(0..d).map(|i| i as f32 / 32.0 - 0.2).collect::<Vec<_>>()),
            simd,
        };
        let normed = model.wire_node("norm", norm, &merged)?;
        let index = model.add_const("index", tensor0(0i64))?;
        let row = model.wire_node(
            "row",
            Gather {
                axis: 1,
                output_type: None,
            },
            &[normed[0], index],
        )?;
        model.select_output_outlets(&row)?;

        let mut rewritten = model.clone();
        FuseGraph { simd }.transform(&mut rewritten)?;
        RowsAsSlices.transform(&mut rewritten)?;
        rewritten.declutter()?;
        let shape_of = |is: fn(&TypedNode) -> bool| {
            let node = rewritten.nodes().iter().find(|n| is(n)).unwrap();
            node.outputs[0].fact.shape.to_tvec()
        };
        let one = |x: usize| TDim::from(x);
        assert_eq!(
            shape_of(|n| n.op_is::<FusedAttention>()),
            tvec![one(n), one(1), one(heads), one(dh)]
        );
        assert_eq!(
            shape_of(|n| n.op_is::<FusedLayerNorm>()),
            tvec![one(n), one(1), one(d)]
        );

        let mut rng = CellRng::for_cell(3, "output row");
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
                .collect()
        };
        let mut inputs: TVec<TValue> = (0..3)
            .map(|_| {
                tensor1(&random(n * s * heads * dh))
                    .into_shape(&[n, s, heads, dh])
                    .unwrap()
                    .into_tvalue()
            })
            .collect();
        // The second row's last two keys are padding.
        let mut m = vec![0f32; n * s];
        m[2 * s - 2..].fill(f32::NEG_INFINITY);
        inputs.push(tensor1(&m).into_shape(&[1, 1, n, s])?.into_tvalue());
        let run = |model: TypedModel| -> TractResult<Tensor> {
            let plan = SimplePlan::new(model.into_optimized()?)?;
            Ok(plan.run(inputs.clone())?.remove(0).into_tensor())
        };
        let (want, got) = (run(model)?, run(rewritten)?);
        assert_eq!(want.shape(), &[n, d]);
        want.close_enough(&got, Approximation::Close)?;
        Ok(())
    }
}
