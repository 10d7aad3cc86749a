// What the decode kernel's files share (decode_megakernel.cu,
// decode_attention.cuh): the block's shape, the consumer warps' barrier, the
// kernel's parameters, the tagged vectors phases hand on, and profiling.
#pragma once

#include "common.cuh"

namespace qmk {

constexpr int THREADS = QMK_DECODE_THREADS;
constexpr int WARPS = THREADS / WARP;
constexpr int CONSUMER_WARPS = WARPS - 1;
constexpr int CONSUMERS = CONSUMER_WARPS * WARP;
constexpr int PRODUCER_WARP = WARPS - 1;

// The consumer warps' barrier (named barrier 1; 0 is __syncthreads').
struct ConsumerSync {
    __device__ __forceinline__ void operator()() const {
        asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory");
    }
};
__device__ __forceinline__ void consumer_sync() { ConsumerSync{}(); }

struct DecodeParams {
    const bf16* layers;          // NUM_LAYERS x QMK_LAYER_STRIDE, packed (src/gpu/weights.rs)
    const bf16* embed;           // vocab x HIDDEN
    const float* inv_freq;       // HEAD_DIM / 2 RoPE frequencies
    bf16* k_cache;               // NUM_LAYERS x NUM_KV_HEADS x context x HEAD_DIM
    bf16* v_cache;               // same layout
    float* x;                    // residual stream after the last layer, HIDDEN (the LM head's input)
    unsigned long long* x_tagged;     // residual stream, HIDDEN tagged values (TaggedVector)
    unsigned long long* qkv_tagged;   // QKV_ROWS
    unsigned long long* attn_tagged;  // Q_DIM
    unsigned long long* mlp_tagged;   // INTERMEDIATE
    unsigned long long* attn_partials;  // NUM_Q_HEADS x max_chunks x PARTIAL_WORDS, tagged
    unsigned int* attn_counters; // NUM_LAYERS x NUM_Q_HEADS, zero between launches
    unsigned long long* launches;  // block arrivals of every launch since the sequence began
    const DecodeState* state;
    const unsigned int* tokens;  // context + 1 token ids
    unsigned int context;        // positions the KV cache holds
    unsigned int max_chunks;     // attention chunks the partials buffer holds per head
    float eps;                   // RMSNorm epsilon
    unsigned int ring_slots;     // weight-ring slots in the dynamic shared memory (<= RING_MAX_SLOTS)
    unsigned int ring_in_flight; // weight copies the producer keeps outstanding (<= ring_slots)
    unsigned int ring_kv_in_flight;  // the same for a chunk's tiles once the consumers read them
    unsigned int ring_one_chunk_in_flight;  // the same while it copies a chunk that is its head's whole cache
    unsigned long long* phase_times;  // null, or every block's PHASE_STAMPS timestamps + block 0's 3 producer and 2 consumer clock counts (bench --profile)
};

__device__ __forceinline__ const bf16* layer_weights(const DecodeParams& p, int layer, int offset) {
    return p.layers + (size_t)layer * QMK_LAYER_STRIDE + offset;
}

// ---- how attention is split ------------------------------------------------------

// Attention splits the positions 0..pos of every KV head into chunks of at
// least ATTN_MIN_CHUNK keys, about one chunk per block: block b takes task
// b, a (KV head or query head, chunk; see AttentionTask). There are at most
// blocks / NUM_KV_HEADS chunks per head, so no block has two tasks (the host
// runs at least NUM_KV_HEADS blocks), and the host sizes the partials buffer
// for that many. Up to
// ATTN_ONE_CHUNK keys a head is one chunk: two would be merged after an
// atomic count (merge_if_last, decode_attention.cuh), which costs more than
// the second half of a short chunk (H100: positions 0-255 -3.4%; a minimum
// of 256 at every length made 1,024 3.5% slower; H200: a minimum of 64 made
// 512-1,024 1.2-5.6% slower).
constexpr int ATTN_MIN_CHUNK = 128;  // shorter chunks cost more in merging than they save
constexpr int ATTN_ONE_CHUNK = 256;
// A chunk's partial result: its unnormalised output, then the max and the
// sum of its scores (src/kernel_dims.rs, which sizes the buffer).
constexpr int PARTIAL_WORDS = QMK_DECODE_PARTIAL_WORDS;
static_assert(PARTIAL_WORDS == HEAD_DIM + 2, "");

// A task covers both query heads of its KV head, except while the query
// heads' tasks fit the grid with chunks of at most ATTN_ONE_CHUNK keys (up
// to 2,048 keys on a 132-SM GPU): then each query head is a task of its own,
// on twice the blocks. Attention's instructions go with the query heads (two
// FMAs per key and dim for two), and a block's tiles are issue-bound (H100:
// 0.21 us a tile of 24 keys): with one query head and at most about one tile
// of 24 keys a consumer warp, a block's chain is half as long as with both,
// and a head has half the chunks to merge, though the blocks of a pair stream
// the same keys and values (the second mostly from L2). Past that length its
// warps take two tiles each and the bytes win (H200: the query split up to
// 1,024 keys -> 2,048 made 1,025-2,048 4.1-6.4% faster; up to 4,096, 2,049-
// 2,304 1.5% faster but 2,561-2,816 1.1% and 3,585-3,840 5.7% slower).
struct AttentionTask {
    int kv_head, chunk, n_chunks;
    int q_head, q_heads;  // the query heads [q_head, q_head + q_heads): 1 or GQA_GROUP
    int begin, end;       // keys [begin, end); none when begin == end (no task)

