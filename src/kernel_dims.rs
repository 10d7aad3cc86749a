// The dimensions the CUDA kernels are compiled for: those of Qwen3-0.6B.
//
// This file is the one place they are written. `build.rs` includes it and
// passes each constant to nvcc as a `-D` macro, and the loader checks a
// checkpoint's config against it before anything reaches the GPU.
// Vocabulary size, tied or untied head, RoPE theta and RMSNorm epsilon are
// run-time values and do not appear here.

pub const HIDDEN: usize = 1024;
pub const NUM_LAYERS: usize = 28;
pub const NUM_Q_HEADS: usize = 16;
pub const NUM_KV_HEADS: usize = 8;
pub const HEAD_DIM: usize = 128;
pub const INTERMEDIATE: usize = 3072;

pub const Q_DIM: usize = NUM_Q_HEADS * HEAD_DIM;
pub const KV_DIM: usize = NUM_KV_HEADS * HEAD_DIM;
/// Rows of the fused Q, K, V projection, in that order.
pub const QKV_ROWS: usize = Q_DIM + 2 * KV_DIM;

/// Where each weight of one layer starts in the packed per-layer buffer the
/// decode kernel reads, in bf16 elements. Matrices are row-major
/// (out_features x in_features), as in the checkpoint, and start on a
/// 256-byte boundary so every 16-byte load is aligned.
pub mod layer_layout {
    use super::*;
    pub const INPUT_NORM: usize = 0;
    pub const POST_ATTN_NORM: usize = INPUT_NORM + HIDDEN;
    pub const Q_NORM: usize = POST_ATTN_NORM + HIDDEN;
    pub const K_NORM: usize = Q_NORM + HEAD_DIM;
    pub const QKV: usize = align(K_NORM + HEAD_DIM);
    pub const O: usize = QKV + QKV_ROWS * HIDDEN;
    pub const GATE: usize = O + HIDDEN * Q_DIM;
    pub const UP: usize = GATE + INTERMEDIATE * HIDDEN;
    pub const DOWN: usize = UP + INTERMEDIATE * HIDDEN;
    /// Elements from one layer's start to the next's.
    pub const STRIDE: usize = align(DOWN + HIDDEN * INTERMEDIATE);

    const fn align(elements: usize) -> usize {
        elements.div_ceil(128) * 128
    }
}

/// Threads per block of the decode megakernel (12 warps: a producer and 11
/// consumers). 384 threads leave each 168 registers, against 128 at 512,
/// where ptxas spilled (65 spill instructions, 20 here); on the H100 it
/// measured -1.0% per token at 0-255 and -4.6% at 16,384, 4,096 unchanged
/// (RESULTS.md, session 8).
pub const DECODE_THREADS: usize = 384;
/// Threads per block of the LM-head kernel.
pub const LM_HEAD_THREADS: usize = 512;
/// The sampler (kernels/sample.cu): threads a block, logits a block takes
/// (four a thread), the most tokens top-k may keep, and blocks at most (so
/// vocabularies up to SAMPLE_SLICE x SAMPLE_MAX_BLOCKS). Its last block
/// merges the blocks' top k's in shared memory: SAMPLE_MAX_BLOCKS lists and
/// the result, of SAMPLE_MAX_TOP_K keys of 8 bytes.
pub const SAMPLE_THREADS: usize = 512;
pub const SAMPLE_SLICE: usize = 4 * SAMPLE_THREADS;
pub const SAMPLE_MAX_TOP_K: usize = 64;
pub const SAMPLE_MAX_BLOCKS: usize = 128;
pub const SAMPLE_SMEM_BYTES: usize = 8 * (SAMPLE_MAX_BLOCKS + 1) * SAMPLE_MAX_TOP_K;
/// Rows of the residual stream one decode block keeps in shared memory, at
/// most: HIDDEN / 128, so the decode kernel needs a GPU of at least 8 SMs.
pub const DECODE_RESIDUAL_MAX_ROWS: usize = 128;

