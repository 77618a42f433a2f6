//! The model stage: the package on disk, batching cells by length, and running them in tract
//! (each attention layer as one fused op where the CPU has the vector kernel for it).

pub mod attention;
pub mod batching;
mod onnx_names;
pub mod package;
pub mod runner;

pub use package::{default_model_dir, Manifest, ModelError, ModelPackage};
pub use runner::{Batch, ModelRuntime, Outputs, Worker};
