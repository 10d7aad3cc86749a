// The decode kernel's phase B: q/k norm, RoPE, KV-cache append and
// attention over the cache for the current position, split into chunks over
// blocks (AttentionTask, decode_common.cuh) and merged by the block that
// finishes a head's last chunk.
//
// A chunk's cached keys and values reach the block through its stream ring
// (decode_stream_ring.cuh) in tiles of KV_TILE positions, copied ahead like
// the weights: attention reads no global memory but q, k and v of this step.
// Each consumer warp takes tiles (on a short chunk, half tiles) in turn and
// keeps its own online softmax (flash-decoding within the block); the
// warps' results are merged at the end.
#pragma once

#include <cuda/atomic>

#include "decode_common.cuh"
#include "decode_stream_ring.cuh"

namespace qmk {

struct AttentionShared {
    __align__(16) float q[GQA_GROUP][HEAD_DIM];
    bf16 own_key[HEAD_DIM], own_value[HEAD_DIM];     // this step's, when the chunk holds pos
    float probs[CONSUMER_WARPS][GQA_GROUP][KV_TILE];  // a warp's softmax numerators of its tile
    float max[CONSUMER_WARPS][GQA_GROUP], sum[CONSUMER_WARPS][GQA_GROUP];
    float out[CONSUMER_WARPS][GQA_GROUP * HEAD_DIM];  // each warp's unnormalised output
    int is_last;
};

// One warp's attention over the tiles it takes, for H query heads of a KV
// head (AttentionTask): the running max and sum of the scores, and the
// unnormalised output (dims 4 lane .. 4 lane + 3 on each lane).
template <int H>
struct WarpAttention {
    const float (&q)[GQA_GROUP][HEAD_DIM];  // in shared memory, the first H rows
    float max[H], sum[H];
    float out[H][4] = {};

    __device__ explicit WarpAttention(const float (&queries)[GQA_GROUP][HEAD_DIM]) : q(queries) {
#pragma unroll
        for (int h = 0; h < H; ++h) {
            max[h] = -INFINITY;
            sum[h] = 0.f;
        }
    }

    // Adds keys 0..n-1 of a tile: `keys` and `values` are n rows of
    // KV_ROW_BYTES in shared memory (n <= KV_TILE); `probs` is the warp's
    // scratch.
    __device__ void add_tile(const unsigned char* keys, const unsigned char* values, int n,
                             float (&probs)[GQA_GROUP][KV_TILE]) {
        const int lane = threadIdx.x % WARP, group = lane / 8, sub = lane % 8;
        constexpr float scale = 0.08838834764831845f;  // 1 / sqrt(HEAD_DIM)
        static_assert(HEAD_DIM == 128, "");
        // This lane's 16 dims of each query, in registers for the whole
        // tile: read from shared memory for every key, they were four fifths
        // of the tile's shared-memory traffic, and a block with many tiles
        // was bound by it.
        float qd[H][2][8];
#pragma unroll
        for (int h = 0; h < H; ++h)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float4 lo = *reinterpret_cast<const float4*>(&q[h][half * 64 + sub * 8]);
                const float4 hi = *reinterpret_cast<const float4*>(&q[h][half * 64 + sub * 8 + 4]);
                const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                for (int d = 0; d < 8; ++d) qd[h][half][d] = v[d];
            }
        // Scores, four keys at a time: eight lanes per key, each with 16 of
        // its dims as two 16-byte loads that cover the row's halves, so a
        // quarter warp reads 128 contiguous bytes (no bank conflict).
#pragma unroll
        for (int pass = 0; pass < KV_TILE / 4; ++pass) {
            if (pass * 4 >= n) break;  // the same for the whole warp
            const int key = pass * 4 + group;
            const unsigned char* row = keys + min(key, n - 1) * KV_ROW_BYTES;
            float s[H] = {};
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float k[8];
                unpack8(*reinterpret_cast<const uint4*>(row + half * HEAD_DIM + sub * 16), k);
#pragma unroll
                for (int h = 0; h < H; ++h)
#pragma unroll
                    for (int d = 0; d < 8; ++d) s[h] = fmaf(qd[h][half][d], k[d], s[h]);
            }
#pragma unroll
            for (int offset = 4; offset > 0; offset /= 2)
#pragma unroll
                for (int h = 0; h < H; ++h) s[h] += __shfl_xor_sync(0xffffffffu, s[h], offset);
            if (sub == 0 && key < n)
#pragma unroll
                for (int h = 0; h < H; ++h) probs[h][key] = s[h] * scale;
        }
        __syncwarp();
        // Online softmax, a lane per key: rescale what came before to the
        // tile's new max.
#pragma unroll
        for (int h = 0; h < H; ++h) {
            const float score = lane < n ? probs[h][lane] : -INFINITY;
            const float new_max = fmaxf(max[h], warp_max(score));  // finite: the tile has a key
            const float rescale = __expf(max[h] - new_max);
            const float e = __expf(score - new_max);
            if (lane < n) probs[h][lane] = e;
            max[h] = new_max;
            sum[h] = sum[h] * rescale + warp_sum(e);
#pragma unroll
            for (int d = 0; d < 4; ++d) out[h][d] *= rescale;
        }
        __syncwarp();
        // P.V: every lane its 4 dims of every key (8 bytes; a warp reads a
        // whole 256-byte row).
#pragma unroll 4
        for (int key = 0; key < n; ++key) {
            const uint2 packed = *reinterpret_cast<const uint2*>(values + key * KV_ROW_BYTES + lane * 8);
            const float v[4] = {bf16_lo(packed.x), bf16_hi(packed.x), bf16_lo(packed.y), bf16_hi(packed.y)};
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const float prob = probs[h][key];
#pragma unroll
                for (int d = 0; d < 4; ++d) out[h][d] = fmaf(prob, v[d], out[h][d]);
            }
        }
        __syncwarp();  // probs is rewritten by the next tile
    }
};

