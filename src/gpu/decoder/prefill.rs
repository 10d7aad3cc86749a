//! Batched prefill: a run of prompt positions goes through all 28 layers at
//! once, so the projections are matrix products on the tensor cores (cuBLAS)
//! instead of one GEMV per token. Per layer, for a chunk of `rows` positions:
//!
//!   RMSNorm -> QKV GEMM -> q/k norm, RoPE, K/V into the cache
//!   -> causal flash attention -> O GEMM added onto the residual
//!   -> RMSNorm -> gate|up GEMM -> SiLU * up -> down GEMM added onto the
//!   residual.
//!
//! The residual stream stays in f32 (as in the decode kernel); what the
//! GEMMs read and the QKV and gate|up outputs are bf16, as in transformers'
//! bf16 forward (f32 outputs measured 3 ms slower at 8,192 tokens, all of it
//! memory traffic). The residual of the last position is copied to where
//! the LM head reads it, so the next launch is the ordinary LM head and
//! decoding continues from the cache the prefill wrote.

use std::ffi::c_void;

use anyhow::{Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{ptr, GpuDecoder};
use crate::kernel_dims::{
    layer_layout as lay, HEAD_DIM, HIDDEN, INTERMEDIATE, NUM_KV_HEADS, NUM_LAYERS, NUM_Q_HEADS,
    PREFILL_ATTN_KEYS, PREFILL_ATTN_QUERIES, PREFILL_ATTN_SMEM_BYTES, PREFILL_ATTN_THREADS,
    PREFILL_CHUNK, PREFILL_MERGE_SLOTS_PER_BLOCK, PREFILL_NORM_ROWS_PER_BLOCK,
    PREFILL_QKV_HEADS_PER_BLOCK, PREFILL_ROW_THREADS, QKV_ROWS, Q_DIM,
};

/// Shorter prompts go through the decode kernel one token at a time: a
/// batched prefill costs about 2 ms however short the prompt (some 250
/// launches), a decode step 0.9 ms (H100, RESULTS.md).
pub const PREFILL_MIN_TOKENS: usize = 3;

/// cuBLAS picks a GEMM kernel by the shape, and the first use of each one
/// loads it: 4-12 ms on an H200 (RESULTS.md, session 17), at row counts no
/// simple rule predicts (64 and 1,000 among them, 65 and 1,025 not). So the
/// GEMMs run on row counts rounded up to a multiple of this, and the
/// warm-up runs every one of those: no prompt pays for a first use. The
/// extra rows cost little (a GEMM of up to 64 rows is bound by reading the
/// weights) and nothing reads them.
const GEMM_ROW_QUANTUM: usize = 64;

/// Mirrors `PrefillAttentionParams` in kernels/prefill_attention.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrefillAttentionParams {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    out: u64,
    partial_out: u64,
    partial_max_sum: u64,
    rows: u32,
    start_pos: u32,
    context: u32,
    splits: u32,
}
unsafe impl DeviceRepr for PrefillAttentionParams {}

/// A row-major bf16 weight matrix inside a packed layer (out x in features).
#[derive(Clone, Copy)]
struct Weight {
    ptr: u64,
    out_features: usize,
    in_features: usize,
}

/// The four GEMMs of a layer.
#[derive(Clone, Copy)]
enum LayerGemm {
    Qkv,
    O,
    GateUp,
    Down,
}

/// (split, row) pairs attention's partial buffers hold on a GPU of `sms`
/// SMs: attention_splits keeps splits x query blocks x NUM_KV_HEADS within
/// the SMs, so splits x rows within this.
fn split_rows(sms: usize) -> usize {
    sms / NUM_KV_HEADS * PREFILL_ATTN_QUERIES
}

impl LayerGemm {
    const ALL: [LayerGemm; 4] = [
        LayerGemm::Qkv,
        LayerGemm::O,
        LayerGemm::GateUp,
        LayerGemm::Down,
    ];
}

/// Most key splits of one attention launch, and the fewest key tiles a split
/// takes (fewer would spend more on the merge than they save).
const MAX_ATTENTION_SPLITS: usize = 16;
const MIN_TILES_PER_SPLIT: usize = 4;

