//! Packed weights shared between plans.
//!
//! The runtime compiles one tract plan per batch shape (rows × length bucket), and tract's
//! optimizer packs each matmul's constant operand into the panel layout of the kernel it
//! picks, once per plan. The shipped model's five bucket plans held 9.5 MiB of packed
//! weights of which 2.9 MiB were distinct: the same weights in the same layout, packed again
//! for every bucket. [`SharingRuntime`] is tract's CPU runtime (optimize, then plan) with one
//! more step: a packed constant equal to one a live plan already holds (same layout, same
//! values) is replaced by that plan's, so they share its storage. Results are unchanged: the
//! kernels read the same values in the same order.
//!
//! Equal means equal logical values: the bytes may differ in a panel's padding, which tract
//! leaves uninitialised and no kernel output reads.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use tract_core::internal::*;
use tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_core::runtime::{Runnable, Runtime};
use tract_linalg::mmm::{EagerPackedInput, MMMInputValue};

/// The name [`SharingRuntime`] is registered under (`tract::runtime_for_name`).
pub const RUNTIME_NAME: &str = "cellstream-cpu";

/// Plan properties: the bytes of packed constants the plan refers to, and how many of those
/// it shares with plans built before it.
pub const PACKED_BYTES_PROPERTY: &str = "cellstream.packed_weight_bytes";
pub const SHARED_BYTES_PROPERTY: &str = "cellstream.packed_weight_bytes_shared";

/// tract's CPU runtime, plus packed weights shared with the plans already built.
#[derive(Debug)]
pub struct SharingRuntime;

impl Runtime for SharingRuntime {
    fn name(&self) -> StaticName {
        RUNTIME_NAME.into()
    }

    fn prepare_with_options(
        &self,
        model: TypedModel,
        options: &RunOptions,
    ) -> TractResult<Box<dyn Runnable>> {
        let mut model = model.into_optimized()?;
        let usage = share_packed_weights(&mut model)?;
        for (name, bytes) in [
            (PACKED_BYTES_PROPERTY, usage.bytes),
            (SHARED_BYTES_PROPERTY, usage.shared),
        ] {
            model
                .properties
                .insert(name.into(), tensor0(bytes as i64).into_arc_tensor());
        }
        Ok(Box::new(TypedSimplePlan::new_with_options(model, options)?))
    }

    fn check(&self) -> TractResult<()> {
        Ok(())
    }
}

tract_core::register_runtime!(SharingRuntime = SharingRuntime);

/// Packed constants of one plan, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackedUsage {
    pub bytes: usize,
    /// Of `bytes`, the storage another plan already held.
    pub shared: usize,
}

/// The packed constants of every live plan, by content. Each entry holds a reference to its
/// storage; one only the store still references (every plan using it dropped) is removed at
/// the next pass, so the store never keeps weights alive on its own for long.
static STORE: Mutex<Vec<Stored>> = Mutex::new(Vec::new());

struct Stored {
    key: u64,
    value: EagerPackedInput,
}

/// Points every packed constant of an optimized `model` that equals a stored one at the
/// stored storage, and stores the others.
pub fn share_packed_weights(model: &mut TypedModel) -> TractResult<PackedUsage> {
    let mut store = STORE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    store.retain(|s| Arc::strong_count(&s.value.packed) > 1);
    let mut usage = PackedUsage::default();
    for id in 0..model.nodes().len() {
        let Some(matmul) = model.node_mut(id).op_as_mut::<OptMatMul>() else {
            continue;
        };
        for spec in &mut matmul.micro_ops {
            let ProtoFusedSpec::AddMatMul { a, b, .. } = spec else {
                continue;
            };
            for operand in [a, b] {
                let MatMulOperand::Const(value) = operand else {
                    continue;
                };
                let Some(packed) = value.downcast_ref::<EagerPackedInput>() else {
                    continue;
                };
                usage.bytes += packed.packed.len();
                // A format with no f32 view (none in an f32 model) is left unshared.
                let Ok(values) = logical_values(packed) else {
                    continue;
                };
                let key = content_key(packed, &values);
                let known = store.iter().find(|s| {
                    s.key == key
                        && same_layout(&s.value, packed)
                        && logical_values(&s.value).is_ok_and(|v| v == values)
                });
                match known {
                    Some(s) if !Arc::ptr_eq(&s.value.packed, &packed.packed) => {
                        usage.shared += packed.packed.len();
                        *operand = MatMulOperand::Const(Box::new(s.value.clone()));
                    }
                    Some(_) => usage.shared += packed.packed.len(),
                    None => store.push(Stored {
                        key,
                        value: packed.clone(),
                    }),
                }
            }
        }
    }
    Ok(usage)
}

