//! Token tables: the parts of the graph that are a function of one token's own input, computed
//! once per possible input when the model loads instead of once per token at every batch.
//!
//! scGPT's encoder starts with two such functions: the gene encoder (embedding row, then
//! LayerNorm) of the token's gene id, and the value encoder (clamp, `Linear(1, d)`, ReLU,
//! `Linear(d, d)`, LayerNorm) of its binned value. Their sum is the first layer's input, and
//! that layer's q/k/v projection is linear, so it splits over the sum:
//! `(g + v)·W + b = (g·W + b) + v·W`, each term again a function of one input. The linear
//! maps after the projection (split in q, k and v, each viewed as heads, q scaled) distribute
//! over the sum too, so the op writes q, k and v as the attention reads them: ending at the
//! 3·d projection left tract a reshape copy and three selects per call, whose allocations
//! fragmented the workers' heaps (BENCHMARKS.md, serve memory). Ids range over the
//! embedding's rows; binned values are small integers (0..n_bins and scGPT's pad value -2), or
//! half-integers in the `expected` tie mode. [`fold`] finds those functions in the graph, evaluates them on every possible input
//! (every id; every multiple of ½ in [`VALUE_KEYS`]), and replaces them with [`TokenTable`], which
//! copies rows. A value with no row (not an integer in range: never from cellstream's
//! tokenizer, but the op does not rely on that) is run through the folded part of the graph
//! itself. Results differ from the unfolded graph by rounding alone (the split sum adds in
//! another order; the tables come from other matmul shapes).
//!
//! What counts as "a function of one token's input" is decided op by op ([`kind_of`]): row
//! gathers from a constant, element-wise ops with constants broadcast along the feature axes
//! only, einsums against a constant that keep the row and token axes, and our LayerNorm (over
//! the last axis). Anything else ends the search.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use tract_core::internal::*;
use tract_core::ops::array::Gather;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::konst::Const;
use tract_core::ops::math::{Add, Mul};

use super::FusedLayerNorm;

/// The model properties where [`fold`]'s caller records how many outputs the tables have,
/// their bytes, and the bytes of the constants they replaced.
pub const TOKEN_TABLES_PROPERTY: &str = "cellstream.token_tables";
pub const TOKEN_TABLE_BYTES_PROPERTY: &str = "cellstream.token_table_bytes";
pub const TOKEN_TABLE_REPLACED_PROPERTY: &str = "cellstream.token_table_replaced_bytes";

/// What [`fold`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldSummary {
    /// Outputs of the token-table op (outlets of the graph it replaced).
    pub outputs: usize,
    /// Bytes of its tables.
    pub table_bytes: usize,
    /// Bytes of the graph's constants they replaced (the gene embedding).
    pub replaced_bytes: usize,
}

/// The f32 inputs with a table row: multiples of ½ in this range (scGPT's bins are
/// 0..n_bins, its pad value -2; the `expected` tie mode's are half-integers).
pub const VALUE_KEYS: RangeInclusive<i32> = -16..=255;

/// How much more memory an input's tables may take than the constants they make dead (the
/// embedding a gene table replaces): a whole-transcriptome vocabulary times a wide projection
/// would cost more memory than it saves time.
pub const MAX_EXTRA_TABLE_BYTES: usize = 16 << 20;

/// Which inputs a table has rows for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// i64 ids `0..count` (the rows of the embedding they index).
    Ids(usize),
    /// f32 values that are multiples of ½ in `lo..=hi`.
    Halves { lo: i32, hi: i32 },
}

impl Keys {
    fn count(self) -> usize {
        match self {
            Keys::Ids(count) => count,
            Keys::Halves { lo, hi } => (2 * (hi - lo) + 1) as usize,
        }
    }