/// How many ways prefill attention splits the keys for `rows` queries at
/// positions `start..`: a launch has NUM_KV_HEADS blocks per 64 queries,
/// each walking every key up to its last query, so a short chunk after a
/// long cache would leave most of the `sms` SMs idle while 8 of them stream
/// the whole cache. Splits fill the GPU, each gets MIN_TILES_PER_SPLIT tiles
/// or more, and each one's first tile starts at or below `start`, so it
/// holds a key every query attends to (the kernel's running max is then
/// finite). 1: no split.
fn attention_splits(rows: usize, start: usize, sms: usize) -> usize {
    let blocks = NUM_KV_HEADS * rows.div_ceil(PREFILL_ATTN_QUERIES);
    let first_block_tiles = (start + rows.min(PREFILL_ATTN_QUERIES) - 1) / PREFILL_ATTN_KEYS + 1;
    let last_block_tiles = (start + rows - 1) / PREFILL_ATTN_KEYS + 1;
    let mut splits = (sms / blocks)
        .min(first_block_tiles / MIN_TILES_PER_SPLIT)
        .min(MAX_ATTENTION_SPLITS);
    // The last split's first tile is the latest; the last query block's is
    // the latest of all.
    while splits > 1 && (splits - 1) * last_block_tiles / splits * PREFILL_ATTN_KEYS > start {
        splits -= 1;
    }
    splits.max(1)
}

/// Where a GEMM's result goes.
#[derive(Clone, Copy)]
enum Output {
    AddToResidual,
    Bf16,
}

/// cuBLAS and the activation buffers of one chunk.
pub struct Prefill {
    blas: CudaBlas,
    /// Positions the buffers hold.
    capacity: usize,
    x: CudaSlice<f32>,
    /// (cos, sin) of every RoPE angle of the chunk's positions.
    rope_table: CudaSlice<f32>,
    normed: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    q: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    h: CudaSlice<u16>,
    /// Attention's key splits, split_rows(SMs) (split, row) pairs of them: per
    /// (split, row, query head), HEAD_DIM unnormalised outputs, and the
    /// running (max, sum) as two f32.
    partial_out: CudaSlice<f32>,
    partial_max_sum: CudaSlice<f32>,
}

/// Bytes of GPU memory prefill's buffers take for `positions` positions.
pub fn buffer_bytes(positions: usize) -> usize {
    positions * (4 * (HIDDEN + HEAD_DIM) + 2 * (HIDDEN + QKV_ROWS + 2 * Q_DIM + 3 * INTERMEDIATE))
}

/// Why batched prefill cannot run here, or None when it can.
pub fn unavailable_reason() -> Option<String> {
    // cudarc panics when the library is missing: look first.
    if unsafe { blas_sys::is_culib_present() } {
        None
    } else {
        Some(
            "cuBLAS (libcublas.so.13 or .so.12) is not loadable; add its directory to LD_LIBRARY_PATH"
                .to_string(),
        )
    }
}

impl Prefill {
    pub fn new(
        stream: &std::sync::Arc<CudaStream>,
        context: usize,
        sm_count: usize,
    ) -> Result<Self> {
        let capacity = context.min(PREFILL_CHUNK);
        let split_rows = split_rows(sm_count);
        // What the GEMMs read and write holds their rounded-up rows.
        let gemm_rows = capacity.next_multiple_of(GEMM_ROW_QUANTUM);
        let oom = "not enough GPU memory for the prefill buffers";
        let blas = CudaBlas::new(stream.clone()).context("cannot start cuBLAS")?;
        Ok(Self {
            blas,
            capacity,
            x: stream.alloc_zeros(gemm_rows * HIDDEN).context(oom)?,
            rope_table: stream.alloc_zeros(capacity * HEAD_DIM).context(oom)?,
            normed: stream.alloc_zeros(gemm_rows * HIDDEN).context(oom)?,
            qkv: stream.alloc_zeros(gemm_rows * QKV_ROWS).context(oom)?,
            q: stream.alloc_zeros(capacity * Q_DIM).context(oom)?,
            attn: stream.alloc_zeros(gemm_rows * Q_DIM).context(oom)?,
            gate_up: stream
                .alloc_zeros(gemm_rows * 2 * INTERMEDIATE)
                .context(oom)?,
            h: stream.alloc_zeros(gemm_rows * INTERMEDIATE).context(oom)?,
            partial_out: stream.alloc_zeros(split_rows * Q_DIM).context(oom)?,
            partial_max_sum: stream
                .alloc_zeros(split_rows * NUM_Q_HEADS * 2)
                .context(oom)?,
        })
    }

