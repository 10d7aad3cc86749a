// The decode kernel's phase B: q/k norm, RoPE, KV-cache append and
// attention over the cache for the current position, split into chunks over
// blocks (AttentionTask, decode_common.cuh) and merged by the block that
// finishes a head's last chunk.
//
// A chunk's cached keys and values reach the block through its stream ring
// (decode_stream_ring.cuh) in tiles of KV_TILE positions, copied ahead like
// the weights: attention reads no global memory but q, k and v of this step.
// Each consumer warp takes tiles in turn and keeps its own online softmax
// (flash-decoding within the block), its products on the tensor cores
// (WarpAttention); the warps' results are merged at the end.
#pragma once

#include <cuda/atomic>

#include "decode_common.cuh"
#include "decode_stream_ring.cuh"
#include "tensor_core.cuh"

namespace qmk {

struct AttentionShared {
    __align__(16) float q[GQA_GROUP][HEAD_DIM];
    // This step's key and value, when the chunk holds pos: a one-row tile
    // (its halves 128 bytes apart; row 0 is unswizzled).
    __align__(16) bf16 own_key[HEAD_DIM];
    __align__(16) bf16 own_value[HEAD_DIM];
    float max[CONSUMER_WARPS][GQA_GROUP], sum[CONSUMER_WARPS][GQA_GROUP];
    float out[CONSUMER_WARPS][GQA_GROUP * HEAD_DIM];  // each warp's unnormalised output
    int is_last;
};

// One warp's attention over the tiles it takes, for H query heads of a KV
// head (AttentionTask), on the tensor cores: S = Q K^T as mma m16n8k16 with
// the queries as the A rows and 8 keys a column tile, then O^T += V^T P^T
// with 16 head dims a row tile and the probabilities as the B columns, so
// the accumulator is 32 registers, not 64.
//
// The queries and the probabilities are f32; each goes in as a high and a
// low bf16 part in rows and columns the m16n8 shapes leave spare, which keeps
// f32 precision at no extra mma (the CUDA-core loop this replaced was f32):
// A row r < 2H (a0, a2) is the high part of query head r % H and row r + 8
// (a1, a3) its low part, so a score is d0 + d2; B column c < H holds head c's
// probabilities' high parts, column H + c their low parts, so an output is
// column c plus column H + c. A lane of quad g = lane / 4 (g < 2H) thus
// tracks head g % H's running max and its own share of the sum; quads from
// 2H on compute on zero rows, and their columns are never read.
template <int H>
struct WarpAttention {
    unsigned int q[HEAD_DIM / 16][4];      // A fragments of the 8 k-steps of 16 dims
    float out[HEAD_DIM / 16][4] = {};      // O^T: 16 dims x 8 columns a row tile
    float max = -INFINITY, sum = 0.f;      // quad g's head; the sum is this lane's share

    __device__ explicit WarpAttention(const float (&queries)[GQA_GROUP][HEAD_DIM]) {
        const int lane = threadIdx.x % WARP, row = lane / 4, t = lane % 4;
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks)
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // dims 16 ks + 8 half + 2t, + 1
                const float2 v = row < 2 * H
                                     ? *reinterpret_cast<const float2*>(&queries[row % H][16 * ks + 8 * half + 2 * t])
                                     : make_float2(0.f, 0.f);
                const unsigned int high = pack_bf16x2(v.x, v.y);
                q[ks][2 * half] = high;
                q[ks][2 * half + 1] = pack_bf16x2(v.x - bf16_lo(high), v.y - bf16_hi(high));
            }
    }

    // Adds keys 0..n-1 (1 <= n <= KV_TILE) of a tile at shared addresses
    // `keys` and `values`, laid out as swizzled_offset with halves
    // `half_bytes` apart. Every ldmatrix reads rows below n only (later rows
    // read the last key's), so no byte past the tile's keys is used; the
    // whole tile's mma run whatever n, as one chain the compiler can
    // interleave (a tile is mostly full).
    __device__ void add_tile(unsigned int keys, unsigned int values, int n, int half_bytes) {
        const int lane = threadIdx.x % WARP, row = lane / 4, t = lane % 4;
        constexpr float scale = 0.08838834764831845f;  // 1 / sqrt(HEAD_DIM)
        constexpr int N_TILES = KV_TILE / 8, K_STEPS = (KV_TILE + 15) / 16;
        float s[N_TILES][4] = {};
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 32; ++j)
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt) {
                // b0, b1 of k-steps 2j and 2j + 1 for keys 8 nt .. 8 nt + 7.
                unsigned int b[4];
                const int key = min(nt * 8 + lane % 8, n - 1);
                ldmatrix_x4(keys + swizzled_offset(key, 4 * j + lane / 8, half_bytes), b);
                mma_bf16(s[nt], q[2 * j], b[0], b[1]);
                mma_bf16(s[nt], q[2 * j + 1], b[2], b[3]);
            }
        // Online softmax: the tile's max over the quad's keys (a lane holds
        // keys 8 nt + 2t, + 1), then everything before rescaled to it.
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float score = nt * 8 + 2 * t + c < n ? (s[nt][c] + s[nt][c + 2]) * scale : -INFINITY;
                s[nt][c] = score;
                tile_max = fmaxf(tile_max, score);
            }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(max, tile_max);  // finite: the tile has a key
        const float rescale = __expf(max - new_max);
        max = new_max;
        // P^T as B fragments of the 16-key steps: keys 2t, 2t + 1 of each
        // 8-key half, the quad's column (high or low parts).
        const bool low_part = row >= H;
        unsigned int prob[K_STEPS][2] = {};
        float tile_sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt) {
            const float e0 = __expf(s[nt][0] - new_max), e1 = __expf(s[nt][1] - new_max);
            tile_sum += e0 + e1;
            const unsigned int high = pack_bf16x2(e0, e1);
            prob[nt / 2][nt % 2] = low_part ? pack_bf16x2(e0 - bf16_lo(high), e1 - bf16_hi(high)) : high;
        }
        sum = sum * rescale + tile_sum;
        // This lane's output columns 2t and 2t + 1 belong to quads 2t and
        // 2t + 1's heads.
        const float rescale0 = __shfl_sync(0xffffffffu, rescale, 8 * t);
        const float rescale1 = __shfl_sync(0xffffffffu, rescale, 8 * t + 4);
