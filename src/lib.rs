//! qwen-mk: Qwen3-0.6B text generation with one persistent CUDA kernel per
//! decode step. The library holds everything but the command line, so that
//! tests can reach the loader, the CPU reference and the checks directly.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod chat_template;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cpu_reference;
pub mod generate;
pub mod gpu;
mod json_field;
/// The dimensions the CUDA kernels are compiled for (also read by build.rs).
pub mod kernel_dims;
pub mod model_source;
pub mod parity;
pub mod rope;
pub mod sampling;
pub mod synthetic;
pub mod tokenizer;
