//! Products of a computed f32 tensor by constant weights (projections, feed-forward, the out
//! projection), with the bias add that follows where there is one, as one [`Linear`] op whose
//! weights are packed once at load, in one of two forms:
//!
//! - **int8**, opt-in per package (`precision = "int8"` in `manifest.toml`): weights 7-bit per
//!   column, activations 8-bit per row (`int8_kernel.rs`); with it every [`FusedAttention`]'s
//!   weighted sum runs in integers (`attention_int8.rs`). Attention's scores and softmax and
//!   the one-query last layer stay f32. The recipe, its agreement with f32 and its speed are in
//!   BENCHMARKS.md ("Precision as a lever", "int8: attention's weighted sum in integers").
//! - **f32** on AVX2 CPUs (`KernelChoice::Own`, `model/kernel_choice.rs`): the same sums as
//!   tract's own kernels, bit for bit, on a kernel of ours that runs them faster there
//!   (`f32_kernel.rs`; BENCHMARKS.md, "Our own f32 products on AVX2").

use tract_core::internal::*;
use tract_core::model::Rewriter;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::change_axes::AxisOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::math::Add;
use tract_core::transform::ModelTransform;
use tract_core::{rule_if, rule_if_some};

use super::const_and_other;
use super::f32_kernel::PackedWeights;
use super::int8_kernel::QuantWeights;
use super::FusedAttention;
use crate::simd::Simd;

/// The model property where the transform records how many products it made int8.
pub const INT8_PRODUCTS_PROPERTY: &str = "cellstream.int8_products";
/// ... and the bytes of their packed weights.
pub const INT8_BYTES_PROPERTY: &str = "cellstream.int8_weight_bytes";
/// ... and how many attention layers' weighted sums it made int8.
pub const INT8_ATTENTION_PROPERTY: &str = "cellstream.int8_attention_layers";
/// How many f32 products run on our own kernel.
pub const F32_PRODUCTS_PROPERTY: &str = "cellstream.f32_products";

/// The arithmetic of the products by constant weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// As the graph says.
    F32,
    /// [`Linear`] on int8 weights: 7-bit per column, activations 8-bit per row.
    Int8,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }

    /// The manifest's `precision` value.
    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == s)
    }

    /// What `CELLSTREAM_PRECISION` names (`f32`, `int8`), overriding the package's choice: a
    /// knob for comparisons, not a setting. `None` where unset.
    pub fn from_env() -> Result<Option<Precision>, String> {
        const VAR: &str = "CELLSTREAM_PRECISION";
        if std::env::var_os(VAR).is_none() {
            return Ok(None);
        }
        crate::model::knob(VAR, Precision::F32, &Precision::ALL, Precision::name).map(Some)
    }

    /// The tract transform that makes the products int8 on `simd`'s kernel, if any.
    pub fn transform(self, simd: Simd) -> Option<&'static str> {
        match (self, simd) {
            (Precision::F32, _) => None,
            (Precision::Int8, Simd::Portable) => Some("cellstream_int8_portable"),
            (Precision::Int8, Simd::Avx2) => Some("cellstream_int8_avx2"),
            (Precision::Int8, Simd::Avx512) => Some("cellstream_int8_avx512"),
        }
    }
}

/// The tract transform that runs the f32 products on our own kernel (AVX2 and FMA).
pub const OWN_F32_PRODUCTS: &str = "cellstream_f32_products";

/// A [`Linear`]'s weights, packed for its kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinearWeights {
    F32(PackedWeights),
    Int8(QuantWeights),
}

impl LinearWeights {
    pub fn k(&self) -> usize {
        match self {
            LinearWeights::F32(w) => w.k(),
            LinearWeights::Int8(w) => w.k(),
        }
    }

    pub fn n(&self) -> usize {
        match self {
            LinearWeights::F32(w) => w.n(),
            LinearWeights::Int8(w) => w.n(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            LinearWeights::F32(w) => w.bytes(),
            LinearWeights::Int8(w) => w.bytes(),
        }
    }

    fn product(&self, simd: Simd, a: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        match self {
            LinearWeights::F32(w) => w.product(a, bias, out),
            LinearWeights::Int8(w) => w.product(simd, a, bias, out),
        }
    }
}

/// `x · W (+ b)`, contracting `x`'s last `k_axes` axes (together `K` long) with the constant
/// `W`, `[K, N]`, on the weights' kernel: the output is `x`'s other axes, then `N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linear {
    pub weights: Arc<LinearWeights>,
    /// f32 `[N]`.
    pub bias: Option<Arc<Tensor>>,
    pub k_axes: usize,
    pub simd: Simd,
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        match *self.weights {
            LinearWeights::F32(_) => "CellstreamLinear".into(),
            LinearWeights::Int8(_) => "CellstreamInt8Linear".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(shape.len() >= self.k_axes, "input {shape:?}");
        let kept = &shape[..shape.len() - self.k_axes];
        let k: usize = shape[kept.len()..].iter().product();
        ensure!(
            k == self.weights.k(),
            "input {shape:?}, weights of {}",
            self.weights.k()
        );
        let mut out_shape: TVec<usize> = kept.into();
        out_shape.push(self.weights.n());
        // SAFETY: `product` writes every element (every row, every column) before it returns.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        let bias = match &self.bias {
            Some(b) => Some(b.try_as_plain_ram()?),
            None => None,
        };
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        self.weights.product(
            self.simd,
            x.try_as_plain_ram()?.as_slice::<f32>()?,
            bias,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        let rank = inputs[0].rank();
        ensure!(rank >= self.k_axes);
        let mut shape: TVec<TDim> = inputs[0]
            .shape
            .iter()
            .take(rank - self.k_axes)
            .cloned()
            .collect();
        shape.push(self.weights.n().into());
        Ok(tvec!(f32::fact(shape)))
    }