    /// Runs `gemm` of the layer whose packed weights start at `layer` on the
    /// first `rows` positions of the chunk's buffers (rounded up to
    /// GEMM_ROW_QUANTUM).
    fn layer_gemm(&self, s: &CudaStream, layer: u64, gemm: LayerGemm, rows: usize) -> Result<()> {
        let (offset, out_features, in_features, input, out, output) = match gemm {
            LayerGemm::Qkv => {
                let (input, out) = (ptr(&self.normed, s), ptr(&self.qkv, s));
                (lay::QKV, QKV_ROWS, HIDDEN, input, out, Output::Bf16)
            }
            LayerGemm::O => {
                let (input, out) = (ptr(&self.attn, s), ptr(&self.x, s));
                (lay::O, HIDDEN, Q_DIM, input, out, Output::AddToResidual)
            }
            LayerGemm::GateUp => {
                // Gate and up are adjacent in the packed layer: one GEMM.
                let (input, out) = (ptr(&self.normed, s), ptr(&self.gate_up, s));
                (
                    lay::GATE,
                    2 * INTERMEDIATE,
                    HIDDEN,
                    input,
                    out,
                    Output::Bf16,
                )
            }
            LayerGemm::Down => {
                let (input, out) = (ptr(&self.h, s), ptr(&self.x, s));
                (
                    lay::DOWN,
                    HIDDEN,
                    INTERMEDIATE,
                    input,
                    out,
                    Output::AddToResidual,
                )
            }
        };
        let weight = Weight {
            ptr: layer + 2 * offset as u64,
            out_features,
            in_features,
        };
        self.gemm(weight, input, out, rows, output)
    }

    /// out (rows x out_features) = input (rows x in_features, bf16) . W^T,
    /// over `rows` rounded up to GEMM_ROW_QUANTUM.
    /// `Output::AddToResidual` adds onto the f32 residual stream; `Output::Bf16`
    /// overwrites a bf16 buffer. In cuBLAS's column-major terms:
    /// out^T = op_T(W) . input^T.
    fn gemm(&self, w: Weight, input: u64, out: u64, rows: usize, output: Output) -> Result<()> {
        let (n, k) = (w.out_features, w.in_features);
        let rows = rows.next_multiple_of(GEMM_ROW_QUANTUM);
        let alpha = 1.0f32;
        let (beta, out_type) = match output {
            Output::AddToResidual => (1.0f32, blas_sys::cudaDataType::CUDA_R_32F),
            Output::Bf16 => (0.0f32, blas_sys::cudaDataType::CUDA_R_16BF),
        };
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w.ptr as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                input as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                out_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .context("cuBLAS GEMM failed")
    }
}