    /// Every key, in row order, as a `[1, count]` input.
    fn probe(self) -> TractResult<Tensor> {
        let count = self.count();
        match self {
            Keys::Ids(_) => Tensor::from_shape(&[1, count], &(0..count as i64).collect::<Vec<_>>()),
            Keys::Halves { lo, .. } => Tensor::from_shape(
                &[1, count],
                &(0..count)
                    .map(|k| lo as f32 + k as f32 / 2.0)
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// One input's tables: row `r` of `tables[f]` is folded function `f` of key `r`.
#[derive(Debug, Clone)]
pub struct KeyedInput {
    pub keys: Keys,
    /// `[keys, ..row]`, f32.
    pub tables: Vec<Arc<Tensor>>,
    /// The folded functions as a graph of their own (input `[1, M]`, outputs `[1, M, ..row]`),
    /// for f32 inputs without a row; not kept for ids, which all have one (an id out of range
    /// is an error, as in the gather it replaces).
    fallback: Option<Arc<TypedSimplePlan>>,
}

impl PartialEq for KeyedInput {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys
            && self.tables.len() == other.tables.len()
            && self
                .tables
                .iter()
                .zip(&other.tables)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && match (&self.fallback, &other.fallback) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}

impl KeyedInput {
    /// The input's keys, read in place; ids checked against the table here.
    fn view<'a>(&self, input: &'a Tensor) -> TractResult<KeyView<'a>> {
        let input = input.try_as_plain_ram()?;
        match self.keys {
            Keys::Ids(count) => {
                let ids = input.as_slice::<i64>()?;
                if let Some(token) = ids.iter().position(|&id| !(0..count as i64).contains(&id)) {
                    bail!(
                        "id {} at token {token} is outside the table's 0..{count}",
                        ids[token]
                    );
                }
                Ok(KeyView::Ids(ids))
            }
            Keys::Halves { lo, hi } => Ok(KeyView::Halves {
                values: input.as_slice::<f32>()?,
                lo,
                hi,
            }),
        }
    }
}

/// One input's keys in place: each token's row is computed when asked for, so a call
/// allocates nothing but its outputs.
enum KeyView<'a> {
    Ids(&'a [i64]),
    Halves { values: &'a [f32], lo: i32, hi: i32 },
}

impl KeyView<'_> {
    /// Token `token`'s row, `None` for a value without one (or past the last token).
    fn row(&self, token: usize) -> Option<usize> {
        match *self {
            KeyView::Ids(ids) => ids.get(token).map(|&id| id as usize),
            KeyView::Halves { values, lo, hi } => {
                // Doubling is exact for these magnitudes, so `twice` is whole exactly where
                // `v` is a multiple of ½.
                let twice = *values.get(token)? * 2.0;
                let keyed =
                    twice.fract() == 0.0 && twice >= 2.0 * lo as f32 && twice <= 2.0 * hi as f32;
                keyed.then(|| (twice as i32 - 2 * lo) as usize)
            }
        }
    }
}

/// Table lookups, summed: output `j` at each token is the sum over its terms `(i, f)` of
/// row (input `i` at that token) of `inputs[i].tables[f]`, shaped `tokens ++ row`. One pass
/// writes each output once (a sum of separate lookups cost as much again in the add).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTable {
    pub inputs: Vec<KeyedInput>,
    pub outputs: Vec<Vec<(usize, usize)>>,
}

impl Eq for TokenTable {}

impl Op for TokenTable {
    fn name(&self) -> StaticName {
        "CellstreamTokenTable".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(self
            .inputs
            .iter()
            .map(|i| {
                let rows: Vec<_> = i
                    .tables
                    .iter()
                    .map(|t| format!("{:?}", t.shape()))
                    .collect();
                format!("keys {:?}: tables {}", i.keys, rows.join(", "))
            })
            .chain(std::iter::once(format!("outputs: {:?}", self.outputs)))
            .collect())
    }