/// The decode kernel's stream ring (kernels/decode_stream_ring.cuh): slots
/// of 12 KB (six 2 KB rows of K = HIDDEN, or the keys and values of 24
/// cached positions), as many as the GPU's shared memory per block holds
/// beside the kernel's static 21 KB, up to 16 (192 KB on Hopper; 6 on an
/// RTX 5090, whose blocks get 99 KB).
pub const RING_SLOT_BYTES: usize = 12 * 1024;
pub const RING_MAX_SLOTS: usize = 16;
/// Cached positions in one attention tile of the ring: a slot's halves hold
/// their keys and their values.
pub const DECODE_KV_TILE: usize = RING_SLOT_BYTES / 2 / (HEAD_DIM * 2);
/// The ring's slot count compiled into the kernel for the architectures
/// whose every GPU gives a block the same shared memory: Hopper (sm_90,
/// 227 KB: 16 slots) and sm_120 (RTX 50 series, 99 KB: 6). A use's slot and
/// lap are then a mask and a shift, or a multiply, instead of divisions by a
/// run-time count on the producer's and every ring wait's path (H200: -4.3%
/// per token at 0-255, RESULTS.md, session 10). The host checks that the GPU
/// fits that many; other architectures use the count the host computes.
pub const RING_SLOTS_SM90: usize = 16;
pub const RING_SLOTS_SM120: usize = 6;
/// Fewest slots the kernel is run with: the ring must hold slots being read
/// while others are copied.
pub const RING_MIN_SLOTS: usize = 3;
/// Slot copies the producer keeps in flight: one. More streams faster but
/// lengthens the L2 round trips of every handoff by more: two cost 3-9% a
/// step on the H200, where with the handoffs made free (a diagnostic) they
/// would gain 8% (RESULTS.md, session 22).
pub const RING_IN_FLIGHT: usize = 1;
/// Copies in flight for an attention chunk that is not its head's whole
/// cache (257 keys and up on 132 SMs), once the block's consumers read its
/// tiles; before that, while they are still in the phases before attention,
/// RING_IN_FLIGHT, because copies in flight on every block slow those
/// phases' handoffs, and once the tiles are read only the merge is awaited.
/// Six was the fastest measured on the H200 (eight the same, twelve slower;
/// RESULTS.md, sessions 23-24).
pub const RING_KV_IN_FLIGHT: usize = 6;
/// Copies in flight while the producer streams a chunk that is its head's
/// whole cache (up to 256 keys, on the 16 blocks of a query head each): only
/// those blocks stream tiles then, and attention waits for them. Four was
/// the fastest measured on the H200 (six the same; RESULTS.md, session 21).
pub const RING_ONE_CHUNK_IN_FLIGHT: usize = 4;
/// Nanoseconds a decode block sleeps before it reads again values another
/// block has not written yet. Since every phase ends in a consumer barrier,
/// none is best (H200: 3% faster than 256 ns; 64 and 128 ns no better;
/// RESULTS.md, sessions 13 and 21).
pub const DECODE_POLL_BACKOFF_NS: usize = 0;
/// Words of an attention chunk's partial result, which the decode kernel
/// stores tagged for the block that merges a head's chunks: the unnormalised
/// output (HEAD_DIM), then the max and the sum of the chunk's scores.
pub const DECODE_PARTIAL_WORDS: usize = HEAD_DIM + 2;

/// Prompt positions one batched-prefill pass holds: longer prompts go in
/// chunks of this many, which bounds prefill's activation memory (about
/// 60 KB per position).
pub const PREFILL_CHUNK: usize = 4096;
/// Threads per row of prefill's embedding gather (8 elements of HIDDEN each).
pub const PREFILL_ROW_THREADS: usize = HIDDEN / 8;
/// Heads of the fused QKV output one block of prefill's q/k norm + RoPE
/// kernel handles (a warp each).
pub const PREFILL_QKV_HEADS_PER_BLOCK: usize = 8;
/// Rows of prefill's RMSNorm kernel per block (a warp each).
pub const PREFILL_NORM_ROWS_PER_BLOCK: usize = 8;
/// Prefill attention: query positions per block (both query heads of a KV
/// head), keys per shared-memory tile, threads per block.
pub const PREFILL_ATTN_QUERIES: usize = 64;
pub const PREFILL_ATTN_KEYS: usize = 64;
pub const PREFILL_ATTN_THREADS: usize = 256;
/// Warps (a (row, query head) each) per block of the kernel that combines
/// prefill attention's key splits.
pub const PREFILL_MERGE_SLOTS_PER_BLOCK: usize = 8;
/// K and V tiles in flight: the one in use and the next two loading.
pub const PREFILL_ATTN_STAGES: usize = 3;
/// Its dynamic shared memory: the K and V tiles of every stage (96 KB, under
/// the RTX 5090's 99 KB per block).
pub const PREFILL_ATTN_SMEM_BYTES: usize =
    PREFILL_ATTN_STAGES * 2 * PREFILL_ATTN_KEYS * HEAD_DIM * 2;