// q/k norm and RoPE of the task's query heads; a block whose chunk holds
// `pos` also computes this step's key and value and keeps them in shared
// memory, its last tile, and the first such block of a KV head appends them
// to the cache.
__device__ void prepare_queries(const DecodeParams& p, const TaggedVector& qkv, const AttentionTask& task, int layer,
                                int pos, AttentionShared& sm) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const bool holds = task.holds(pos);
    if (warp >= task.q_heads + (holds ? 2 : 0)) return;
    const bool is_q = warp < task.q_heads, is_k = warp == task.q_heads;
    const int row0 = is_q ? (task.q_head + warp) * HEAD_DIM : Q_DIM + (is_k ? 0 : KV_DIM) + task.kv_head * HEAD_DIM;
    HeadNormRope norm_rope;
    if (is_q || is_k)
        norm_rope.prepare(layer_weights(p, layer, is_q ? QMK_OFF_Q_NORM : QMK_OFF_K_NORM), p.inv_freq, (float)pos);
    unsigned long long words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = qkv.load(row0 + lane + 32 * i);
    await_all(qkv, words, [&](int i) { return row0 + lane + 32 * i; });
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = qkv.value(words[i]);
    if (is_q || is_k) norm_rope.apply(v, p.eps);
    if (is_q) {
#pragma unroll
        for (int i = 0; i < 4; ++i) sm.q[warp][lane + 32 * i] = v[i];
        return;
    }
    bf16* cache = (is_k ? p.k_cache : p.v_cache) + kv_cache_head(p, layer, task.kv_head) + (size_t)pos * HEAD_DIM;
    bf16* own = is_k ? sm.own_key : sm.own_value;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bf16 b = __float2bfloat16(v[i]);
        if (task.q_head % GQA_GROUP == 0) cache[lane + 32 * i] = b;
        own[lane + 32 * i] = b;
    }
}