    op_as_typed_op!();
}

impl EvalOp for TokenTable {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.inputs.len(), "{} inputs", inputs.len());
        let keys = self
            .inputs
            .iter()
            .zip(&inputs)
            .map(|(k, t)| k.view(t))
            .collect::<TractResult<TVec<_>>>()?;
        let tokens = inputs[0].shape();
        let mut outputs = TVec::new();
        for terms in &self.outputs {
            let shape: TVec<usize> = tokens
                .iter()
                .chain(self.row_shape(terms))
                .copied()
                .collect();
            // SAFETY: f32 has no invalid bit patterns, and sum_rows writes every row.
            let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
            self.sum_rows(&mut out, terms, &keys)?;
            outputs.push(out);
        }
        // Rows no table has (never from cellstream's tokenizer): the folded graph, on those
        // tokens alone.
        for (i, input) in self.inputs.iter().enumerate() {
            // Ids all have rows (`view` checked them).
            let KeyView::Halves { values, .. } = keys[i] else {
                continue;
            };
            if (0..values.len()).all(|t| keys[i].row(t).is_some()) {
                continue;
            }
            let missing: Vec<usize> = (0..values.len())
                .filter(|&t| keys[i].row(t).is_none())
                .collect();
            let odd: Vec<f32> = missing.iter().map(|&t| values[t]).collect();
            let probe = Tensor::from_shape(&[1, odd.len()], &odd)?;
            let fallback = input.fallback.as_ref().context("no fallback plan")?;
            let computed = fallback.run(tvec!(probe.into_tvalue()))?;
            for (out, terms) in outputs.iter_mut().zip(&self.outputs) {
                for &(_, f) in terms.iter().filter(|t| t.0 == i) {
                    add_rows(out, &computed[f], &missing)?;
                }
            }
        }
        Ok(outputs.into_iter().map(|t| t.into_tvalue()).collect())
    }
}

impl TokenTable {
    /// The shape of one token's row of the output whose terms are `terms`.
    fn row_shape(&self, terms: &[(usize, usize)]) -> &[usize] {
        let (i, f) = terms[0];
        &self.inputs[i].tables[f].shape()[1..]
    }

    /// Writes each token's sum of its terms' rows (a missing row counts as zero).
    fn sum_rows(
        &self,
        out: &mut Tensor,
        terms: &[(usize, usize)],
        keys: &[KeyView],
    ) -> TractResult<()> {
        let views = terms
            .iter()
            .map(|&(i, f)| self.inputs[i].tables[f].try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let tables = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<TVec<_>>>()?;
        let w = out.shape()[2..].iter().product::<usize>();
        let mut out = out.try_as_plain_ram_mut()?;
        let out = out.as_slice_mut::<f32>()?;
        let row = |term: usize, token: usize| {
            let r = keys[terms[term].0].row(token)?;
            Some(&tables[term][r * w..][..w])
        };
        // The first term's row copied (a memcpy keeps many cache lines in flight: the big
        // tables are read from memory), the others added to it where it is hot.
        for (token, dst) in out.chunks_exact_mut(w).enumerate() {
            if let Some(next) = row(0, token + PREFETCH_AHEAD) {
                crate::simd::prefetch(next);
            }
            let mut terms = (0..terms.len()).filter_map(|term| row(term, token));
            match terms.next() {
                Some(first) => dst.copy_from_slice(first),
                None => dst.fill(0.0),
            }
            for more in terms {
                dst.iter_mut().zip(more).for_each(|(d, x)| *d += x);
            }
        }
        Ok(())
    }
}

/// How many tokens ahead [`TokenTable::sum_rows`] asks for the first term's row.
const PREFETCH_AHEAD: usize = 2;

/// Adds row `i` of `rows` (`[1, M, ..row]`) into `out` at token `tokens[i]`.
fn add_rows(out: &mut Tensor, rows: &TValue, tokens: &[usize]) -> TractResult<()> {
    let w = rows.len() / tokens.len();
    let rows = rows.try_as_plain_ram()?;
    let rows = rows.as_slice::<f32>()?;
    let mut out = out.try_as_plain_ram_mut()?;
    let out = out.as_slice_mut::<f32>()?;
    for (i, &t) in tokens.iter().enumerate() {
        out[t * w..][..w]
            .iter_mut()
            .zip(&rows[i * w..][..w])
            .for_each(|(d, x)| *d += x);
    }
    Ok(())
}

impl TypedOp for TokenTable {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.inputs.len(), "{} inputs", inputs.len());
        let tokens = &inputs[0].shape;
        ensure!(
            inputs.iter().all(|f| f.shape == *tokens),
            "inputs of different shapes"
        );
        Ok(self
            .outputs
            .iter()
            .map(|terms| {
                let mut shape = tokens.to_tvec();
                shape.extend(self.row_shape(terms).iter().map(|&d| d.to_dim()));
                f32::fact(shape)
            })
            .collect())
    }
}

