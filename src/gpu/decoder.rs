//! The GPU decoder: weights, KV cache and activations on the device, and the
//! launches of the device-side token loop. One decode step is two launches, the cooperative
//! megakernel (`decode_step`) and the LM head (`lm_head`); the LM head writes
//! the next token where the next step reads it, so steps are queued without
//! the host waiting on any of them. The host learns each token through a
//! pinned, mapped buffer the LM head writes, polled behind per-step events
//! (generate.rs). Beside it: batched prefill (prefill.rs), the decode
//! kernel's grid (grid.rs) and weight ring (ring.rs), the watchdog every
//! wait goes through (watchdog.rs), and bench's measurements (measure.rs).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};

mod generate;
mod grid;
mod measure;
mod prefill;
mod ring;
mod watchdog;

use grid::{decode_grid, DecodeGrid};
pub use measure::{median, Profile};
use prefill::Prefill;
pub use prefill::PREFILL_MIN_TOKENS;
use watchdog::wait_for;

use super::device::Device;
use super::weights::GpuWeights;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::kernel_dims::{
    DECODE_PARTIAL_WORDS, DECODE_THREADS, HEAD_DIM, HIDDEN, INTERMEDIATE, LM_HEAD_THREADS,
    NUM_KV_HEADS, NUM_LAYERS, NUM_Q_HEADS, PREFILL_ATTN_SMEM_BYTES, PREFILL_CHUNK, QKV_ROWS, Q_DIM,
    RING_SLOT_BYTES, SAMPLE_MAX_BLOCKS, SAMPLE_MAX_TOP_K, SAMPLE_SLICE, SAMPLE_SMEM_BYTES,
    SAMPLE_THREADS,
};
use crate::sampling::Sampling;

/// Mirrors `DecodeState` in kernels/common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct DecodeState {
    pos: u32,
    n_fixed: u32,
    done: u32,
    stop_on_eos: u32,
    eos_ids: [u32; 4],
    n_eos: u32,
}
const STATE_WORDS: usize = std::mem::size_of::<DecodeState>() / 4;

/// Mirrors `DecodeParams` in kernels/decode_common.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeParams {
    layers: u64,
    embed: u64,
    inv_freq: u64,
    k_cache: u64,
    v_cache: u64,
    x: u64,
    x_tagged: u64,
    qkv_tagged: u64,
    attn_tagged: u64,
    mlp_tagged: u64,
    attn_partials: u64,
    attn_counters: u64,
    launches: u64,
    state: u64,
    tokens: u64,
    context: u32,
    max_chunks: u32,
    eps: f32,
    ring_slots: u32,
    ring_in_flight: u32,
    ring_kv_in_flight: u32,
    ring_one_chunk_in_flight: u32,
    phase_times: u64,
}
unsafe impl DeviceRepr for DecodeParams {}

/// Timestamps one block records in a profiled decode step: the start, then
/// for each of the five phases of every layer, when the block has its inputs
/// and when it is done.
pub const PHASE_STAMPS: usize = 1 + 2 * 5 * NUM_LAYERS;
/// Words a profiled step writes after every block's stamps: block 0's
/// producer clock counts (total cycles, cycles waiting for a free slot, for
/// the copy in flight), then its thread 0's (total cycles, cycles waiting for
/// ring rows).
const PROFILE_CLOCKS: usize = 5;

/// Mirrors `LmHeadParams` in kernels/lm_head.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct LmHeadParams {
    x: u64,
    final_norm: u64,
    head: u64,
    logits: u64,
    block_best: u64,
    blocks_done: u64,
    state: u64,
    tokens: u64,
    predicted: u64,
    host_tokens: u64,
    vocab: u32,
    context: u32,
    eps: f32,
    /// 0 when the sampler picks the token.
    advance: u32,
}
unsafe impl DeviceRepr for LmHeadParams {}

/// Mirrors `SampleParams` in kernels/sample.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleParams {
    logits: u64,
    candidates: u64,
    blocks_done: u64,
    state: u64,
    tokens: u64,
    predicted: u64,
    host_tokens: u64,
    seed: u64,
    vocab: u32,
    context: u32,
    top_k: u32,
    temperature: f32,
    top_p: f32,
}
unsafe impl DeviceRepr for SampleParams {}