// Checked when this file compiles (the kernels static_assert the same):
// the RTX 5090 (sm_120) gives a block at most 99 KB of shared memory;
// attention has a warp per 16 positions of each of the two query heads of a
// KV head, and tiles of whole 16-key MMA steps.
const _: () = assert!(PREFILL_ATTN_SMEM_BYTES <= 99 * 1024);
const _: () = assert!(NUM_Q_HEADS == 2 * NUM_KV_HEADS);
const _: () = assert!(PREFILL_ATTN_THREADS / 32 == 2 * PREFILL_ATTN_QUERIES / 16);
const _: () = assert!(PREFILL_ATTN_KEYS.is_multiple_of(16));
const _: () = assert!(PREFILL_ROW_THREADS * 8 == HIDDEN);
const _: () = assert!(RING_MIN_SLOTS >= RING_IN_FLIGHT && RING_MAX_SLOTS >= RING_MIN_SLOTS);
const _: () = assert!(RING_SLOTS_SM90 <= RING_MAX_SLOTS && RING_SLOTS_SM90 >= RING_MIN_SLOTS);
const _: () = assert!(RING_SLOTS_SM120 <= RING_MAX_SLOTS && RING_SLOTS_SM120 >= RING_MIN_SLOTS);
const _: () = assert!(RING_SLOT_BYTES.is_multiple_of(2 * HIDDEN));

/// The macros nvcc receives, in `-DNAME=VALUE` form.
pub const KERNEL_DEFINES: &[(&str, usize)] = &[
    ("QMK_HIDDEN", HIDDEN),
    ("QMK_NUM_LAYERS", NUM_LAYERS),
    ("QMK_NUM_Q_HEADS", NUM_Q_HEADS),
    ("QMK_NUM_KV_HEADS", NUM_KV_HEADS),
    ("QMK_HEAD_DIM", HEAD_DIM),
    ("QMK_INTERMEDIATE", INTERMEDIATE),
    ("QMK_DECODE_THREADS", DECODE_THREADS),
    ("QMK_LM_HEAD_THREADS", LM_HEAD_THREADS),
    ("QMK_SAMPLE_THREADS", SAMPLE_THREADS),
    ("QMK_SAMPLE_SLICE", SAMPLE_SLICE),
    ("QMK_SAMPLE_MAX_TOP_K", SAMPLE_MAX_TOP_K),
    ("QMK_SAMPLE_MAX_BLOCKS", SAMPLE_MAX_BLOCKS),
    ("QMK_DECODE_RESIDUAL_MAX_ROWS", DECODE_RESIDUAL_MAX_ROWS),
    ("QMK_RING_SLOT_BYTES", RING_SLOT_BYTES),
    ("QMK_RING_MAX_SLOTS", RING_MAX_SLOTS),
    ("QMK_DECODE_KV_TILE", DECODE_KV_TILE),
    ("QMK_RING_SLOTS_SM90", RING_SLOTS_SM90),
    ("QMK_RING_SLOTS_SM120", RING_SLOTS_SM120),
    ("QMK_DECODE_POLL_BACKOFF_NS", DECODE_POLL_BACKOFF_NS),
    ("QMK_DECODE_PARTIAL_WORDS", DECODE_PARTIAL_WORDS),
    ("QMK_PREFILL_ROW_THREADS", PREFILL_ROW_THREADS),
    (
        "QMK_PREFILL_NORM_ROWS_PER_BLOCK",
        PREFILL_NORM_ROWS_PER_BLOCK,
    ),
    (
        "QMK_PREFILL_QKV_HEADS_PER_BLOCK",
        PREFILL_QKV_HEADS_PER_BLOCK,
    ),
    ("QMK_PREFILL_ATTN_QUERIES", PREFILL_ATTN_QUERIES),
    ("QMK_PREFILL_ATTN_KEYS", PREFILL_ATTN_KEYS),
    ("QMK_PREFILL_ATTN_THREADS", PREFILL_ATTN_THREADS),
    ("QMK_PREFILL_ATTN_STAGES", PREFILL_ATTN_STAGES),
    (
        "QMK_PREFILL_MERGE_SLOTS_PER_BLOCK",
        PREFILL_MERGE_SLOTS_PER_BLOCK,
    ),
    ("QMK_PREFILL_ATTN_SMEM_BYTES", PREFILL_ATTN_SMEM_BYTES),
    ("QMK_OFF_INPUT_NORM", layer_layout::INPUT_NORM),
    ("QMK_OFF_POST_ATTN_NORM", layer_layout::POST_ATTN_NORM),
    ("QMK_OFF_Q_NORM", layer_layout::Q_NORM),
    ("QMK_OFF_K_NORM", layer_layout::K_NORM),
    ("QMK_OFF_QKV", layer_layout::QKV),
    ("QMK_OFF_O", layer_layout::O),
    ("QMK_OFF_GATE", layer_layout::GATE),
    ("QMK_OFF_UP", layer_layout::UP),
    ("QMK_OFF_DOWN", layer_layout::DOWN),
    ("QMK_LAYER_STRIDE", layer_layout::STRIDE),
];