/// What a node's output is, as far as folding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Const,
    /// A row per token of the model's inputs (its first two axes are theirs), each a function
    /// of that token's entries in the inputs set in `inputs` (bit `i`: model input `i`);
    /// `computes` once an einsum or LayerNorm is on the way (a table then saves work).
    Token {
        inputs: u32,
        computes: bool,
    },
    Other,
}

/// The kind of every node, in node order.
fn classify(model: &TypedModel) -> TractResult<Vec<Kind>> {
    let mut kinds = vec![Kind::Other; model.nodes().len()];
    let Some(first) = model.inputs.first() else {
        return Ok(kinds);
    };
    let tokens: TVec<TDim> = model.outlet_fact(*first)?.shape.to_tvec();
    if tokens.len() != 2 {
        return Ok(kinds);
    }
    for id in model.eval_order()? {
        kinds[id] = kind_of(model, model.node(id), &kinds, &tokens)?;
    }
    Ok(kinds)
}

fn kind_of(
    model: &TypedModel,
    node: &TypedNode,
    kinds: &[Kind],
    tokens: &[TDim],
) -> TractResult<Kind> {
    if node.op_is::<Const>() {
        return Ok(Kind::Const);
    }
    let fact = &node.outputs[0].fact;
    if node.outputs.len() != 1 || fact.rank() < 2 || fact.shape[..2] != *tokens {
        return Ok(Kind::Other);
    }
    if let Some(pos) = model.inputs.iter().position(|o| o.node == node.id) {
        let token = fact.rank() == 2 && pos < 32;
        return Ok(if token {
            Kind::Token {
                inputs: 1 << pos,
                computes: false,
            }
        } else {
            Kind::Other
        });
    }
    let ins: TVec<Kind> = node.inputs.iter().map(|i| kinds[i.node]).collect();
    let (mut inputs, mut computes) = (0, false);
    for k in &ins {
        match *k {
            Kind::Token {
                inputs: i,
                computes: c,
            } => {
                inputs |= i;
                computes |= c;
            }
            Kind::Const => {}
            Kind::Other => return Ok(Kind::Other),
        }
    }
    if inputs == 0 {
        return Ok(Kind::Other);
    }
    // A constant broadcast over the feature axes only (its token axes are 1).
    let feature_const = |i: usize| -> TractResult<bool> {
        let f = model.outlet_fact(node.inputs[i])?;
        Ok(f.rank() == fact.rank() && f.shape[0].is_one() && f.shape[1].is_one())
    };
    let token_wise = if let Some(g) = node.op_as::<Gather>() {
        g.axis == 0 && ins[0] == Kind::Const
    } else if node.op_is::<TypedBinOp>() || node.op_is::<ElementWiseOp>() {
        let mut ok = true;
        for (i, k) in ins.iter().enumerate() {
            ok &= *k != Kind::Const || feature_const(i)?;
        }
        ok
    } else if let Some(e) = node.op_as::<EinSum>() {
        computes = true;
        keeps_token_axes(e, &ins)
    } else if node.op_is::<FusedLayerNorm>() {
        computes = true;
        fact.rank() >= 3
    } else {
        false
    };
    Ok(if token_wise {
        Kind::Token { inputs, computes }
    } else {
        Kind::Other
    })
}

/// A product of one token-wise input and one constant that keeps the token axes.
fn keeps_token_axes(e: &EinSum, ins: &[Kind]) -> bool {
    let Some(t) = ins.iter().position(|k| matches!(k, Kind::Token { .. })) else {
        return false;
    };
    ins.len() == 2 && ins[1 - t] == Kind::Const && super::keeps_token_axes(e, ins.len(), t)
}

/// One function of one input that gets a table.
#[derive(Debug, Clone)]
enum Folded {
    /// A node of the graph.
    Node(OutletId),
    /// `L(frontier · W (+ bias))`: this input's term of an einsum (and its bias add, taken
    /// by one term only) that reads a sum of two inputs' functions, then of the linear maps
    /// `L` after it: `path`, which reads node `after` (the einsum, or its bias add in the
    /// graph), see [`linear_paths`].
    Split {
        frontier: OutletId,
        einsum: usize,
        bias: Option<usize>,
        after: usize,
        path: Vec<usize>,
    },
}