    // Rows are independent: a slice of the output over a kept axis is the op on the same
    // slice of its input (so tract's declutter can push a `<cls>` row slice up through it).
    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        let mut mapping = AxesMapping::disconnected(inputs, outputs)?;
        for axis in 0..inputs[0].rank() - self.k_axes {
            let repr = mapping.axis((InOut::In(0), axis))?.repr;
            mapping = mapping.linking(repr, (InOut::Out(0), axis))?;
        }
        Ok(mapping)
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

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0]
            .shape
            .iter()
            .take(inputs[0].rank() - self.k_axes)
            .product();
        let macs = rows * (self.weights.k() * self.weights.n());
        let dt = match *self.weights {
            LinearWeights::F32(_) => f32::datum_type(),
            LinearWeights::Int8(_) => i32::datum_type(),
        };
        Ok(tvec!((Cost::FMA(dt), macs)))
    }
}

/// The int8 transform: every product [`rule`] recognises, then the count and bytes as
/// properties.
#[derive(Debug, Clone)]
pub struct Int8Products {
    pub simd: Simd,
}

impl ModelTransform for Int8Products {
    fn name(&self) -> StaticName {
        Precision::Int8
            .transform(self.simd)
            .unwrap_or_default()
            .into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        rewrite_products(model, Precision::Int8, self.simd)?;
        let mut attention = 0;
        for node in model.nodes_mut() {
            if let Some(op) = node.op_as::<FusedAttention>() {
                node.op = Box::new(FusedAttention {
                    int8: true,
                    ..op.clone()
                });
                attention += 1;
            }
        }
        model
            .properties
            .insert(INT8_ATTENTION_PROPERTY.into(), rctensor0(attention as i64));
        let (count, bytes) = products(model);
        model
            .properties
            .insert(INT8_PRODUCTS_PROPERTY.into(), rctensor0(count as i64));
        model
            .properties
            .insert(INT8_BYTES_PROPERTY.into(), rctensor0(bytes as i64));
        Ok(())
    }
}

register_simple_model_transform!(
    "cellstream_int8_portable",
    Int8Products {
        simd: Simd::Portable
    }
);
register_simple_model_transform!("cellstream_int8_avx2", Int8Products { simd: Simd::Avx2 });
register_simple_model_transform!(
    "cellstream_int8_avx512",
    Int8Products { simd: Simd::Avx512 }
);

/// The f32 transform: every product [`rule`] recognises on our AVX2 kernel, then the count
/// as a property. Only for a CPU that runs AVX2 and FMA.
#[derive(Debug, Clone)]
pub struct OwnF32Products;

impl ModelTransform for OwnF32Products {
    fn name(&self) -> StaticName {
        OWN_F32_PRODUCTS.into()
    }

    fn transform(&self, model: &mut TypedModel) -> TractResult<()> {
        ensure!(
            PackedWeights::runs_here(),
            "our f32 products need AVX2 and FMA"
        );
        rewrite_products(model, Precision::F32, Simd::Avx2)?;
        let (count, _) = products(model);
        model
            .properties
            .insert(F32_PRODUCTS_PROPERTY.into(), rctensor0(count as i64));
        Ok(())
    }
}

register_simple_model_transform!("cellstream_f32_products", OwnF32Products);

/// Every product [`rule`] recognises as a [`Linear`] of `precision`, then the constants no
/// longer read dropped.
fn rewrite_products(model: &mut TypedModel, precision: Precision, simd: Simd) -> TractResult<()> {
    Rewriter::default()
        .with_rule_for(
            "linear-product",
            move |_: &(), m: &TypedModel, n: &TypedNode, name: &str, op: &EinSum| {
                rule(precision, simd, m, n, name, op)
            },
        )
        .rewrite(&(), model)?;
    // The f32 weights the products no longer read.
    model.compact()
}

/// How many [`Linear`] ops the model holds, and their packed weights' bytes.
fn products(model: &TypedModel) -> (usize, usize) {
    let ops: Vec<&Linear> = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<Linear>())
        .collect();
    (ops.len(), ops.iter().map(|op| op.weights.bytes()).sum())
}