fn rows_config(rows: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl GpuDecoder {
    /// Queues a batched prefill of positions [start, start + len) of the
    /// tokens given to `reset`; the cache must already hold every position
    /// before `start`. Afterwards the cache holds [0, start + len) and the LM
    /// head (`enqueue_lm_head`) gives the token after position start + len - 1,
    /// where `reset`'s start_pos must point.
    pub fn enqueue_prefill(&mut self, start: usize, len: usize) -> Result<()> {
        let prefill = self.prefill.as_ref().map_err(|why| {
            anyhow::anyhow!("batched prefill is unavailable: {why}; use --token-by-token")
        })?;
        anyhow::ensure!(
            len > 0 && start + len <= self.context,
            "prefill of positions {start}..{} does not fit a context of {}",
            start + len,
            self.context
        );
        // Chunks of equal size: a short last chunk would leave most of the
        // GPU idle in attention (4,097 tokens as 4,096 + 1 took 20.6 ms,
        // against 16.0 for 4,096).
        let chunks = len.div_ceil(prefill.capacity);
        let mut done = 0;
        let mut rows = 0;
        for chunk in 0..chunks {
            rows = (len - done).div_ceil(chunks - chunk);
            self.prefill_chunk(prefill, start + done, rows)?;
            done += rows;
        }
        // The last position's residual is what the LM head reads.
        let last = (rows - 1) * HIDDEN;
        let src = prefill.x.slice(last..last + HIDDEN);
        let mut dst = self.activations.slice_mut(..HIDDEN);
        self.stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    }

    /// Runs one chunk of positions (token id 0) through every prefill kernel,
    /// and the GEMMs of one layer at every row count they run on (see
    /// GEMM_ROW_QUANTUM), so that cuBLAS's set-up and the kernels' lazy
    /// loading happen while the model loads, not in a prompt's latency. It
    /// writes cache positions that any sequence overwrites before reading.
    pub(super) fn warm_up_prefill(&self) -> Result<()> {
        if let Ok(prefill) = &self.prefill {
            self.prefill_chunk(prefill, 0, self.context.min(GEMM_ROW_QUANTUM))?;
            let largest = prefill.capacity.next_multiple_of(GEMM_ROW_QUANTUM);
            for rows in (GEMM_ROW_QUANTUM..=largest).step_by(GEMM_ROW_QUANTUM) {
                for gemm in LayerGemm::ALL {
                    prefill.layer_gemm(&self.stream, self.decode_params.layers, gemm, rows)?;
                }
            }
            self.synchronize()?;
        }
        Ok(())
    }

    fn prefill_chunk(&self, prefill: &Prefill, start: usize, rows: usize) -> Result<()> {
        let s = &self.stream;
        let kernels = &self.device.prefill;
        let p = &self.decode_params;
        let x = ptr(&prefill.x, s);
        let rope_table = ptr(&prefill.rope_table, s);
        let normed = ptr(&prefill.normed, s);
        let qkv = ptr(&prefill.qkv, s);
        let q = ptr(&prefill.q, s);
        let attn = ptr(&prefill.attn, s);
        let gate_up = ptr(&prefill.gate_up, s);
        let h = ptr(&prefill.h, s);
        let partial_out = ptr(&prefill.partial_out, s);
        let partial_max_sum = ptr(&prefill.partial_max_sum, s);
        let sms = self.device.sm_count as usize;
        let splits = attention_splits(rows, start, sms);
        anyhow::ensure!(
            splits == 1 || splits * rows <= split_rows(sms),
            "attention splits past their buffers"
        );
        let eps = p.eps;
        let context = self.context as u32;
        let start_pos = start as u32;

        let tokens = p.tokens + 4 * start as u64;
        let mut launch = s.launch_builder(&kernels.embed);
        launch.arg(&tokens).arg(&p.embed).arg(&x);
        unsafe { launch.launch(rows_config(rows, PREFILL_ROW_THREADS)) }?;
        let mut launch = s.launch_builder(&kernels.rope_table);
        launch.arg(&p.inv_freq).arg(&start_pos).arg(&rope_table);
        unsafe { launch.launch(rows_config(rows, 32)) }?;

        let layer_cache = (NUM_KV_HEADS * self.context * HEAD_DIM * 2) as u64;
        for layer in 0..NUM_LAYERS {
            let layer_weights = p.layers + 2 * (layer * lay::STRIDE) as u64;
            let w = |offset: usize| layer_weights + 2 * offset as u64;
            let k_cache = p.k_cache + layer as u64 * layer_cache;
            let v_cache = p.v_cache + layer as u64 * layer_cache;

            self.prefill_rms_norm(x, w(lay::INPUT_NORM), normed, rows)?;
            prefill.layer_gemm(s, layer_weights, LayerGemm::Qkv, rows)?;
            let (q_norm, k_norm) = (w(lay::Q_NORM), w(lay::K_NORM));
            let mut launch = s.launch_builder(&kernels.qk_norm_rope);
            launch
                .arg(&qkv)
                .arg(&start_pos)
                .arg(&q_norm)
                .arg(&k_norm)
                .arg(&rope_table)
                .arg(&eps)
                .arg(&q)
                .arg(&k_cache)
                .arg(&v_cache)
                .arg(&context);
            let heads = NUM_Q_HEADS + 2 * NUM_KV_HEADS;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, (heads / PREFILL_QKV_HEADS_PER_BLOCK) as u32, 1),
                block_dim: (PREFILL_QKV_HEADS_PER_BLOCK as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { launch.launch(cfg) }?;

            let params = PrefillAttentionParams {
                q,
                k_cache,
                v_cache,
                out: attn,
                partial_out,
                partial_max_sum,
                rows: rows as u32,
                start_pos,
                context,
                splits: splits as u32,
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    NUM_KV_HEADS as u32,
                    rows.div_ceil(PREFILL_ATTN_QUERIES) as u32,
                    splits as u32,
                ),
                block_dim: (PREFILL_ATTN_THREADS as u32, 1, 1),
                shared_mem_bytes: PREFILL_ATTN_SMEM_BYTES as u32,
            };
            let mut launch = s.launch_builder(&kernels.attention);
            launch.arg(&params);
            unsafe { launch.launch(cfg) }?;
            if splits > 1 {
                let mut launch = s.launch_builder(&kernels.attention_merge);
                let (rows32, splits32) = (rows as u32, splits as u32);
                launch
                    .arg(&partial_out)
                    .arg(&partial_max_sum)
                    .arg(&attn)
                    .arg(&rows32)
                    .arg(&splits32);
                let slots = (rows * NUM_Q_HEADS) as u32;
                let cfg = LaunchConfig {
                    grid_dim: (slots.div_ceil(PREFILL_MERGE_SLOTS_PER_BLOCK as u32), 1, 1),
                    block_dim: (PREFILL_MERGE_SLOTS_PER_BLOCK as u32 * 32, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { launch.launch(cfg) }?;
            }
            prefill.layer_gemm(s, layer_weights, LayerGemm::O, rows)?;

            self.prefill_rms_norm(x, w(lay::POST_ATTN_NORM), normed, rows)?;
            prefill.layer_gemm(s, layer_weights, LayerGemm::GateUp, rows)?;
            let octets = (rows * INTERMEDIATE / 8) as u32;
            let rows32 = rows as u32;
            let mut launch = s.launch_builder(&kernels.silu_mul);
            launch.arg(&gate_up).arg(&h).arg(&rows32);
            let cfg = LaunchConfig {
                grid_dim: (octets.div_ceil(256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { launch.launch(cfg) }?;
            prefill.layer_gemm(s, layer_weights, LayerGemm::Down, rows)?;
        }
        Ok(())
    }

    fn prefill_rms_norm(&self, x: u64, weight: u64, out: u64, rows: usize) -> Result<()> {
        let eps = self.decode_params.eps;
        let rows32 = rows as u32;
        let mut launch = self.stream.launch_builder(&self.device.prefill.rms_norm);
        launch.arg(&x).arg(&weight).arg(&out).arg(&eps).arg(&rows32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(PREFILL_NORM_ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (PREFILL_NORM_ROWS_PER_BLOCK as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where split `s` of `splits` starts for a block reaching `tiles` tiles
    /// (the kernel's arithmetic).
    fn split_start_key(s: usize, splits: usize, tiles: usize) -> usize {
        s * tiles / splits * PREFILL_ATTN_KEYS
    }

    #[test]
    fn a_short_chunk_after_a_long_cache_splits_its_keys_over_the_gpu() {
        // 14 queries after 16,000 cached positions on 132 SMs: 8 blocks, 16
        // splits of about 16 tiles each.
        assert_eq!(attention_splits(14, 16_000, 132), 16);
        // 170 SMs (RTX 5090), 100 queries: 16 blocks, 10 splits.
        assert_eq!(attention_splits(100, 16_000, 170), 10);
        // A chunk from position 0, or one that already fills the GPU, or a
        // cache too short to be worth it: no split.
        assert_eq!(attention_splits(14, 0, 132), 1);
        assert_eq!(attention_splits(2_049, 2_049, 132), 1);
        assert_eq!(attention_splits(20, 100, 132), 1);
    }

    #[test]
    fn every_split_starts_at_a_key_each_query_attends_to() {
        for sms in [78, 132, 170] {
            for start in (0..20_000).step_by(97) {
                for rows in [1, 3, 14, 64, 65, 200, 500, 1_000] {
                    let splits = attention_splits(rows, start, sms);
                    assert!((1..=MAX_ATTENTION_SPLITS).contains(&splits));
                    let blocks = NUM_KV_HEADS * rows.div_ceil(PREFILL_ATTN_QUERIES);
                    assert!(splits == 1 || splits * blocks <= sms);
                    // The buffers hold splits x rows (Prefill::new).
                    assert!(splits == 1 || splits * rows <= split_rows(sms));
                    for query_block in 0..rows.div_ceil(PREFILL_ATTN_QUERIES) {
                        let last_row = ((query_block + 1) * PREFILL_ATTN_QUERIES).min(rows) - 1;
                        let tiles = (start + last_row) / PREFILL_ATTN_KEYS + 1;
                        for s in 0..splits {
                            // Not empty, and its first key is at or before
                            // the earliest query's position.
                            assert!(
                                split_start_key(s + 1, splits, tiles)
                                    > split_start_key(s, splits, tiles)
                            );
                            assert!(
                                split_start_key(s, splits, tiles) <= start,
                                "{rows} at {start}, split {s} of {splits}"
                            );
                        }
                    }
                }
            }
        }
    }
}