/// Single-input functions worth a table whose users are not all functions of that input:
/// (input position, outlet).
fn frontiers(model: &TypedModel, kinds: &[Kind]) -> Vec<(usize, OutletId)> {
    let mut found = Vec::new();
    for node in model.nodes() {
        let Kind::Token {
            inputs,
            computes: true,
        } = kinds[node.id]
        else {
            continue;
        };
        let fact = &node.outputs[0].fact;
        if inputs.count_ones() != 1 || fact.datum_type != f32::datum_type() || fact.rank() < 3 {
            continue;
        }
        let outlet = OutletId::new(node.id, 0);
        let ends = model.outputs.contains(&outlet)
            || node.outputs[0]
                .successors
                .iter()
                .any(|s| kinds[s.node] != kinds[node.id]);
        if ends {
            found.push((inputs.trailing_zeros() as usize, outlet));
        }
    }
    found
}

fn is_add(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>())
}

/// A sum of two frontiers of different inputs: (sum node, [(input, frontier); 2]).
type Sum = (usize, [(usize, OutletId); 2]);

fn sums(model: &TypedModel, frontiers: &[(usize, OutletId)]) -> Vec<Sum> {
    let frontier = |o: &OutletId| frontiers.iter().find(|f| f.1 == *o).copied();
    model
        .nodes()
        .iter()
        .filter(|n| is_add(n) && n.inputs.len() == 2)
        .filter_map(|n| match (frontier(&n.inputs[0]), frontier(&n.inputs[1])) {
            (Some(a), Some(b)) if a.0 != b.0 => Some((n.id, [a, b])),
            _ => None,
        })
        .collect()
}

/// The einsums that read a sum, each with its bias add if that is its one user: (einsum,
/// bias add).
fn split_einsums(model: &TypedModel, kinds: &[Kind], sum: usize) -> Vec<(usize, Option<usize>)> {
    let mut found = Vec::new();
    for user in &model.node(sum).outputs[0].successors {
        let einsum = model.node(user.node);
        if !einsum.op_is::<EinSum>() || !matches!(kinds[einsum.id], Kind::Token { .. }) {
            continue;
        }
        let bias = match einsum.outputs[0].successors.as_slice() {
            [next] => {
                let next = model.node(next.node);
                let consts = next
                    .inputs
                    .iter()
                    .filter(|i| kinds[i.node] == Kind::Const)
                    .count();
                (is_add(next) && consts == 1 && kinds[next.id] != Kind::Other).then_some(next.id)
            }
            _ => None,
        };
        found.push((einsum.id, bias));
    }
    found
}

/// The per-token linear maps after a split projection `start`, which distribute over its
/// sum as the projection does: reshapes and selections along the feature axes, products with
/// a feature constant (scGPT's q/k/v: split the 3·d projection in three, view each as heads,
/// scale q). Returns the path (node ids after `start`) to each end: a node read by anything
/// else, or a model output. `[[]]` when `start` is itself the end.
fn linear_paths(model: &TypedModel, kinds: &[Kind], start: usize) -> Vec<Vec<usize>> {
    let mut paths = Vec::new();
    let mut stack = vec![(start, Vec::new())];
    while let Some((id, path)) = stack.pop() {
        let outlet = OutletId::new(id, 0);
        let users = model.outlet_successors(outlet);
        let through = !model.outputs.contains(&outlet)
            && !users.is_empty()
            && users.iter().all(|u| is_linear(model, kinds, *u));
        if !through {
            paths.push(path);
            continue;
        }
        for u in users {
            let mut longer = path.clone();
            longer.push(u.node);
            stack.push((u.node, longer));
        }
    }
    paths
}