/// attention merge counters (one per layer and query head) | decode launch
/// arrivals (u64, 8-byte aligned: the merge counters are an even number) |
/// LM-head blocks done | sampler blocks done.
const MERGE_COUNTERS: usize = NUM_LAYERS * NUM_Q_HEADS;
const COUNTER_WORDS: usize = MERGE_COUNTERS + 2 + 2;
const _: () = assert!(MERGE_COUNTERS.is_multiple_of(2));

/// The decode kernel's handed-on vectors, 64-bit tagged values:
/// x | qkv | attn | mlp. The attention chunks' partial results follow them
/// in the same buffer (`tagged`).
const TAGGED_WORDS: usize = HIDDEN + QKV_ROWS + Q_DIM + INTERMEDIATE;

/// Steps per captured CUDA graph: replaying one is one launch for
/// 2 x GRAPH_STEPS kernels (about 3 us a step less on the H200, `bench`'s
/// "graph ms").
pub const GRAPH_STEPS: usize = 16;

pub struct GpuDecoder {
    pub device: Device,
    pub stream: Arc<CudaStream>,
    pub vocab: usize,
    pub context: usize,
    pub decode_blocks: u32,
    pub lm_head_blocks: u32,
    k_cache: CudaSlice<u16>,
    v_cache: CudaSlice<u16>,
    /// Held only to keep the device memory the parameter structs point at.
    _buffers: (GpuWeights, CudaSlice<u64>),
    /// The residual stream the LM head reads (HIDDEN).
    activations: CudaSlice<f32>,
    /// The vectors decode phases hand on and the attention partials, tagged
    /// (zeroed with the counters).
    tagged: CudaSlice<u64>,
    /// Batched prefill, or why it cannot run on this machine.
    prefill: std::result::Result<Prefill, String>,
    /// Attention merge counters, decode launch arrivals, LM-head blocks done.
    counters: CudaSlice<u32>,
    state: CudaSlice<u32>,
    tokens: CudaSlice<u32>,
    predicted: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    host_tokens: PinnedHostSlice<u32>,
    decode_params: DecodeParams,
    lm_params: LmHeadParams,
    /// The sampler's parameters, when `generate --sample` asked for it
    /// (set_sampling); else the LM head's argmax picks each token.
    sample_params: Option<SampleParams>,
    sample_candidates: CudaSlice<u64>,
}

/// Refuses a context whose KV cache would not fit beside the weights and the
/// prefill buffers in the GPU's free memory (with 64 MB to spare).
fn check_free_memory(device: &Device, config: &ModelConfig, context: usize) -> Result<()> {
    let (free, _) = device.ctx.mem_get_info()?;
    let kv_bytes = KV_BYTES_PER_POSITION * context;
    let weight_bytes = 2
        * (NUM_LAYERS * crate::kernel_dims::layer_layout::STRIDE
            + (1 + usize::from(!config.tie_word_embeddings)) * config.vocab_size * HIDDEN);
    let prefill_bytes = prefill::buffer_bytes(context.min(PREFILL_CHUNK));
    if weight_bytes + kv_bytes + prefill_bytes + (64 << 20) > free {
        bail!(
            "{} has {:.1} GB free, but the weights and a KV cache of {context} positions need {:.1} GB; use a shorter context",
            device.name,
            free as f64 / 1e9,
            (weight_bytes + kv_bytes + prefill_bytes) as f64 / 1e9
        );
    }
    Ok(())
}

/// Blocks of the LM head: as many as are resident at once, up to 4 an SM.
fn lm_head_blocks(device: &Device, vocab: usize) -> Result<u32> {
    let per_sm = device
        .lm_head
        .occupancy_max_active_blocks_per_multiprocessor(LM_HEAD_THREADS as u32, 0, None)?
        .clamp(1, 4);
    let blocks = device.sm_count * per_sm;
    // The kernels split rows over blocks in 32-bit arithmetic
    // (split_range, kernels/common.cuh).
    if vocab as u64 * blocks as u64 >= 1 << 32 {
        bail!(
            "a vocabulary of {vocab} rows over {blocks} LM-head blocks is beyond what the kernels index; this checkpoint is not one qwen-mk runs"
        );
    }
    Ok(blocks)
}

fn ptr<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    slice.device_ptr(stream).0
}

/// Bytes of KV cache per cached position.
pub const KV_BYTES_PER_POSITION: usize = 2 * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * 2;

