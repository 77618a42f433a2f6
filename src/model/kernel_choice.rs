//! Which matrix-multiply kernel runs each product: capped to the runtime's [`Simd`] tier, and
//! corrected where tract's own choice was measured wrong on this CPU.
//!
//! **Our own, on AVX2.** On an AVX2-only CPU (or with `CELLSTREAM_SIMD=avx2`) the products by
//! constant weights run on cellstream's kernel ([`KernelChoice::Own`]: `fuse/f32_kernel.rs`,
//! a `Linear` op put in by the last transform), which sums exactly as tract's kernels do and
//! runs those products faster there; the other products (none in the fused graph's hot path)
//! stay tract's. On AVX-512 CPUs tract's kernels are kept: they run near the CPU's peak, and
//! no kernel of ours was measured against them.
//!
//! **The cap.** With `CELLSTREAM_SIMD=avx2` (or `portable`) on an AVX-512 machine, our ops
//! run their AVX2 kernels, and so must tract's matmuls, or a benchmark of "what an AVX2-only
//! CPU gets" would measure AVX-512 products. While a plan is built for a lower tier, the tier
//! below answers with the kernel tract itself would pick on a machine of that tier
//! (tract-linalg's dispatch for `IsaSet::ladder(x86_64, level)`).
//!
//! **Zen 4.** tract picks a kernel per product from a cost model fitted on one machine per
//! vendor; its AMD AVX-512 model was fitted on Zen 5, which has full-width 512-bit FMA units.
//! On Zen 4 (family 19h with AVX-512: two 256-bit halves per 512-bit FMA) that model sends the
//! products whose output is narrower than their token count (the 128-wide out projection,
//! second feed-forward layer and value encoder) to the 16x12 kernel, which issues a broadcast
//! load per FMA and runs them at 62–74 GFLOP/s, where the 32x6 kernel runs the same products
//! at 90 (BENCHMARKS.md, "Kernel choice"). Every kernel sums each output over `k` in the same
//! order, so the choice moves time, never a bit of the result (`tests/integration/embed.rs`).
//!
//! Both are a tier in tract-linalg's dispatch ladder (`mmm_tiers`, its public extension point
//! for per-chip opinions): asked before tract's own tiers, it answers only while cellstream
//! builds a plan ([`KernelChoice::planning`]); the Zen 4 override only where tract's answer
//! would be the 16x12 kernel, and only on Zen 4; every other product, and every other CPU, is
//! tract's. `CELLSTREAM_KERNELS=tract` turns the override off (a knob for comparisons).

use std::cell::Cell;

use super::fuse::PackedWeights;
use crate::simd::Simd;

#[cfg(target_arch = "x86_64")]
use tract_linalg::isa::{Arch, Isa, IsaSet};
#[cfg(target_arch = "x86_64")]
use tract_linalg::mmm::{Query, Suitable};
#[cfg(target_arch = "x86_64")]
use tract_linalg::mmm_tiers::{self, MmmTier};
#[cfg(target_arch = "x86_64")]
use tract_linalg::MmmDispatch;

/// Above every tier tract declares for x86-64 (they use 0–8).
#[cfg(target_arch = "x86_64")]
const PRECEDENCE: u8 = 100;

/// tract's pick that Zen 4 runs slowly, and the one run instead.
#[cfg(target_arch = "x86_64")]
const SLOW_ON_ZEN4: &str = "avx512_mmm_f32_16x12";
#[cfg(target_arch = "x86_64")]
const INSTEAD_ON_ZEN4: &str = "avx512_mmm_f32_32x6";

/// Below this many rows a 32-row tile would be mostly padding; tract's pick stands.
#[cfg(target_arch = "x86_64")]
const MIN_ROWS: usize = 64;

/// How a plan's matmul kernels are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// tract's own choice everywhere.
    Tract,
    /// tract's choice, except the Zen 4 override above.
    Zen4,
    /// Our AVX2 kernel for the products by constant weights, tract's choice elsewhere.
    Own,
}