/// A linear map of the value at `inlet`, token by token (constants aside, that value is
/// its one input).
fn is_linear(model: &TypedModel, kinds: &[Kind], inlet: InletId) -> bool {
    let node = model.node(inlet.node);
    let others_const = node
        .inputs
        .iter()
        .enumerate()
        .all(|(slot, i)| slot == inlet.slot || kinds[i.node] == Kind::Const);
    if node.outputs.len() != 1 || !others_const {
        return false;
    }
    let feature_axis = |axis: usize| axis >= 2;
    if let Some(op) = node.op_as::<AxisOp>() {
        match op {
            AxisOp::Reshape(at, _, _) | AxisOp::Add(at) | AxisOp::Rm(at) => feature_axis(*at),
            AxisOp::Move(from, to) => feature_axis(*from) && feature_axis(*to),
        }
    } else if let Some(g) = node.op_as::<Gather>() {
        inlet.slot == 0 && feature_axis(g.axis)
    } else if let Some(b) = node.op_as::<TypedBinOp>() {
        // (a + b)·c = a·c + b·c, for c constant over the tokens.
        let fact = &node.outputs[0].fact;
        b.0.is::<Mul>()
            && node.inputs.len() == 2
            && model
                .outlet_fact(node.inputs[1 - inlet.slot])
                .is_ok_and(|c| {
                    c.rank() == fact.rank() && c.shape[0].is_one() && c.shape[1].is_one()
                })
    } else {
        false
    }
}

/// Wires `folded` into `model` (a scratch copy) and returns the outlet computing it.
fn wire(model: &mut TypedModel, folded: &Folded) -> TractResult<OutletId> {
    let (frontier, einsum, bias, after, path) = match folded {
        Folded::Node(o) => return Ok(*o),
        Folded::Split {
            frontier,
            einsum,
            bias,
            after,
            path,
        } => (*frontier, *einsum, *bias, *after, path),
    };
    // A copy of node `id` reading `to` where it read `from`.
    let rewire = |model: &mut TypedModel, id: usize, from: OutletId, to: OutletId| {
        let node = model.node(id).clone();
        let inputs: TVec<OutletId> = node
            .inputs
            .iter()
            .map(|&i| if i == from { to } else { i })
            .collect();
        let name = model
            .unique_name(format!("{}.split", node.name))
            .into_owned();
        Ok::<_, TractError>(model.wire_node(name, node.op, &inputs)?[0])
    };
    let sum = model
        .node(einsum)
        .inputs
        .iter()
        .copied()
        .find(|i| !model.node(i.node).op_is::<Const>());
    let sum = sum.context("einsum without a computed input")?;
    let mut term = rewire(model, einsum, sum, frontier)?;
    if let Some(b) = bias {
        term = rewire(model, b, OutletId::new(einsum, 0), term)?;
    }
    let mut last = after;
    for &next in path {
        term = rewire(model, next, OutletId::new(last, 0), term)?;
        last = next;
    }
    Ok(term)
}

/// The rows each input can have: every row of the embedding an i64 input indexes, the
/// multiples of ½ in [`VALUE_KEYS`] for an f32 input.
fn keys(model: &TypedModel, input: OutletId) -> TractResult<Option<Keys>> {
    let fact = model.outlet_fact(input)?;
    if fact.datum_type == f32::datum_type() {
        return Ok(Some(Keys::Halves {
            lo: *VALUE_KEYS.start(),
            hi: *VALUE_KEYS.end(),
        }));
    }
    if fact.datum_type != i64::datum_type() {
        return Ok(None);
    }
    let mut rows = None;
    for user in model.outlet_successors(input) {
        let node = model.node(user.node);
        if node.op_is::<Gather>() && user.slot == 1 {
            let n = model.outlet_fact(node.inputs[0])?.shape[0].to_usize()?;
            rows = Some(rows.map_or(n, |r: usize| r.min(n)));
        }
    }
    Ok(rows.map(Keys::Ids))
}

