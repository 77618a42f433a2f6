//! The model stage: the package on disk, batching cells by length, and running them in tract
//! (attention layers and LayerNorms fused into ops of our own where the CPU has the kernels,
//! and tract's matmul kernel choice corrected where it was measured wrong).

pub mod batching;
pub mod fuse;
pub mod kernel_choice;
mod onnx_names;
pub mod package;
pub mod runner;

pub use package::{default_model_dir, Manifest, ModelError, ModelPackage};
pub use runner::{Batch, Fused, ModelRuntime, Outputs, Worker};