thread_local! {
    /// The choice and tier of the plan this thread is building, if cellstream is building one.
    static PLANNING: Cell<Option<(KernelChoice, Simd)>> = const { Cell::new(None) };
}

impl KernelChoice {
    /// The best on this CPU at tier `simd`: our own where the tier is AVX2, the override
    /// where it is a Zen 4's AVX-512, tract's choice elsewhere.
    pub fn best(simd: Simd) -> KernelChoice {
        match simd {
            Simd::Avx2 if PackedWeights::runs_here() => KernelChoice::Own,
            Simd::Avx512 if is_zen4() => KernelChoice::Zen4,
            _ => KernelChoice::Tract,
        }
    }

    /// [`KernelChoice::best`], unless `CELLSTREAM_KERNELS` names another this CPU can use
    /// (`tract`, `zen4`, `own`): a knob for comparisons, not a setting.
    pub fn from_env(simd: Simd) -> Result<KernelChoice, String> {
        super::knob(
            "CELLSTREAM_KERNELS",
            KernelChoice::best(simd),
            &KernelChoice::available(),
            KernelChoice::name,
        )
    }

    /// Every choice this CPU can make.
    pub fn available() -> Vec<KernelChoice> {
        let mut all = vec![KernelChoice::Tract];
        if is_zen4() {
            all.push(KernelChoice::Zen4);
        }
        if PackedWeights::runs_here() {
            all.push(KernelChoice::Own);
        }
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Tract => "tract",
            KernelChoice::Zen4 => "zen4",
            KernelChoice::Own => "own",
        }
    }

    /// Runs `plan` (which optimizes a tract model on this thread) with this choice in force
    /// and tract's matmul kernels kept to `simd`'s tier.
    pub fn planning<R>(self, simd: Simd, plan: impl FnOnce() -> R) -> R {
        /// Puts the previous choice back when dropped, a panicking build included (the
        /// inference workers catch panics and carry on with the same thread).
        struct Restore(Option<(KernelChoice, Simd)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                PLANNING.set(self.0);
            }
        }
        let _restore = Restore(PLANNING.replace(Some((self, simd))));
        plan()
    }
}

/// AMD family 19h with AVX-512F: Zen 4 (Zen 3, the same family, has no AVX-512).
#[cfg(target_arch = "x86_64")]
fn is_zen4() -> bool {
    use std::arch::x86_64::__cpuid;
    if !std::is_x86_feature_detected!("avx512f") {
        return false;
    }
    // SAFETY: `cpuid` exists on every x86-64 CPU; leaves 0 and 1 always. (`unsafe` is needed
    // on the minimum rustc, 1.91; newer ones deem it redundant.)
    #[allow(unused_unsafe)]
    let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
    let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
    let family = ((signature >> 8) & 0xf) + ((signature >> 20) & 0xff);
    amd && family == 0x19
}

#[cfg(not(target_arch = "x86_64"))]
fn is_zen4() -> bool {
    false
}

/// tract-linalg's ladder level of the x86-64 kernels a tier may run (`Isa::level`: AVX2 and
/// FMA are 2), `None` for no cap. The portable tier caps nothing: tract answers every x86-64
/// product with a kernel of its own (its portable Rust kernels are never preferred to one),
/// so no plan can be held to them; that tier exists to test our portable kernels.
#[cfg(target_arch = "x86_64")]
fn cap(simd: Simd) -> Option<u8> {
    match simd {
        Simd::Avx2 => Some(2),
        Simd::Portable | Simd::Avx512 => None,
    }
}