impl GpuDecoder {
    /// Loads the checkpoint onto GPU `ordinal` with a KV cache of `context`
    /// positions.
    pub fn new(checkpoint: &Checkpoint, context: usize, ordinal: usize) -> Result<Self> {
        let config = &checkpoint.config;
        config.check_kernel_dims()?;
        if context == 0 || context > config.max_position_embeddings {
            bail!(
                "a context of {context} positions is outside what the model supports (1 to {})",
                config.max_position_embeddings
            );
        }
        let device = Device::open(ordinal)?;
        let ctx = device.ctx.clone();
        // A stream of our own: the legacy default stream cannot be captured
        // into a CUDA graph.
        let stream = ctx.new_stream()?;

        check_free_memory(&device, config, context)?;
        let DecodeGrid {
            blocks: decode_blocks,
            ring_slots,
            in_flight,
        } = decode_grid(&device)?;
        let lm_head_blocks = lm_head_blocks(&device, config.vocab_size)?;
        // As many attention chunks per KV head as the kernel makes at most
        // (AttentionTask in kernels/decode_common.cuh).
        let max_chunks = (decode_blocks as usize / NUM_KV_HEADS).max(1);

        let weights = GpuWeights::upload(checkpoint, &stream)?;
        let kv_elems = NUM_LAYERS * NUM_KV_HEADS * context * HEAD_DIM;
        let k_cache = stream
            .alloc_zeros::<u16>(kv_elems)
            .context("cannot allocate the KV cache")?;
        let v_cache = stream
            .alloc_zeros::<u16>(kv_elems)
            .context("cannot allocate the KV cache")?;
        let activations = stream.alloc_zeros::<f32>(HIDDEN)?;
        let tagged = stream
            .alloc_zeros::<u64>(TAGGED_WORDS + NUM_Q_HEADS * max_chunks * DECODE_PARTIAL_WORDS)?;
        let counters = stream.alloc_zeros::<u32>(COUNTER_WORDS)?;
        let state = stream.alloc_zeros::<u32>(STATE_WORDS)?;
        let tokens = stream.alloc_zeros::<u32>(context + 1)?;
        let predicted = stream.alloc_zeros::<u32>(context)?;
        let block_best = stream.alloc_zeros::<u64>(lm_head_blocks as usize)?;
        let logits = stream.alloc_zeros::<f32>(config.vocab_size)?;
        let host_tokens =
            unsafe { ctx.alloc_pinned_with_flags::<u32>(context, sys::CU_MEMHOSTALLOC_DEVICEMAP) }?;
        let mut host_tokens_device: sys::CUdeviceptr = 0;
        unsafe {
            sys::cuMemHostGetDevicePointer_v2(
                &mut host_tokens_device,
                host_tokens.as_ptr()? as *mut _,
                0,
            )
            .result()
            .context("cannot map the host token buffer into the GPU")?;
        }

        let act = ptr(&activations, &stream);
        let tag = ptr(&tagged, &stream);
        let count = ptr(&counters, &stream);
        let eps = config.rms_norm_eps as f32;
        let decode_params = DecodeParams {
            layers: ptr(&weights.layers, &stream),
            embed: ptr(&weights.embed, &stream),
            inv_freq: ptr(&weights.inv_freq, &stream),
            k_cache: ptr(&k_cache, &stream),
            v_cache: ptr(&v_cache, &stream),
            x: act,
            x_tagged: tag,
            qkv_tagged: tag + 8 * HIDDEN as u64,
            attn_tagged: tag + 8 * (HIDDEN + QKV_ROWS) as u64,
            mlp_tagged: tag + 8 * (HIDDEN + QKV_ROWS + Q_DIM) as u64,
            attn_partials: tag + 8 * TAGGED_WORDS as u64,
            attn_counters: count,
            launches: count + 4 * MERGE_COUNTERS as u64,
            state: ptr(&state, &stream),
            tokens: ptr(&tokens, &stream),
            context: context as u32,
            max_chunks: max_chunks as u32,
            eps,
            ring_slots: ring_slots as u32,
            ring_in_flight: in_flight.weights as u32,
            ring_kv_in_flight: in_flight.chunk_read as u32,
            ring_one_chunk_in_flight: in_flight.one_chunk as u32,
            phase_times: 0,
        };
        let lm_params = LmHeadParams {
            x: act,
            final_norm: ptr(&weights.final_norm, &stream),
            head: ptr(weights.head(), &stream),
            logits: 0,
            block_best: ptr(&block_best, &stream),
            blocks_done: count + 4 * (MERGE_COUNTERS + 2) as u64,
            state: ptr(&state, &stream),
            tokens: ptr(&tokens, &stream),
            predicted: ptr(&predicted, &stream),
            host_tokens: host_tokens_device,
            vocab: config.vocab_size as u32,
            context: context as u32,
            eps,
            advance: 1,
        };
        let sample_candidates = stream.alloc_zeros::<u64>(SAMPLE_MAX_BLOCKS * SAMPLE_MAX_TOP_K)?;
        device.sample.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            SAMPLE_SMEM_BYTES as i32,
        )?;
        device.prefill.attention.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            PREFILL_ATTN_SMEM_BYTES as i32,
        )?;
        let prefill = match prefill::unavailable_reason() {
            Some(why) => Err(why),
            None => Ok(Prefill::new(&stream, context, device.sm_count as usize)?),
        };
        stream.synchronize()?;
        let decoder = Self {
            device,
            stream,
            vocab: config.vocab_size,
            context,
            decode_blocks,
            lm_head_blocks,
            k_cache,
            v_cache,
            _buffers: (weights, block_best),
            activations,
            tagged,
            prefill,
            counters,
            state,
            tokens,
            predicted,
            logits,
            host_tokens,
            decode_params,
            lm_params,
            sample_params: None,
            sample_candidates,
        };
        decoder.warm_up_prefill()?;
        Ok(decoder)
    }

    /// Starts a new sequence: `tokens[..n_fixed]` are given (the prompt, or
    /// a whole teacher-forced sequence); decoding starts at `start_pos`.
    pub fn reset(
        &mut self,
        tokens: &[u32],
        n_fixed: usize,
        start_pos: usize,
        eos: Option<&[u32]>,
    ) -> Result<()> {
        if tokens.len() > self.context + 1 || n_fixed > tokens.len() {
            bail!(
                "{} tokens do not fit a context of {}",
                tokens.len(),
                self.context
            );
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            bail!("token id {bad} is outside the vocabulary of {}", self.vocab);
        }
        let mut state = DecodeState {
            pos: start_pos as u32,
            n_fixed: n_fixed as u32,
            stop_on_eos: u32::from(eos.is_some()),
            ..Default::default()
        };
        for (slot, id) in state.eos_ids.iter_mut().zip(eos.unwrap_or(&[])) {
            *slot = *id;
            state.n_eos += 1;
        }
        let words: [u32; STATE_WORDS] = unsafe { std::mem::transmute(state) };
        self.stream.memcpy_htod(&words, &mut self.state)?;
        // Every kernel leaves the counters consistent; zeroing them here means
        // a sequence never depends on what ran before it.
        self.stream.memset_zeros(&mut self.counters)?;
        // Tags restart with the launch count: no value of an earlier sequence
        // may carry one.
        self.stream.memset_zeros(&mut self.tagged)?;
        if !tokens.is_empty() {
            self.stream
                .memcpy_htod(tokens, &mut self.tokens.slice_mut(..tokens.len()))?;
        }
        self.synchronize()
    }

    /// Queues one decode step (megakernel + LM head). With `want_logits` the
    /// LM head also writes the logits, read back by `logits()`.
    pub fn enqueue_step(&self, want_logits: bool) -> Result<()> {
        self.enqueue_decode()?;
        self.enqueue_lm_head(want_logits)
    }

    pub fn enqueue_decode(&self) -> Result<()> {
        self.launch_decode(&self.decode_params)
    }

    fn launch_decode(&self, params: &DecodeParams) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (self.decode_blocks, 1, 1),
            block_dim: (DECODE_THREADS as u32, 1, 1),
            shared_mem_bytes: params.ring_slots * RING_SLOT_BYTES as u32,
        };
        let mut launch = self.stream.launch_builder(&self.device.decode_step);
        launch.arg(params);
        unsafe { launch.launch_cooperative(cfg) }.context("decode kernel launch failed")?;
        Ok(())
    }

    /// Whether each step's token is sampled (`Some`) or the argmax. The LM
    /// head then writes the logits and the sampler (kernels/sample.cu) picks
    /// the token and advances the token loop.
    pub fn set_sampling(&mut self, sampling: Option<Sampling>) -> Result<()> {
        if let Some(s) = sampling.filter(|s| s.top_k > self.vocab) {
            bail!(
                "--top-k {} is more than the vocabulary's {} tokens",
                s.top_k,
                self.vocab
            );
        }
        if sampling.is_some() && self.sample_blocks() > SAMPLE_MAX_BLOCKS {
            bail!(
                "sampling on the GPU handles vocabularies of up to {} tokens, this one has {}; use greedy decoding or --device cpu",
                SAMPLE_SLICE * SAMPLE_MAX_BLOCKS,
                self.vocab
            );
        }
        self.sample_params = sampling.map(|s| SampleParams {
            logits: ptr(&self.logits, &self.stream),
            candidates: ptr(&self.sample_candidates, &self.stream),
            blocks_done: self.lm_params.blocks_done + 4, // the counter word after the LM head's
            state: self.lm_params.state,
            tokens: self.lm_params.tokens,
            predicted: self.lm_params.predicted,
            host_tokens: self.lm_params.host_tokens,
            seed: s.seed,
            vocab: self.vocab as u32,
            context: self.context as u32,
            top_k: s.top_k as u32,
            temperature: s.temperature,
            top_p: s.top_p,
        });
        Ok(())
    }

    /// The sampler's grid: a block per SAMPLE_SLICE logits.
    fn sample_blocks(&self) -> usize {
        self.vocab.div_ceil(SAMPLE_SLICE)
    }

    /// The LM head, and the sampler after it when sampling.
    pub fn enqueue_lm_head(&self, want_logits: bool) -> Result<()> {
        let mut params = self.lm_params;
        if want_logits || self.sample_params.is_some() {
            params.logits = ptr(&self.logits, &self.stream);
        }
        params.advance = u32::from(self.sample_params.is_none());
        let cfg = LaunchConfig {
            grid_dim: (self.lm_head_blocks, 1, 1),
            block_dim: (LM_HEAD_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.device.lm_head);
        launch.arg(&params);
        unsafe { launch.launch(cfg) }.context("LM-head kernel launch failed")?;
        if let Some(sample) = &self.sample_params {
            let cfg = LaunchConfig {
                grid_dim: (self.sample_blocks() as u32, 1, 1),
                block_dim: (SAMPLE_THREADS as u32, 1, 1),
                shared_mem_bytes: SAMPLE_SMEM_BYTES as u32,
            };
            let mut launch = self.stream.launch_builder(&self.device.sample);
            launch.arg(sample);
            unsafe { launch.launch(cfg) }.context("sampler kernel launch failed")?;
        }
        Ok(())
    }

    /// `steps` decode steps (without logits) captured as one CUDA graph, so
    /// that replaying them costs one launch instead of 2 x `steps`. None when
    /// the driver cannot capture the cooperative launch.
    pub fn capture_steps(&self, steps: usize) -> Result<Option<CudaGraph>> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let enqueued = (0..steps).try_for_each(|_| self.enqueue_step(false));
        let graph = self.stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        match (enqueued, graph) {
            (Ok(()), Ok(graph)) => Ok(graph),
            _ => Ok(None),
        }
    }

    /// The logits the last `enqueue_step(true)` wrote (waits for it).
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.synchronize()?;
        Ok(self.stream.clone_dtoh(&self.logits)?)
    }

    /// The argmax the LM head recorded at each of `positions` (waits).
    pub fn predicted(&self, positions: std::ops::Range<usize>) -> Result<Vec<u32>> {
        self.synchronize()?;
        Ok(self.stream.clone_dtoh(&self.predicted.slice(positions))?)
    }

    /// Waits for everything queued, under the watchdog.
    pub fn synchronize(&self) -> Result<()> {
        let event = self
            .device
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        event.record(&self.stream)?;
        wait_for(&event, "the queued work")
    }

    /// Waits for one recorded event, under the watchdog.
    pub fn wait(&self, event: &CudaEvent) -> Result<()> {
        wait_for(event, "a decode step")
    }

    pub fn new_timing_event(&self) -> Result<CudaEvent> {
        Ok(self
            .device
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Whether batched prefill can run, or why not.
    pub fn prefill_unavailable(&self) -> Option<&str> {
        self.prefill.as_ref().err().map(String::as_str)
    }
}
