// The decode kernel's phase B: q/k norm, RoPE, KV-cache append and
// attention over the cache for the current position, split into chunks over
// blocks and merged by the block that finishes a head's last chunk.
#pragma once

#include <cuda/atomic>

#include "decode_common.cuh"

namespace qmk {

constexpr int ATTN_MAX_CHUNK = QMK_ATTN_MAX_CHUNK;
// Shorter chunks would cost more in merging than they save in parallelism.
constexpr int ATTN_MIN_CHUNK = 128;

struct AttentionShared {
    float q[GQA_GROUP][HEAD_DIM];
    float scores[GQA_GROUP][ATTN_MAX_CHUNK];
    float pv[CONSUMER_WARPS][GQA_GROUP * HEAD_DIM];
    float max[GQA_GROUP], sum[GQA_GROUP];  // softmax statistics of the chunk
    int is_last;
};

// Scores, softmax and P.V for positions [begin, end) of one KV head and its
// two query heads; leaves the unnormalised output, its max and sum in the
// partials buffer for the merge.
__device__ void attention_chunk(const DecodeParams& p, const TaggedVector& qkv, const TaggedVector& attn, int layer,
                                int pos, int kv_head, int chunk, int begin, int end, bool single_chunk,
                                AttentionShared& sm) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const size_t head_base = ((size_t)layer * NUM_KV_HEADS + kv_head) * p.context * HEAD_DIM;
    const bf16* k_cache = p.k_cache + head_base;
    const bf16* v_cache = p.v_cache + head_base;

    // Normalise and rotate the query heads; the chunk holding `pos` also
    // appends this step's K and V to the cache.
    const bool appends = begin <= pos && pos < end;
    if (warp < GQA_GROUP + 2) {
        const bool is_q = warp < GQA_GROUP, is_k = warp == GQA_GROUP;
        const int row0 = is_q ? (kv_head * GQA_GROUP + warp) * HEAD_DIM
                              : Q_DIM + (is_k ? 0 : KV_DIM) + kv_head * HEAD_DIM;
        HeadNormRope norm_rope;
        if (is_q || is_k)
            norm_rope.prepare(layer_weights(p, layer, is_q ? QMK_OFF_Q_NORM : QMK_OFF_K_NORM), p.inv_freq,
                              (float)pos);
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
        } else if (appends) {
            bf16* dst = (is_k ? p.k_cache : p.v_cache) + head_base + (size_t)pos * HEAD_DIM;
#pragma unroll
            for (int i = 0; i < 4; ++i) dst[lane + 32 * i] = __float2bfloat16(v[i]);
        }
    }
    consumer_sync();  // also orders this block's cache append before the reads below
    stamp_phase(p, layer, 1, INPUTS_READY);

    // Scores: eight lanes per key, 16 dims a lane.
    const float scale = rsqrtf((float)HEAD_DIM);
    {
        const int group = lane / 8, sub = lane % 8;
        float qa[16], qb[16];
#pragma unroll
        for (int d = 0; d < 16; ++d) {
            qa[d] = sm.q[0][sub * 16 + d];
            qb[d] = sm.q[1][sub * 16 + d];
        }
        // The loop bound is the same for the whole warp: the shuffles below
        // need every lane, so a group past the end computes on a clamped key
        // and discards it.
#pragma unroll 2
        for (int base = begin + warp * 4; base < end; base += CONSUMER_WARPS * 4) {
            const int t = base + group;
            const bf16* key = k_cache + (size_t)min(t, end - 1) * HEAD_DIM + sub * 16;
            float k[16];
            unpack8(load_coherent16(key), k);
            unpack8(load_coherent16(key + 8), k + 8);
            float sa = 0.f, sb = 0.f;
#pragma unroll
            for (int d = 0; d < 16; ++d) {
                sa = fmaf(qa[d], k[d], sa);
                sb = fmaf(qb[d], k[d], sb);
            }
#pragma unroll
            for (int offset = 4; offset > 0; offset /= 2) {
                sa += __shfl_xor_sync(0xffffffffu, sa, offset);
                sb += __shfl_xor_sync(0xffffffffu, sb, offset);
            }
            if (sub == 0 && t < end) {
                sm.scores[0][t - begin] = sa * scale;
                sm.scores[1][t - begin] = sb * scale;
            }
        }
    }
    consumer_sync();

    // Softmax numerators over the chunk: one warp per query head.
    const int len = end - begin;
    if (warp < GQA_GROUP) {
        float* scores = sm.scores[warp];
        float m = -INFINITY;
        for (int i = lane; i < len; i += WARP) m = fmaxf(m, scores[i]);
        m = warp_max(m);
        float l = 0.f;
        for (int i = lane; i < len; i += WARP) {
            const float e = __expf(scores[i] - m);
            scores[i] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            sm.max[warp] = m;
            sm.sum[warp] = l;
        }
    }
    consumer_sync();

    // P.V: half a warp per key, 8 dims a lane.
    {
        const int half = lane / 16, dl = lane % 16;
        float acc[GQA_GROUP][8] = {};
#pragma unroll 4
        for (int t = begin + warp * 2 + half; t < end; t += CONSUMER_WARPS * 2) {
            float v[8];
            unpack8(load_coherent16(v_cache + (size_t)t * HEAD_DIM + dl * 8), v);
            const float pa = sm.scores[0][t - begin], pb = sm.scores[1][t - begin];
#pragma unroll
            for (int d = 0; d < 8; ++d) {
                acc[0][d] = fmaf(pa, v[d], acc[0][d]);
                acc[1][d] = fmaf(pb, v[d], acc[1][d]);
            }
        }
#pragma unroll
        for (int h = 0; h < GQA_GROUP; ++h)
#pragma unroll
            for (int d = 0; d < 8; ++d) acc[h][d] += __shfl_xor_sync(0xffffffffu, acc[h][d], 16);
        if (half == 0) {
#pragma unroll
            for (int h = 0; h < GQA_GROUP; ++h)
#pragma unroll
                for (int d = 0; d < 8; ++d) sm.pv[warp][h * HEAD_DIM + dl * 8 + d] = acc[h][d];
        }
    }
    consumer_sync();

    // A single chunk is the whole answer; otherwise leave the unnormalised
    // output with its max and sum for the merge.
    if (threadIdx.x < GQA_GROUP * HEAD_DIM) {
        float out = 0.f;
#pragma unroll
        for (int w = 0; w < CONSUMER_WARPS; ++w) out += sm.pv[w][threadIdx.x];
        const int h = threadIdx.x / HEAD_DIM, d = threadIdx.x % HEAD_DIM;
        const int q_head = kv_head * GQA_GROUP + h;
        if (single_chunk) {
            attn.store(q_head * HEAD_DIM + d, out / sm.sum[h]);
        } else {
            float* partial = p.attn_partials + ((size_t)q_head * p.max_chunks + chunk) * (HEAD_DIM + 2);
            partial[d] = out;
            if (d == 0) {
                partial[HEAD_DIM] = sm.max[h];
                partial[HEAD_DIM + 1] = sm.sum[h];
            }
        }
    }
}

