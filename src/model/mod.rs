//! The model stage: the package on disk, batching cells by length, and running them in tract
//! (attention layers and LayerNorms fused into ops of our own where the CPU has the kernels).

pub mod batching;
pub mod fuse;
mod onnx_names;
pub mod package;
pub mod runner;

pub use package::{default_model_dir, Manifest, ModelError, ModelPackage};
pub use runner::{Batch, Fused, ModelRuntime, Outputs, Worker};
