//! qwen-mk: Qwen3-0.6B text generation with one persistent CUDA kernel per
//! decode step. The library holds everything but the command line, so that
//! tests can reach the loader, the CPU reference and the checks directly.

/// A status line on stderr, as `eprintln!` writes it, but one that cannot
/// fail the run: `eprintln!` panics when stderr's reader has gone
/// (`2>&1 | head`), and a note about the run is not worth the run.
#[macro_export]
macro_rules! status {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