// Attention of the block's task (H = task.q_heads query heads) over its
// chunk: the output itself when the chunk is the whole cache, else the
// unnormalised output with its max and sum in the partials buffer, for the
// merge.
template <int H>
__device__ void attention_chunk(const DecodeParams& p, const StreamRing& ring, const TaggedVector& qkv,
                                const TaggedVector& attn, const AttentionTask& task, int layer, int pos,
                                AttentionShared& sm) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    prepare_queries(p, qkv, task, layer, pos, sm);
    consumer_sync();
    if (threadIdx.x == 0) ring.reading_tiles(layer);
    stamp_phase(p, layer, 1, INPUTS_READY);

    WarpAttention<H> state(sm.q);
    const int cached_end = task.cached_end(pos);
    // A warp's tile is a chain of dependent latencies (ncu: about 1.3 us
    // for 24 keys, issuing a quarter of the time). While the chunk's tiles
    // are few enough for two warps each and the own key (short context),
    // each tile goes to two warps, half its keys each (H200: -0.5 to -0.8%
    // a step at 0-255; RESULTS.md, session 26).
    static_assert(RING_SLOT_UNITS % 2 == 0 && KV_TILE % 2 == 0, "a tile splits in halves");
    const int own = task.holds(pos) ? 1 : 0;
    const int split = 2 * ring.n_kv_tiles + own <= CONSUMER_WARPS ? 1 : 0;  // log2 of the parts a tile
    const int parts = ring.n_kv_tiles << split;
    for (int t = warp; t < parts + own; t += CONSUMER_WARPS) {  // the own key last
        if (t < parts) {
            const int tile = t >> split, first = (t & split) * (KV_TILE / 2);
            const int index = ring.kv_slot_of(layer, tile);
            const unsigned char* slot = ring.wait_full(index) + first * KV_ROW_BYTES;
            const int n = min(KV_TILE >> split, cached_end - (task.begin + tile * KV_TILE + first));
            if (n > 0) state.add_tile(slot, slot + KV_VALUES_OFFSET, n, sm.probs[warp]);
            if (lane == 0) ring.release(index, RING_SLOT_UNITS >> split);
        } else {
            state.add_tile(reinterpret_cast<const unsigned char*>(sm.own_key),
                           reinterpret_cast<const unsigned char*>(sm.own_value), 1, sm.probs[warp]);
        }
    }
#pragma unroll
    for (int h = 0; h < H; ++h) {
        if (lane == 0) {
            sm.max[warp][h] = state.max[h];
            sm.sum[warp][h] = state.sum[h];
        }
#pragma unroll
        for (int d = 0; d < 4; ++d) sm.out[warp][h * HEAD_DIM + lane * 4 + d] = state.out[h][d];
    }
    consumer_sync();

    // Merge the warps' results (a warp without tiles has max -inf, sum and
    // output 0, and weight 0).
    static_assert(CONSUMERS >= GQA_GROUP * HEAD_DIM, "a consumer thread per output of the merge");
    if (threadIdx.x < H * HEAD_DIM) {
        const int h = threadIdx.x / HEAD_DIM, d = threadIdx.x % HEAD_DIM;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < CONSUMER_WARPS; ++w) m = fmaxf(m, sm.max[w][h]);
        float sum = 0.f, out = 0.f;
#pragma unroll
        for (int w = 0; w < CONSUMER_WARPS; ++w) {
            const float weight = __expf(sm.max[w][h] - m);
            sum = fmaf(sm.sum[w][h], weight, sum);
            out = fmaf(sm.out[w][threadIdx.x], weight, out);
        }
        const int q_head = task.q_head + h;
        if (task.n_chunks == 1) {
            attn.store(q_head * HEAD_DIM + d, out / sum);
        } else {
            // Tagged like the handoffs: the merging block may read them
            // before they have all landed (merge_if_last).
            const TaggedVector partials{p.attn_partials, attn.tag};
            const int partial = (q_head * (int)p.max_chunks + task.chunk) * PARTIAL_WORDS;
            partials.store(partial + d, out);
            if (d == 0) {
                partials.store(partial + HEAD_DIM, m);
                partials.store(partial + HEAD_DIM + 1, sum);
            }
        }
    }
}