// The block that finishes a KV head's last chunk merges all its chunks. The
// acq_rel count publishes this block's partials (ordered by the consumer
// barrier before it) and, for the last block, acquires everyone's.
__device__ void merge_if_last(const DecodeParams& p, const TaggedVector& attn, int layer, int kv_head, int n_chunks,
                              AttentionShared& sm) {
    unsigned int* counter = p.attn_counters + layer * NUM_KV_HEADS + kv_head;
    consumer_sync();
    if (threadIdx.x == 0) {
        cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*counter);
        sm.is_last = done.fetch_add(1, cuda::memory_order_acq_rel) == (unsigned int)n_chunks - 1;
    }
    consumer_sync();
    if (!sm.is_last) return;
    if (threadIdx.x < GQA_GROUP * HEAD_DIM) {
        const int h = threadIdx.x / HEAD_DIM, d = threadIdx.x % HEAD_DIM;
        const int q_head = kv_head * GQA_GROUP + h;
        const float* partials = p.attn_partials + (size_t)q_head * p.max_chunks * (HEAD_DIM + 2);
        float m = -INFINITY;
        for (int c = 0; c < n_chunks; ++c) m = fmaxf(m, load_coherent(partials + c * (HEAD_DIM + 2) + HEAD_DIM));
        float sum = 0.f, out = 0.f;
        for (int c = 0; c < n_chunks; ++c) {
            const float* part = partials + c * (HEAD_DIM + 2);
            const float w = __expf(load_coherent(part + HEAD_DIM) - m);
            sum = fmaf(load_coherent(part + HEAD_DIM + 1), w, sum);
            out = fmaf(load_coherent(part + d), w, out);
        }
        attn.store(q_head * HEAD_DIM + d, out / sum);
    }
    if (threadIdx.x == 0) *counter = 0;  // ready for the next launch (the launch boundary orders it)
}

__device__ void attention_phase(const DecodeParams& p, const TaggedVector& qkv, const TaggedVector& attn, int layer,
                                int pos, AttentionShared& sm) {
    // Split the cache over about one block per (KV head, chunk); a chunk is
    // never longer than the shared-memory score buffer.
    const int n_keys = pos + 1;
    const int wanted = max(1, (int)gridDim.x / NUM_KV_HEADS);
    const int chunk_len = min(max((n_keys + wanted - 1) / wanted, ATTN_MIN_CHUNK), ATTN_MAX_CHUNK);
    const int n_chunks = (n_keys + chunk_len - 1) / chunk_len;
    for (int task = blockIdx.x; task < NUM_KV_HEADS * n_chunks; task += gridDim.x) {
        const int kv_head = task / n_chunks, chunk = task % n_chunks;
        const int begin = chunk * chunk_len, end = min(n_keys, begin + chunk_len);
        attention_chunk(p, qkv, attn, layer, pos, kv_head, chunk, begin, end, n_chunks == 1, sm);
        if (n_chunks > 1) merge_if_last(p, attn, layer, kv_head, n_chunks, sm);
        consumer_sync();  // shared memory is reused by the next task
    }
}

}  // namespace qmk