/// One input's tables, by running its folded functions on every key; `None` where the input
/// has no key set.
fn build(model: &TypedModel, input: OutletId, folds: &[Folded]) -> TractResult<Option<KeyedInput>> {
    let Some(keys) = keys(model, input)? else {
        return Ok(None);
    };
    let mut scratch = model.clone();
    let outputs = folds
        .iter()
        .map(|f| wire(&mut scratch, f))
        .collect::<TractResult<Vec<_>>>()?;
    // Fails if they read anything but this input (they cannot: they are its functions).
    let part = super::extract(&scratch, &[input], &outputs)?;
    let fallback = SimplePlan::new(part.into_optimized()?)?;
    let tables = fallback
        .run(tvec!(keys.probe()?.into_tvalue()))?
        .into_iter()
        .map(|t| {
            let mut t = t.into_tensor();
            t.remove_axis(0)?;
            Ok(t.into_arc_tensor())
        })
        .collect::<TractResult<Vec<_>>>()?;
    let fallback = matches!(keys, Keys::Halves { .. }).then_some(fallback);
    Ok(Some(KeyedInput {
        keys,
        tables,
        fallback,
    }))
}

/// Replaces every single-input function worth it, every sum of two of them, and every
/// projection of such a sum with one [`TokenTable`], as far as each input's memory budget
/// goes ([`MAX_EXTRA_TABLE_BYTES`] beyond the constants its tables replace).
pub fn fold(model: &mut TypedModel) -> TractResult<FoldSummary> {
    let kinds = classify(model)?;
    let frontiers = frontiers(model, &kinds);
    let sums = sums(model, &frontiers);
    // What each input's tables hold, and each replaced outlet's terms as (input, fold).
    let mut folds: Vec<Vec<Folded>> = vec![Vec::new(); model.inputs.len()];
    let term = |folds: &mut Vec<Vec<Folded>>, input: usize, f: Folded| {
        folds[input].push(f);
        (input, folds[input].len() - 1)
    };
    let mut outputs: Vec<(OutletId, Vec<(usize, usize)>)> = Vec::new();
    let mut frontier_terms = HashMap::new();
    for &(input, outlet) in &frontiers {
        frontier_terms.insert(outlet, term(&mut folds, input, Folded::Node(outlet)));
    }
    for &(sum, pair) in &sums {
        outputs.push((
            OutletId::new(sum, 0),
            pair.iter().map(|p| frontier_terms[&p.1]).collect(),
        ));
        for (einsum, bias) in split_einsums(model, &kinds, sum) {
            let after = bias.unwrap_or(einsum);
            for path in linear_paths(model, &kinds, after) {
                let end = *path.last().unwrap_or(&after);
                let terms = pair
                    .iter()
                    .enumerate()
                    .map(|(k, &(input, frontier))| {
                        // One term takes the bias.
                        let bias = bias.filter(|_| k == 0);
                        let path = path.clone();
                        let split = Folded::Split {
                            frontier,
                            einsum,
                            bias,
                            after,
                            path,
                        };
                        term(&mut folds, input, split)
                    })
                    .collect();
                outputs.push((OutletId::new(end, 0), terms));
            }
        }
    }
    // A frontier read by anything but the sums keeps an output of its own.
    for &(_, outlet) in &frontiers {
        let in_sums = |s: &InletId| sums.iter().any(|(sum, _)| *sum == s.node);
        let succ = &model.outlet_successors(outlet);
        if model.outputs.contains(&outlet) || !succ.iter().all(in_sums) {
            outputs.push((outlet, vec![frontier_terms[&outlet]]));
        }
    }

    // Which outputs get tables: in order (the encoders' sum first), each while every input
    // it reads stays within its memory budget.
    let budget: Vec<usize> = (0..model.inputs.len())
        .map(|i| Ok(MAX_EXTRA_TABLE_BYTES + replaced_bytes(model, &kinds, i)?))
        .collect::<TractResult<_>>()?;
    let key_counts = (0..model.inputs.len())
        .map(|i| Ok(keys(model, model.inputs[i])?.map(Keys::count)))
        .collect::<TractResult<Vec<_>>>()?;
    let mut spent = vec![0usize; model.inputs.len()];
    let mut chosen: Vec<Vec<usize>> = vec![Vec::new(); model.inputs.len()];
    let mut kept = Vec::new();
    for (outlet, terms) in outputs {
        let row = model.outlet_fact(outlet)?.shape[2..]
            .iter()
            .map(|d| d.to_usize())
            .product::<Result<usize, _>>()?;
        let mut more = vec![0usize; model.inputs.len()];
        let mut fits = true;
        for &(i, f) in &terms {
            match key_counts[i] {
                Some(count) if !chosen[i].contains(&f) => more[i] += count * row * 4,
                Some(_) => {}
                None => fits = false,
            }
        }
        fits &= (0..more.len()).all(|i| spent[i] + more[i] <= budget[i]);
        if !fits {
            continue;
        }
        for &(i, f) in &terms {
            if !chosen[i].contains(&f) {
                chosen[i].push(f);
            }
            spent[i] += std::mem::take(&mut more[i]);
        }
        kept.push((outlet, terms));
    }
    let mut built = Vec::new();
    for (input, f) in chosen.iter().enumerate() {
        let folded: Vec<Folded> = f.iter().map(|&f| folds[input][f].clone()).collect();
        built.push(if folded.is_empty() {
            None
        } else {
            build(model, model.inputs[input], &folded)?
        });
    }
    // Inputs renumbered among those with tables, folds among those built.
    let used: Vec<usize> = (0..built.len()).filter(|&i| built[i].is_some()).collect();
    let outputs: Vec<_> = kept
        .into_iter()
        .filter(|(_, terms)| terms.iter().all(|t| built[t.0].is_some()))
        .map(|(o, terms)| {
            let terms = terms.iter().map(|&(i, f)| {
                let input = used.iter().position(|&u| u == i).unwrap();
                (input, chosen[i].iter().position(|&c| c == f).unwrap())
            });
            (o, terms.collect::<Vec<_>>())
        })
        .collect();
    if outputs.is_empty() {
        return Ok(FoldSummary::default());
    }
    let replaceable = used
        .iter()
        .map(|&i| Ok((model.inputs[i], replaced_bytes(model, &kinds, i)?)))
        .collect::<TractResult<Vec<_>>>()?;
    let table_bytes = built
        .iter()
        .flatten()
        .flat_map(|k| &k.tables)
        .map(|t| t.len() * 4)
        .sum();
    let op = TokenTable {
        inputs: built.into_iter().flatten().collect(),
        outputs: outputs.iter().map(|o| o.1.clone()).collect(),
    };
    let mut patch = TypedModelPatch::new("token tables");
    let taps = used
        .iter()
        .map(|&i| patch.tap_model(model, model.inputs[i]))
        .collect::<TractResult<TVec<_>>>()?;
    let wired = patch.wire_node("token_tables", op, &taps)?;
    for ((replaced, _), new) in outputs.iter().zip(wired) {
        patch.shunt_outside(model, *replaced, new)?;
    }
    patch.apply(model)?;
    // Drop what the tables replaced (the embedding), so that it is not held beside them.
    model.compact()?;
    // An input's gathered constants are gone where no gather reads the input any more.
    let mut replaced_bytes = 0;
    for (input, bytes) in replaceable {
        let gathers = model
            .outlet_successors(input)
            .iter()
            .any(|s| model.node(s.node).op_is::<Gather>());
        if !gathers {
            replaced_bytes += bytes;
        }
    }
    Ok(FoldSummary {
        outputs: outputs.len(),
        table_bytes,
        replaced_bytes,
    })
}

/// The bytes of the constants input `input`'s tables make dead: those it gathers rows of
/// (an embedding) where nothing but functions of that input reads the rows.
fn replaced_bytes(model: &TypedModel, kinds: &[Kind], input: usize) -> TractResult<usize> {
    let mut bytes = 0;
    for user in model.outlet_successors(model.inputs[input]) {
        let gather = model.node(user.node);
        if !gather.op_is::<Gather>() || user.slot != 1 {
            continue;
        }
        let own = |k: Kind| matches!(k, Kind::Token { inputs, .. } if inputs == 1 << input);
        let only_own = gather.outputs[0]
            .successors
            .iter()
            .all(|s| own(kinds[s.node]));
        let data = model.outlet_fact(gather.inputs[0])?;
        if let (true, Some(k)) = (only_own, &data.konst) {
            bytes += k.len() * k.datum_type().size_of();
        }
    }
    Ok(bytes)
}
