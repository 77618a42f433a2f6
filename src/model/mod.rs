//! The model stage: the package on disk, cells chunked by length, and running them in tract
//! (attention layers and LayerNorms fused into ops of our own where the CPU has the kernels,
//! and tract's matmul kernel choice corrected where it was measured wrong).

pub mod chunking;
pub mod fuse;
pub mod kernel_choice;
mod onnx_names;
pub mod package;
pub mod runner;
pub mod shared_weights;

pub use package::{default_model_dir, Manifest, ModelError, ModelPackage};
pub use runner::{Fused, HeapTrim, ModelInput, ModelRuntime, Options, Outputs, Worker};

/// The choice the environment variable `var` names among `available` (by `name`), or `best`
/// where it is unset: the knobs for comparisons (`CELLSTREAM_FUSION`, `CELLSTREAM_KERNELS`),
/// not settings.
fn knob<T: Copy>(
    var: &str,
    best: T,
    available: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, String> {
    let Ok(wanted) = std::env::var(var) else {
        return Ok(best);
    };
    available
        .iter()
        .copied()
        .find(|&a| name(a) == wanted)
        .ok_or_else(|| {
            let names: Vec<_> = available.iter().map(|&a| name(a)).collect();
            format!("{var}={wanted:?}: this CPU runs one of {names:?}")
        })
}