#pragma unroll
        for (int m = 0; m < HEAD_DIM / 16; ++m) {
            out[m][0] *= rescale0;
            out[m][1] *= rescale1;
            out[m][2] *= rescale0;
            out[m][3] *= rescale1;
        }
        // O^T += V^T P^T: V^T's A fragments are the value rows read
        // transposed, dims 16m .. 16m + 15 by keys 16 kk .. 16 kk + 15.
#pragma unroll
        for (int kk = 0; kk < K_STEPS; ++kk)
#pragma unroll
            for (int m = 0; m < HEAD_DIM / 16; ++m) {
                unsigned int a[4];
                const int key = min(kk * 16 + (lane / 16) * 8 + lane % 8, n - 1);
                ldmatrix_x4_trans(values + swizzled_offset(key, 2 * m + (lane / 8) % 2, half_bytes), a);
                mma_bf16(out[m], a, prob[kk][0], prob[kk][1]);
            }
    }

    // The warp's result into the block's shared memory: row `warp` of the
    // max, sum and out arrays.
    __device__ void store(AttentionShared& sm, int warp) {
        const int lane = threadIdx.x % WARP, row = lane / 4, t = lane % 4;
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (t == 0 && row < H) {
            sm.max[warp][row] = max;
            sm.sum[warp][row] = sum;
        }
        // Head h's output is column h plus column H + h: for H = 2, lanes
        // t = 0 and t = 1 hold them; for H = 1, both columns of lane t = 0.
#pragma unroll
        for (int m = 0; m < HEAD_DIM / 16; ++m) {
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = out[m][i];
            if (H == 2) {
#pragma unroll
                for (int i = 0; i < 4; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], 1);
            } else {
                v[0] += v[1];
                v[2] += v[3];
            }
            if (t == 0) {
#pragma unroll
                for (int h = 0; h < H; ++h) {
                    sm.out[warp][h * HEAD_DIM + 16 * m + row] = v[h];
                    sm.out[warp][h * HEAD_DIM + 16 * m + 8 + row] = v[2 + h];
                }
            }
        }
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
    const int own = task.holds(pos) ? 1 : 0;
    for (int t = warp; t < ring.n_kv_tiles + own; t += CONSUMER_WARPS) {  // the own key last
        if (t < ring.n_kv_tiles) {
            const int index = ring.kv_slot_of(layer, t);
            const unsigned char* slot = ring.wait_full(index);
            const int n = min(KV_TILE, cached_end - (task.begin + t * KV_TILE));
            if (n > 0) state.add_tile(smem_address(slot), smem_address(slot + KV_VALUES_OFFSET), n, KV_TILE_HALF_BYTES);
            if (lane == 0) ring.release(index, RING_SLOT_UNITS);
        } else {
            state.add_tile(smem_address(sm.own_key), smem_address(sm.own_value), 1, KV_ROW_BYTES / 2);
        }
    }
    state.store(sm, warp);
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
// all their chunks. Thread 0 counts the block's chunk done (a relaxed add:
// no fence, the partials are tagged) while every merging thread starts
// reading the partials of up to MERGE_CHUNKS chunks, so that the last block
// has most of them when the count's answer comes back; it then polls for
// any not landed yet (H200, against a fenced acq_rel count with the loads
// after it: -2.6 / -3.4 / -2.9 / -1.7% at 300 / 1,024 / 4,096 / 16,384
// keys). A warp merges 32 dims of a head: lane c reads chunk c's max and
// sum, every lane its dim of each chunk's output.
// Every block of the head runs the merge's code, on what its loads found,
// and only the last one polls and stores: run by one block a layer, a
// different one each time, the merge took 1.5-2 us after the count even
// with no loads at all, most likely fetching its instructions into an SM
// that had not run them lately (the kernel's code is 171 KB). The others do
// it while they would wait for the merged output in phase C anyway (H200:
// -0.9% at 1,024 keys, -1.3% at 4,096, 0 at 0-255 where nothing merges;
// RESULTS.md).
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