/// The tier's answer: tract's own pick for the capped instruction set where the plan's tier is
/// below the machine's; else the replacement where tract's own tiers would answer
/// [`SLOW_ON_ZEN4`].
#[cfg(target_arch = "x86_64")]
fn preferred(
    isa: &IsaSet,
    accumulator: tract_core::prelude::DatumType,
    query: &Query,
    suitable: &[Suitable],
) -> Option<&'static str> {
    let (choice, simd) = PLANNING.get()?;
    if let Some(level) = cap(simd) {
        // Asked again by the capped dispatch below (its set is at the level): tract's tiers.
        if isa.level() <= level {
            return None;
        }
        let capped = MmmDispatch::for_isa(IsaSet::ladder(Arch::X86_64, level));
        let (kernel, ..) = capped.pick(query)?;
        // The same kernel among this machine's, whose names live as long as the program.
        return MmmDispatch::native()
            .runnable()
            .iter()
            .map(|k| k.name())
            .find(|&name| name == kernel.name());
    }
    if choice != KernelChoice::Zen4
        || !isa.has(Isa::X86_64Avx512f)
        || query.m.is_some_and(|m| m < MIN_ROWS)
    {
        return None;
    }
    let below: Vec<&MmmTier> = mmm_tiers::for_isa(isa)
        .into_iter()
        .filter(|t| t.precedence < PRECEDENCE)
        .collect();
    let tracts = mmm_tiers::preferred(isa, &below, accumulator, query, suitable)?;
    (suitable[tracts].0.name() == SLOW_ON_ZEN4).then_some(INSTEAD_ON_ZEN4)
}

#[cfg(target_arch = "x86_64")]
inventory::submit! {
    MmmTier {
        arch: Some(Arch::X86_64),
        precedence: PRECEDENCE,
        name: "cellstream",
        applies: |_| true,
        preferred,
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use tract_core::prelude::DatumType;
    use tract_linalg::MmmDispatch;

    fn query(m: usize, k: usize, n: usize) -> Query {
        Query {
            weight: DatumType::F32.into(),
            activation: DatumType::F32,
            accumulators: std::iter::once(DatumType::F32).collect(),
            store: Some(DatumType::F32),
            allow_extractor: true,
            m: Some(m),
            k: Some(k),
            n: Some(n),
        }
    }

    /// The product shapes of the shipped model at 256 tokens, and its classifier head's.
    const SHAPES: [(usize, usize, usize); 4] = [
        (256, 128, 128),
        (256, 256, 128),
        (384, 128, 256),
        (16, 128, 8),
    ];

    fn picked(q: &Query) -> Option<String> {
        let dispatch = MmmDispatch::native();
        let suitable = dispatch.suitable(q);
        dispatch
            .preferred(q, &suitable)
            .map(|s| s.0.name().to_string())
    }

    /// Whatever the CPU, the tier only ever swaps tract's 16x12 pick for the 32x6 one at the
    /// machine's own tier, and only while a plan that asked for it is being built.
    #[test]
    fn answers_only_in_place_of_the_slow_kernel() {
        let top = Simd::detect();
        for (m, k, n) in SHAPES {
            let q = query(m, k, n);
            let tracts = picked(&q);
            for choice in KernelChoice::available() {
                let ours = choice.planning(top, || picked(&q));
                if ours != tracts {
                    assert_eq!(choice, KernelChoice::Zen4);
                    assert_eq!(tracts.as_deref(), Some(SLOW_ON_ZEN4), "{m}x{k}x{n}");
                    assert_eq!(ours.as_deref(), Some(INSTEAD_ON_ZEN4), "{m}x{k}x{n}");
                    assert!(m >= MIN_ROWS, "{m}x{k}x{n}");
                }
                if choice == KernelChoice::Zen4 && m >= MIN_ROWS {
                    assert_ne!(ours.as_deref(), Some(SLOW_ON_ZEN4), "{m}x{k}x{n}");
                }
            }
            assert_eq!(picked(&q), tracts, "the choice outlives its plan");
        }
    }

    /// A plan built for the AVX2 tier runs tract's kernels for that tier: no AVX-512 kernel.
    #[test]
    fn a_lower_tier_caps_the_matmul_kernels() {
        for simd in Simd::available() {
            for (m, k, n) in SHAPES {
                let q = query(m, k, n);
                for choice in KernelChoice::available() {
                    let name = choice.planning(simd, || picked(&q)).unwrap();
                    match simd {
                        Simd::Avx2 => assert!(name.starts_with("fma_"), "{name} for avx2"),
                        Simd::Portable | Simd::Avx512 => {}
                    }
                }
            }
        }
    }
}
