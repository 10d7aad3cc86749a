//! Everything that touches the GPU: opening it, the weights in kernel layout,
//! and the decoder that launches the kernels.

pub mod decoder;
pub mod device;
pub mod weights;

pub use decoder::GpuDecoder;