// The block that finishes the last chunk of the task's query heads merges
// all their chunks. Thread 0 counts the block's chunk done with a relaxed
// add (no fence: the partials are tagged) while every merging thread
// already loads the partials of up to MERGE_CHUNKS chunks, so the last block
// has most of them when the count's answer comes back and polls only for
// any not landed yet (H200: -1.7 to -3.4% at 300-16,384 keys against a
// fenced count with the loads after it). A warp merges 32 dims of a head:
// lane c reads chunk c's max and sum, every lane its dim of each chunk's
// output. Every block of the head runs the merge on what its loads found,
// and only the last one polls and stores: run by the last block alone, a
// different one each layer, the merge took 1.5-2 us, most likely fetching
// its instructions into an SM that had not run them lately; the others run
// it while they would wait in phase C anyway (RESULTS.md).
constexpr int MERGE_CHUNKS = 16;
__device__ void merge_if_last(const DecodeParams& p, const TaggedVector& attn, int layer, const AttentionTask& task,
                              AttentionShared& sm) {
    const int n_chunks = task.n_chunks, lane = threadIdx.x % WARP;
    unsigned int* counter = p.attn_counters + layer * NUM_Q_HEADS + task.q_head;
    const TaggedVector partials{p.attn_partials, attn.tag};
    const bool merging = threadIdx.x < task.q_heads * HEAD_DIM;
    const int q_head = task.q_head + threadIdx.x / HEAD_DIM, d = threadIdx.x % HEAD_DIM;
    consumer_sync();  // the block's partials are stored
    if (threadIdx.x == 0) {
        cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*counter);
        sm.is_last = done.fetch_add(1, cuda::memory_order_relaxed) == (unsigned int)n_chunks - 1;
    }
    // Words of chunks first .. first + MERGE_CHUNKS - 1: stats, chunk
    // `lane`'s max and sum; outs, this thread's dim of each.
    auto stat_word = [&](int first, int k) {
        return lane < min(MERGE_CHUNKS, n_chunks - first)
                   ? (q_head * (int)p.max_chunks + first + lane) * PARTIAL_WORDS + HEAD_DIM + k
                   : -1;
    };
    auto out_word = [&](int first, int k) {
        return k < n_chunks - first ? (q_head * (int)p.max_chunks + first + k) * PARTIAL_WORDS + d : -1;
    };
    unsigned long long stats[2] = {}, outs[MERGE_CHUNKS] = {};
    if (merging) {
#pragma unroll
        for (int k = 0; k < 2; ++k)
            if (stat_word(0, k) >= 0) stats[k] = partials.load(stat_word(0, k));
#pragma unroll
        for (int k = 0; k < MERGE_CHUNKS; ++k)
            if (out_word(0, k) >= 0) outs[k] = partials.load(out_word(0, k));
    }
    consumer_sync();
    const bool is_last = sm.is_last;
    if (merging) {
        float run_max = -INFINITY, run_sum = 0.f, run_out = 0.f;
        for (int first = 0; first < n_chunks; first += MERGE_CHUNKS) {
            if (first > 0 && !is_last) break;
            // Only the last block waits; the others merge what they read.
            await_all(partials, stats, [&](int k) { return is_last ? stat_word(first, k) : -1; });
            await_all(partials, outs, [&](int k) { return is_last ? out_word(first, k) : -1; });
            const int group = min(MERGE_CHUNKS, n_chunks - first);
            const float max = lane < group ? partials.value(stats[0]) : -INFINITY;
            const float sum = lane < group ? partials.value(stats[1]) : 0.f;
            const float new_max = fmaxf(run_max, warp_max(max));
            const float rescale = __expf(run_max - new_max);  // 0 for the first group
            const float weight = __expf(max - new_max);
            run_sum *= rescale;
            run_out *= rescale;
#pragma unroll
            for (int c = 0; c < MERGE_CHUNKS; ++c) {
                if (c >= group) break;
                const float w = __shfl_sync(0xffffffffu, weight, c);
                run_sum = fmaf(__shfl_sync(0xffffffffu, sum, c), w, run_sum);
                run_out = fmaf(partials.value(outs[c]), w, run_out);
            }
            run_max = new_max;
            if (first + MERGE_CHUNKS < n_chunks) {  // the next group's words: tags of 0 are never ready
#pragma unroll
                for (int k = 0; k < 2; ++k) stats[k] = 0;
#pragma unroll
                for (int k = 0; k < MERGE_CHUNKS; ++k) outs[k] = 0;
            }
        }
        if (is_last) attn.store(q_head * HEAD_DIM + d, run_out / run_sum);
    }
    if (is_last && threadIdx.x == 0) *counter = 0;  // ready for the next launch (the launch boundary orders it)
}

// `block_task` is the block's task, in shared memory: read in every layer,
// not kept in registers through the others, nor computed again (its
// divisions cost 1-3% of a step, H200).
__device__ void attention_phase(const DecodeParams& p, const StreamRing& ring, const TaggedVector& qkv,
                                const TaggedVector& attn, const AttentionTask& block_task, int layer, int pos,
                                AttentionShared& sm) {
    const AttentionTask task = block_task;
    if (!task.exists()) return;
    if (task.q_heads == 1)
        attention_chunk<1>(p, ring, qkv, attn, task, layer, pos, sm);
    else
        attention_chunk<GQA_GROUP>(p, ring, qkv, attn, task, layer, pos, sm);
    if (task.n_chunks > 1) merge_if_last(p, attn, layer, task, sm);
    consumer_sync();  // shared memory is reused by the next phase
}

}  // namespace qmk
