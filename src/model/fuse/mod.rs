//! Rewrites of the parsed graph into ops of our own, where tract's general ones cost more
//! than the arithmetic (BENCHMARKS.md "Model forward"):
//!
//! - each attention layer (scores einsum, mask add, softmax, weighted-sum einsum) as one
//!   [`attention::FusedAttention`], on an AVX-512 kernel chosen at run time;
//! - the last layer's one-query attention as [`ClsAttention`], which never computes the
//!   keys and values of every token (`cls_attention.rs`);
//! - each LayerNorm, as the export spells it (mean by a matmul, centring, `RmsNorm`, scale,
//!   bias), as one [`layer_norm::FusedLayerNorm`];
//! - the functions of one token's own input (gene encoder, value encoder, the first layer's
//!   projection of their sum) as [`TokenTable`] lookups, computed for every possible input
//!   when the model loads ([`TokenTables`], a separate transform).
//!
//! The ONNX file is unchanged (onnxruntime runs it as before); the rewrite is a tract model
//! transform applied after parsing, and only where it pays ([`Fusion::best`]): on CPUs with
//! the vector attention kernel. Elsewhere, or with `CELLSTREAM_FUSION=tract` in the
//! environment (for comparisons), tract runs the graph as it is.

mod attention;
mod attention_kernel;
mod cls_attention;
mod layer_norm;
mod token_tables;

use std::collections::HashMap;

use tract_core::internal::*;
use tract_core::model::Rewriter;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::Softmax;
use tract_core::transform::ModelTransform;

pub use attention::FusedAttention;
pub use attention_kernel::{Dims, Kernels};
pub use cls_attention::ClsAttention;
pub use layer_norm::FusedLayerNorm;
pub use token_tables::{TokenTable, TOKEN_TABLES_PROPERTY, VALUE_KEYS};

/// The model properties where the transform records how many attention layers and
/// LayerNorms it fused.
pub const FUSED_ATTENTION_PROPERTY: &str = "cellstream.fused_attention_layers";
pub const FUSED_LAYER_NORM_PROPERTY: &str = "cellstream.fused_layer_norms";

/// Whether (and with which attention kernels) the graph is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// As the graph spells it, on tract's own ops.
    Tract,
    /// Attention layers and LayerNorms fused, attention on these kernels.
    Fused(Kernels),
}

impl Fusion {
    /// The fastest on this CPU: fused where the vector kernel exists, tract's ops elsewhere
    /// (the portable kernel is a reference, slower than tract).
    pub fn best() -> Fusion {
        match Kernels::detect() {
            Kernels::Portable => Fusion::Tract,
            vector => Fusion::Fused(vector),
        }
    }

    /// [`Fusion::best`], unless `CELLSTREAM_FUSION` names another (`tract`,
    /// `fused-portable`, `fused-avx512`): a knob for comparisons, not a setting.
    pub fn from_env() -> Result<Fusion, String> {
        super::knob(
            "CELLSTREAM_FUSION",
            Fusion::best(),
            &Fusion::available(),
            Fusion::name,
        )
    }

    /// Every way this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Fusion> {
        let fused = Kernels::available().into_iter().map(Fusion::Fused);
        std::iter::once(Fusion::Tract).chain(fused).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Fusion::Tract => "tract",
            Fusion::Fused(Kernels::Portable) => "fused-portable",
            #[cfg(target_arch = "x86_64")]
            Fusion::Fused(Kernels::Avx512) => "fused-avx512",
        }
    }

    /// The tract transform that fuses with these kernels, if any.
    pub fn transform(self) -> Option<&'static str> {
        match self {
            Fusion::Tract => None,
            Fusion::Fused(Kernels::Portable) => Some("cellstream_fuse_portable"),
            #[cfg(target_arch = "x86_64")]
            Fusion::Fused(Kernels::Avx512) => Some("cellstream_fuse_avx512"),
        }
    }
}

/// The model transform: fuses every attention layer and LayerNorm it recognises, then records
/// how many of each in the model's properties.
#[derive(Debug, Clone)]
pub struct FuseGraph {
    pub kernels: Kernels,
}

impl ModelTransform for FuseGraph {
    fn name(&self) -> StaticName {
        Fusion::Fused(self.kernels)
            .transform()
            .unwrap_or_default()
            .into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        let kernels = self.kernels;
        Rewriter::default()
            .with_rule_for(
                "fuse-attention",
                move |_: &(), m: &TypedModel, n: &TypedNode, _: &str, op: &Softmax| {
                    attention::rule(kernels, m, n, op)
                },
            )
            .with_rule_for("fuse-layer-norm", layer_norm::rule)
            .with_rule_for("one-query-attention", cls_attention::rule)
            .rewrite(&(), model)?;
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

register_simple_model_transform!(
    "cellstream_fuse_portable",
    FuseGraph {
        kernels: Kernels::Portable
    }
);
#[cfg(target_arch = "x86_64")]
register_simple_model_transform!(
    "cellstream_fuse_avx512",
    FuseGraph {
        kernels: Kernels::Avx512
    }
);

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
        let count = token_tables::fold(model)?;
        model
            .properties
            .insert(TOKEN_TABLES_PROPERTY.into(), rctensor0(count as i64));
        Ok(())
    }
}

register_simple_model_transform!("cellstream_token_tables", FoldTokenTables);