/// The packed matrix's values, row (m or n index) by row, as bits: what the kernels read.
fn logical_values(packed: &EagerPackedInput) -> TractResult<Vec<u32>> {
    let k = packed.k();
    let mut row = vec![0f32; k];
    let mut values = Vec::with_capacity(packed.mn * k);
    for mn in 0..packed.mn {
        packed.extract_at_mn_f32(mn, &mut row)?;
        values.extend(row.iter().map(|v| v.to_bits()));
    }
    Ok(values)
}

fn same_layout(a: &EagerPackedInput, b: &EagerPackedInput) -> bool {
    a.fact == b.fact
        && a.mn == b.mn
        && a.panel_bytes == b.panel_bytes
        && a.packed.len() == b.packed.len()
        && a.packed.layout().align() == b.packed.layout().align()
}

fn content_key(packed: &EagerPackedInput, values: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    packed.fact.hash(&mut h);
    (packed.mn, packed.panel_bytes, packed.packed.len()).hash(&mut h);
    values.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::einsum::EinSum;
    use tract_core::runtime::DefaultRuntime;

    /// `x · w` for `rows` rows of 64 features, `w` a `[64, 48]` constant.
    fn matmul_model(rows: usize, w: &Tensor) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model
            .add_source("x", f32::fact([rows, 64]))
            .expect("source");
        let w = model.add_const("w", w.clone()).expect("const");
        let axes = "nk,km->nm".parse().expect("axes");
        let y = model
            .wire_node("y", EinSum::new(axes, f32::datum_type()), &[x, w])
            .expect("einsum");
        model.select_output_outlets(&y).expect("outputs");
        model
    }

    fn packed_operands(plan: &dyn Runnable) -> Vec<Arc<Blob>> {
        let model = plan.typed_model().expect("a typed plan");
        let mut blobs = vec![];
        for node in model.nodes() {
            let Some(matmul) = node.op_as::<OptMatMul>() else {
                continue;
            };
            for spec in &matmul.micro_ops {
                if let ProtoFusedSpec::AddMatMul { a, b, .. } = spec {
                    for operand in [a, b] {
                        if let MatMulOperand::Const(v) = operand {
                            if let Some(p) = v.downcast_ref::<EagerPackedInput>() {
                                blobs.push(p.packed.clone());
                            }
                        }
                    }
                }
            }
        }
        blobs
    }

    fn run(plan: &dyn Runnable, rows: usize) -> Tensor {
        let x: Vec<f32> = (0..rows * 64)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 5.0)
            .collect();
        let x = Tensor::from_shape(&[rows, 64], &x).expect("input");
        plan.run(tvec!(x.into_tvalue()))
            .expect("run")
            .remove(0)
            .into_tensor()
    }

    #[test]
    fn plans_of_one_weight_share_its_packing_and_compute_the_same() {
        // Values no other test's weights have, so the process-wide store holds no match.
        let mut values: Vec<f32> = (0..64 * 48)
            .map(|i| (i as f32 * 0.618).sin() + 3.25)
            .collect();
        let w = Tensor::from_shape(&[64, 48], &values).expect("weight");
        let first = SharingRuntime.prepare(matmul_model(64, &w)).expect("plan");
        let second = SharingRuntime.prepare(matmul_model(128, &w)).expect("plan");
        let (a, b) = (packed_operands(&*first), packed_operands(&*second));
        // (Sizes for which tract packs the weight in one layout: it picks the operand order
        // and kernel by shape.)
        assert_eq!((a.len(), b.len()), (1, 1), "one packed weight per plan");
        assert!(
            Arc::ptr_eq(&a[0], &b[0]),
            "the second plan reuses the first's"
        );
        let bytes = a[0].len() as i64;
        let property =
            |p: &dyn Runnable, name| p.properties()[name].cast_to_scalar::<i64>().unwrap();
        assert_eq!(property(&*first, SHARED_BYTES_PROPERTY), 0);
        assert_eq!(property(&*second, SHARED_BYTES_PROPERTY), bytes);
        assert_eq!(property(&*second, PACKED_BYTES_PROPERTY), bytes);

        // Bit for bit what tract's own runtime computes with its own packing.
        for (plan, rows) in [(&first, 64), (&second, 128)] {
            let own = DefaultRuntime
                .prepare(matmul_model(rows, &w))
                .expect("plan");
            assert_eq!(run(&**plan, rows), run(&*own, rows));
        }

        // A different weight of the same shape is not mistaken for it.
        values[5] += 1.0;
        let other = Tensor::from_shape(&[64, 48], &values).expect("weight");
        let third = SharingRuntime
            .prepare(matmul_model(64, &other))
            .expect("plan");
        assert!(!Arc::ptr_eq(&packed_operands(&*third)[0], &a[0]));
        assert_eq!(property(&*third, SHARED_BYTES_PROPERTY), 0);
    }
}