    // Block `block`'s task in a step at position `pos`.
    __device__ static AttentionTask of_block(int pos, int block, int blocks) {
        const int n_keys = pos + 1;
        const int q_chunks = blocks / NUM_Q_HEADS;  // chunks a query head may have, split
        const bool split = q_chunks >= 1 && n_keys <= q_chunks * ATTN_ONE_CHUNK;
        const int wanted = split ? q_chunks : max(1, blocks / NUM_KV_HEADS);
        const int chunk_len =
            n_keys <= ATTN_ONE_CHUNK ? n_keys : max((n_keys + wanted - 1) / wanted, ATTN_MIN_CHUNK);
        AttentionTask t;
        t.n_chunks = (n_keys + chunk_len - 1) / chunk_len;
        t.q_heads = split ? 1 : GQA_GROUP;
        const int per_kv_head = t.n_chunks * (GQA_GROUP / t.q_heads);  // tasks
        t.kv_head = block / per_kv_head;
        t.q_head = t.kv_head * GQA_GROUP + block % per_kv_head / t.n_chunks * t.q_heads;
        t.chunk = block % t.n_chunks;
        const bool has_task = block < NUM_KV_HEADS * per_kv_head;
        t.begin = has_task ? t.chunk * chunk_len : 0;
        t.end = has_task ? min(n_keys, t.begin + chunk_len) : 0;
        return t;
    }
    __device__ bool exists() const { return begin < end; }
    // Whether the chunk holds this step's own position, whose key and value
    // the block computes (and appends to the cache) instead of reading them.
    __device__ bool holds(int pos) const { return begin <= pos && pos < end; }
    // The chunk's keys already in the cache, written by earlier steps.
    __device__ int cached_end(int pos) const { return min(end, pos); }
};

// Where the cache of one KV head of one layer starts (the same offset in
// k_cache and v_cache).
__device__ __forceinline__ size_t kv_cache_head(const DecodeParams& p, int layer, int kv_head) {
    return ((size_t)layer * NUM_KV_HEADS + kv_head) * p.context * HEAD_DIM;
}

// ---- the vectors phases hand on ----------------------------------------------------

// A phase's output for other blocks is a TaggedVector (common.cuh): each
// value carries the tag of its write, unique to (launch, layer, handoff)
// within a sequence. Readers spin on the values themselves: no grid
// barrier, no flag to read before the data. A block can only write a
// handoff once every block has read the previous one it overwrites, because
// each phase needs the whole output of the phase before it, which every
// block has a part in. The host zeroes the vectors (tag 0 is never written)
// with the counters at the start of a sequence.
enum Handoff { QKV_OUT = 0, ATTN_OUT = 1, X_AFTER_ATTN = 2, MLP_OUT = 3, X_AFTER_MLP = 4, HANDOFFS = 5 };

// The handoffs of one launch: tags launch * 5 * NUM_LAYERS + 1 onwards.
struct Handoffs {
    const DecodeParams* p;
    const unsigned int* first_tag;  // in shared memory, set in layer 0 before the first handoff

    __device__ TaggedVector at(int layer, Handoff h) const {
        unsigned long long* words = h == QKV_OUT ? p->qkv_tagged
                                    : h == ATTN_OUT ? p->attn_tagged
                                    : h == MLP_OUT  ? p->mlp_tagged
                                                    : p->x_tagged;
        return {words, *first_tag + (unsigned int)(layer * HANDOFFS + h)};
    }
};

// ---- profiling ---------------------------------------------------------------------

// `qwen-mk bench --profile`: every block's thread 0 stamps the global timer
// at the start, then twice per phase: when its inputs have arrived, and when
// all its warps are done. Block b's stamps are words [b, b + 1) x PHASE_STAMPS of
// phase_times; block 0's clock counts follow the last block's stamps.
constexpr int PHASE_STAMPS = 1 + 2 * 5 * NUM_LAYERS;
enum Stamp { INPUTS_READY = 0, PHASE_DONE = 1 };

// Every consumer thread calls it; PHASE_DONE right after the consumer
// barrier that ends every phase, so that a phase is done when its last warp
// is.
__device__ __forceinline__ void stamp_phase(const DecodeParams& p, int layer, int phase, Stamp what) {
    if (p.phase_times == nullptr) return;
    if (threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        p.phase_times[blockIdx.x * PHASE_STAMPS + (layer < 0 ? 0 : 1 + (layer * 5 + phase) * 2 + what)] = now;
    }
}

// Where block 0's clock counts go (after every block's stamps).
__device__ __forceinline__ unsigned long long* profile_clocks(const DecodeParams& p) {
    return p.phase_times + (size_t)gridDim.x * PHASE_STAMPS;
}

}  // namespace qmk