/// An f32 einsum of a computed `x` by a constant `W` that contracts `x`'s trailing axes with
/// all of `W`'s axes but one, `N`, in the same order, and whose output is `x`'s other axes (in
/// any order) then `N`: a product by `W` as a `[K, N]` matrix, `x`'s axes moved after it where
/// the einsum orders them otherwise (torch's sequence-first projections). With the bias add
/// after it, where that add is its one reader and adds a constant `[…, 1, N]`.
fn rule(
    precision: Precision,
    simd: Simd,
    model: &TypedModel,
    node: &TypedNode,
    name: &str,
    op: &EinSum,
) -> TractResult<Option<TypedModelPatch>> {
    rule_if!(op.q_params.is_none() && op.operating_dt == f32::datum_type());
    rule_if!(node.inputs.len() == 2);
    rule_if_some!((w, x) = const_and_other(model, node));
    rule_if!(w.datum_type() == f32::datum_type() && w.rank() >= 2);
    let wi = node.inputs.iter().position(|&i| i != x).unwrap_or(1);
    let xi = 1 - wi;
    let x_fact = model.outlet_fact(x)?;
    rule_if!(x_fact.datum_type == f32::datum_type() && x_fact.konst.is_none());
    let (rx, rw) = (x_fact.rank(), w.rank());
    let c = rw - 1;
    rule_if!(rx > c);
    let kept = rx - c;
    let ro = kept + 1;
    rule_if!(model.outlet_fact(node.id.into())?.rank() == ro);
    let axis = |io: InOut, pos: usize| op.axes.axis((io, pos)).ok();
    // W's axes: one in the output's last place and not in x (N); the others x's trailing
    // axes in W's order, not in the output.
    let mut n_axis = None;
    let mut k_axes = Vec::with_capacity(c);
    for j in 0..rw {
        rule_if_some!(a = axis(InOut::In(wi), j));
        match (a.inputs[xi].as_slice(), a.outputs[0].as_slice()) {
            ([], [o]) if *o == ro - 1 && n_axis.is_none() => n_axis = Some(j),
            ([p], []) if *p == kept + k_axes.len() => k_axes.push(j),
            _ => return Ok(None),
        }
    }
    rule_if_some!(n_axis = n_axis);
    // x's other axes: each in the output once, not in W.
    let mut places = Vec::with_capacity(kept);
    for j in 0..kept {
        rule_if_some!(a = axis(InOut::In(xi), j));
        rule_if!(a.inputs[wi].is_empty() && a.outputs[0].len() == 1);
        places.push(a.outputs[0][0]);
    }
    rule_if!((0..kept).all(|p| places.contains(&p)));
    let n = w.shape()[n_axis];
    let k = w.len() / n.max(1);
    rule_if!(k > 0 && n > 0);
    let order: Vec<usize> = k_axes.iter().copied().chain([n_axis]).collect();
    let matrix = Tensor::clone(&w).permute_axes(&order)?;
    let matrix = matrix.try_as_plain_ram()?;
    let matrix = matrix.as_slice::<f32>()?;
    let weights = match precision {
        Precision::F32 => LinearWeights::F32(PackedWeights::pack(matrix, k, n)),
        Precision::Int8 => LinearWeights::Int8(QuantWeights::pack(matrix, k, n)),
    };

    // The bias add, where the product's one reader adds a constant row of N.
    let mut end = node.id;
    let mut bias = None;
    if let Some(add) = model.single_succ(node.id)? {
        if add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>())
            && model.outlet_successors(node.id.into()).len() == 1
        {
            if let Some((b, other)) = const_and_other(model, add) {
                let out_shape = &model.outlet_fact(add.id.into())?.shape;
                if other == OutletId::from(node.id)
                    && b.datum_type() == f32::datum_type()
                    && b.len() == n
                    && b.shape().last() == Some(&n)
                    && *out_shape == model.outlet_fact(node.id.into())?.shape
                {
                    bias = Some(Tensor::clone(&b).into_shape(&[n])?.into_arc_tensor());
                    end = add.id;
                }
            }
        }
    }

    let tag = precision.name();
    let mut patch = TypedModelPatch::new(format!("{tag} product at {name}"));
    let tap = patch.tap_model(model, x)?;
    let linear = Linear {
        weights: Arc::new(weights),
        bias,
        k_axes: c,
        simd,
    };
    let mut wire = patch.wire_node(format!("{name}.{tag}"), linear, &[tap])?;
    // The op's axes are x's in x's order; move each to the einsum's place for it.
    for target in 0..kept {
        let at = places.iter().position(|&p| p == target).unwrap_or(target);
        if at != target {
            let mv = AxisOp::Move(at, target);
            wire = patch.wire_node(format!("{name}.{tag}.move{target}"), mv, &wire)?;
            let p = places.remove(at);
            places.insert(target, p);
        }
    }
    patch.shunt_outside(model, end.into(), wire[0])?;
    Ok(Some(patch))
}