#[cfg(test)]
mod tests {
    use super::layer_layout::*;
    use super::*;

    #[test]
    fn the_probes_defines_are_the_kernels() {
        // benches/kernel_defines.h repeats some of KERNEL_DEFINES for the
        // standalone probes: each must hold the value build.rs passes.
        let header = include_str!("../benches/kernel_defines.h");
        let mut seen = 0;
        for line in header.lines() {
            let Some(rest) = line.strip_prefix("#define ") else {
                continue;
            };
            let (name, value) = rest.split_once(' ').expect("#define NAME VALUE");
            let expected = KERNEL_DEFINES
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{name} is not a kernel define"))
                .1;
            assert_eq!(value.trim().parse::<usize>().ok(), Some(expected), "{name}");
            seen += 1;
        }
        assert!(
            seen >= 7,
            "only {seen} defines found in benches/kernel_defines.h"
        );
    }

    #[test]
    fn packed_layer_regions_are_aligned_and_disjoint() {
        // (start, length) of every region of one packed layer, in order.
        let regions = [
            (INPUT_NORM, HIDDEN),
            (POST_ATTN_NORM, HIDDEN),
            (Q_NORM, HEAD_DIM),
            (K_NORM, HEAD_DIM),
            (QKV, QKV_ROWS * HIDDEN),
            (O, HIDDEN * Q_DIM),
            (GATE, INTERMEDIATE * HIDDEN),
            (UP, INTERMEDIATE * HIDDEN),
            (DOWN, HIDDEN * INTERMEDIATE),
        ];
        for pair in regions.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?} overlap");
        }
        let (last_start, last_len) = regions[regions.len() - 1];
        assert!(last_start + last_len <= STRIDE);
        // Matrices start on 256-byte boundaries (16-byte loads, bulk copies).
        for start in [QKV, O, GATE, UP, DOWN, STRIDE] {
            assert_eq!(start * 2 % 256, 0, "offset {start} is not 256-byte aligned");
        }
    }

    #[test]
    fn every_constant_reaches_nvcc() {
        for name in [
            "QMK_HIDDEN",
            "QMK_OFF_QKV",
            "QMK_LAYER_STRIDE",
            "QMK_RING_SLOT_BYTES",
            "QMK_RING_MAX_SLOTS",
            "QMK_RING_SLOTS_SM90",
            "QMK_RING_SLOTS_SM120",
        ] {
            assert!(
                KERNEL_DEFINES.iter().any(|(n, _)| *n == name),
                "{name} missing"
            );
        }
        let names: std::collections::HashSet<_> = KERNEL_DEFINES.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.len(),
            KERNEL_DEFINES.len(),
            "a define is listed twice"
        );
    }
}
