//! The checkpoint's weights on the GPU, in the layout the kernels read: all
//! per-layer tensors packed into one buffer (offsets in
//! `kernel_dims::layer_layout`), the embedding, the head (only when untied),
//! the final norm and the RoPE frequencies.

use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};

use crate::checkpoint::{Checkpoint, LayerTensor, EMBED, FINAL_NORM};
use crate::kernel_dims::{layer_layout as lay, NUM_LAYERS};
use crate::rope;

pub struct GpuWeights {
    pub layers: CudaSlice<u16>,
    pub embed: CudaSlice<u16>,
    /// None when the head is the embedding.
    pub lm_head: Option<CudaSlice<u16>>,
    pub final_norm: CudaSlice<u16>,
    pub inv_freq: CudaSlice<f32>,
}

/// Where each checkpoint tensor goes inside one packed layer. Q, K and V are
/// consecutive, which makes them one fused projection.
fn packed_offset(tensor: LayerTensor) -> usize {
    let c = crate::kernel_dims::HIDDEN;
    match tensor {
        LayerTensor::InputNorm => lay::INPUT_NORM,
        LayerTensor::PostAttnNorm => lay::POST_ATTN_NORM,
        LayerTensor::QNorm => lay::Q_NORM,
        LayerTensor::KNorm => lay::K_NORM,
        LayerTensor::QProj => lay::QKV,
        LayerTensor::KProj => lay::QKV + crate::kernel_dims::Q_DIM * c,
        LayerTensor::VProj => {
            lay::QKV + (crate::kernel_dims::Q_DIM + crate::kernel_dims::KV_DIM) * c
        }
        LayerTensor::OProj => lay::O,
        LayerTensor::GateProj => lay::GATE,
        LayerTensor::UpProj => lay::UP,
        LayerTensor::DownProj => lay::DOWN,
    }
}

fn bf16_bits(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

impl GpuWeights {
    /// Uploads a checkpoint whose dimensions `check_kernel_dims` accepted.
    pub fn upload(checkpoint: &Checkpoint, stream: &std::sync::Arc<CudaStream>) -> Result<Self> {
        let oom = "not enough GPU memory for the weights (about 1.5 GB)";
        let mut layers = stream
            .alloc_zeros::<u16>(NUM_LAYERS * lay::STRIDE)
            .context(oom)?;
        let mut staging = vec![0u16; lay::STRIDE];
        for layer in 0..NUM_LAYERS {
            for tensor in LayerTensor::ALL {
                let values = bf16_bits(checkpoint.bytes(&tensor.name(layer)));
                let at = packed_offset(tensor);
                staging[at..at + values.len()].copy_from_slice(&values);
            }
            let mut dst = layers.slice_mut(layer * lay::STRIDE..(layer + 1) * lay::STRIDE);
            stream.memcpy_htod(&staging, &mut dst)?;
            // The copy reads `staging` asynchronously from pageable memory;
            // cudarc stages it before returning, so reuse is safe.
        }
        let upload = |name: &str| -> Result<CudaSlice<u16>> {
            stream
                .clone_htod(&bf16_bits(checkpoint.bytes(name)))
                .context(oom)
        };
        let config = &checkpoint.config;
        Ok(Self {
            layers,
            embed: upload(EMBED)?,
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(upload(checkpoint.lm_head_name())?)
            },
            final_norm: upload(FINAL_NORM)?,
            inv_freq: stream.clone_htod(&rope::inverse_frequencies(
                config.rope_theta,
                config.head_dim,
            ))?,
        })
    }

    pub fn head(&self) -> &CudaSlice<u16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
