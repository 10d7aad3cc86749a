// One decode step of Qwen3-0.6B, all 28 layers, in one persistent cooperative
// kernel. The grid is one block per SM (sized on the host from the device);
// phases are separated by a grid barrier:
//
//   per layer:  A  RMSNorm + fused QKV projection          -> qkv (f32)
//               B  q/k RMSNorm, RoPE, KV-cache append, attention over the
//                  cache split into chunks, merged by the last chunk's block
//                                                           -> attn (f32)
//               C  O projection + residual                 -> x (f32)
//               D  RMSNorm + gate/up projections, SiLU     -> mlp (f32)
//               E  down projection + residual              -> x (f32)
//
// The final RMSNorm and the vocabulary projection are the LM-head kernel's
// (lm_head.cu). The residual stream and all activations stay in f32; weights
// and the KV cache are bf16.
//
// A block is one producer warp and CONSUMER_WARPS consumer warps. The
// producer streams the block's weight rows of every phase into a ring of
// shared-memory slots (decode_weight_ring.cuh), running ahead through
// attention and the barriers; the consumers run the phases above and read
// their rows from the ring. Consumers synchronise among themselves with a
// named barrier, never with __syncthreads, which would wait for the producer.
#include <cuda/atomic>

#include "common.cuh"
#include "decode_weight_ring.cuh"

namespace qmk {

constexpr int THREADS = QMK_DECODE_THREADS;
constexpr int WARPS = THREADS / WARP;
constexpr int CONSUMER_WARPS = WARPS - 1;
constexpr int CONSUMERS = CONSUMER_WARPS * WARP;
constexpr int PRODUCER_WARP = WARPS - 1;
constexpr int ATTN_MAX_CHUNK = QMK_ATTN_MAX_CHUNK;
// Rows of the residual stream a block owns, at most (the host checks the
// grid: HIDDEN / blocks, rounded up, must not exceed it).
constexpr int RESIDUAL_MAX_ROWS = QMK_DECODE_RESIDUAL_MAX_ROWS;
// Shorter chunks would cost more in merging than they save in parallelism.
constexpr int ATTN_MIN_CHUNK = 128;

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
    float* x;                    // residual stream, HIDDEN
    float* qkv;                  // QKV_ROWS
    float* attn;                 // Q_DIM
    float* mlp;                  // INTERMEDIATE
    float* attn_partials;        // NUM_Q_HEADS x max_chunks x (HEAD_DIM + 2)
    unsigned int* attn_counters; // NUM_KV_HEADS, zero between phases
    unsigned long long* barrier; // grid barrier arrivals (see GridBarrier)
    const DecodeState* state;
    const unsigned int* tokens;  // context + 1 token ids
    unsigned int context;        // positions the KV cache holds
    unsigned int max_chunks;     // attention chunks the partials buffer holds per head
    float eps;                   // RMSNorm epsilon
    unsigned int ring_slots;     // weight-ring slots in the dynamic shared memory (<= RING_MAX_SLOTS)
    unsigned int ring_in_flight; // copies the producer keeps outstanding (<= ring_slots)
    unsigned long long* phase_times;  // null, or 1 + 5 * NUM_LAYERS timestamps (bench --profile)
};

struct AttentionShared {
    float q[GQA_GROUP][HEAD_DIM];
    float scores[GQA_GROUP][ATTN_MAX_CHUNK];
    float pv[CONSUMER_WARPS][GQA_GROUP * HEAD_DIM];
    float max[GQA_GROUP], sum[GQA_GROUP];  // softmax statistics of the chunk
    int is_last;
};

union SharedStorage {
    float vec[INTERMEDIATE];  // the input vector of a projection phase
    AttentionShared attn;
};

__device__ __forceinline__ const bf16* layer_weights(const DecodeParams& p, int layer, int offset) {
    return p.layers + (size_t)layer * QMK_LAYER_STRIDE + offset;
}

// The grid barrier: a 64-bit count of block arrivals that only grows. Each
// arrival is a fire-and-forget release add; waiting is an acquire spin until
// the count reaches this barrier's target, so the last block to arrive costs
// one memory operation, not a read-modify-write plus a flag (measured 5%
// faster per step than a sense-reversing barrier, RESULTS.md).
//
// Every launch that starts runs exactly BARRIERS_PER_LAUNCH barriers (or
// none, when the loop is done), so between launches the count is a multiple
// of BARRIERS_PER_LAUNCH * gridDim.x. A block reads it before its first
// arrival, when at most gridDim.x - 1 arrivals of this launch can be in it,
// and rounds down to find the launch's base: no reset at kernel start, and
// nothing that a previous launch leaves can shift a target. The host zeroes
// the count whenever it starts a sequence. Only the consumer warps take part.
struct GridBarrier {
    static constexpr unsigned long long BARRIERS_PER_LAUNCH = 5 * NUM_LAYERS - 1;
    unsigned long long* count;
    unsigned long long target;  // meaningful in thread 0 only

    __device__ explicit GridBarrier(unsigned long long* count_) : count(count_), target(0) {
        if (threadIdx.x == 0) {
            const unsigned long long now = load_acquire(count);
            target = now - now % (BARRIERS_PER_LAUNCH * gridDim.x);
        }
    }

    __device__ void sync() {
        // The release add publishes this block's writes (ordered before it by
        // the consumer barrier); the acquire spin makes every block's visible
        // to thread 0, and the second consumer barrier passes that on.
        consumer_sync();
        if (threadIdx.x == 0) {
            asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
            target += gridDim.x;
            while (load_acquire(count) < target) {
            }
        }
        consumer_sync();
    }

    static __device__ unsigned long long load_acquire(const unsigned long long* p) {
        unsigned long long v;
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
        return v;
    }
};

// Dot product of a bf16 row of K (in shared memory) with `vec` (K floats in
// shared memory), summed over the warp: every lane gets it.
template <int K>
__device__ __forceinline__ float row_dot(const unsigned char* row, const float* vec) {
    const int lane = threadIdx.x % WARP;
    const bf16* w = reinterpret_cast<const bf16*>(row);
    float acc = 0.f;
#pragma unroll
    for (int s = 0; s < K / (8 * WARP); ++s) {
        const int at = (s * WARP + lane) * 8;
        acc = dot8(*reinterpret_cast<const uint4*>(w + at), vec + at, acc);
    }
    return warp_sum(acc);
}

// A projection phase: the block's units of projection P, read from the
// ring, dotted with `vec`; consumer warps take units in turn. `store(unit,
// y)` runs on lane 0 with the unit's one (or, gate/up, two) results.
template <int P, typename Store>
__device__ __forceinline__ void project(const WeightRing& ring, int layer, const float* vec, Store store) {
    using S = Streamed<P>;
    using L = SlotLayout<P>;
    int begin, end;
    WeightRing::block_units<P>(begin, end);
    const int warp = threadIdx.x / WARP;
    for (int u = warp; u < end - begin; u += CONSUMER_WARPS) {
        const int index = ring.slot_of<P>(layer, u);
        const unsigned char* row = ring.wait_full(index) + (u % L::PER_SLOT) * L::ROW_BYTES;
        float y[L::PAIRED ? 2 : 1];
        y[0] = row_dot<S::K>(row, vec);
        if constexpr (L::PAIRED) y[1] = row_dot<S::K>(row + L::PAIRED_OFFSET, vec);
        __syncwarp();  // every lane has read the rows
        if (threadIdx.x % WARP == 0) {
            ring.release(index, L::UNIT_UNITS);
            store(begin + u, y);
        }
    }
}

// Copy N floats written in this launch into shared memory: all loads first,
// so they take one round trip.
template <int N>
__device__ __forceinline__ void load_vec_to_shared(const float* src, float* dst) {
    constexpr int PER_THREAD = (N / 4 + CONSUMERS - 1) / CONSUMERS;
    float4 v[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = (threadIdx.x + k * CONSUMERS) * 4;
        if (i < N) v[k] = __ldcg(reinterpret_cast<const float4*>(src + i));
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = (threadIdx.x + k * CONSUMERS) * 4;
        if (i < N) *reinterpret_cast<float4*>(dst + i) = v[k];
    }
    consumer_sync();
}

// ---- phase B: attention --------------------------------------------------------

// Scores, softmax and P.V for positions [begin, end) of one KV head and its
// two query heads; leaves the unnormalised output, its max and sum in the
// partials buffer for the merge.
__device__ void attention_chunk(const DecodeParams& p, int layer, int pos, int kv_head, int chunk, int begin,
                                int end, bool single_chunk, AttentionShared& sm) {
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
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = load_coherent(p.qkv + row0 + lane + 32 * i);
        if (is_q || is_k) {
            const bf16* norm = layer_weights(p, layer, is_q ? QMK_OFF_Q_NORM : QMK_OFF_K_NORM);
            norm_rope_head(v, norm, p.inv_freq, (float)pos, p.eps);
        }
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
            p.attn[q_head * HEAD_DIM + d] = out / sm.sum[h];
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

// The block that finishes a KV head's last chunk merges all its chunks.
// As in GridBarrier, the acq_rel count publishes this block's partials (ordered
// by the consumer barrier before it) and, for the last block, acquires everyone's.
__device__ void merge_if_last(const DecodeParams& p, int kv_head, int n_chunks, AttentionShared& sm) {
    consumer_sync();
    if (threadIdx.x == 0) {
        cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(p.attn_counters[kv_head]);
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
        p.attn[q_head * HEAD_DIM + d] = out / sum;
    }
    if (threadIdx.x == 0) p.attn_counters[kv_head] = 0;  // ready for the next layer
}

__device__ void attention_phase(const DecodeParams& p, int layer, int pos, AttentionShared& sm) {
    // Split the cache over about one block per (KV head, chunk); a chunk is
    // never longer than the shared-memory score buffer.
    const int n_keys = pos + 1;
    const int wanted = max(1, (int)gridDim.x / NUM_KV_HEADS);
    const int chunk_len = min(max((n_keys + wanted - 1) / wanted, ATTN_MIN_CHUNK), ATTN_MAX_CHUNK);
    const int n_chunks = (n_keys + chunk_len - 1) / chunk_len;
    for (int task = blockIdx.x; task < NUM_KV_HEADS * n_chunks; task += gridDim.x) {
        const int kv_head = task / n_chunks, chunk = task % n_chunks;
        const int begin = chunk * chunk_len, end = min(n_keys, begin + chunk_len);
        attention_chunk(p, layer, pos, kv_head, chunk, begin, end, n_chunks == 1, sm);
        if (n_chunks > 1) merge_if_last(p, kv_head, n_chunks, sm);
        consumer_sync();  // shared memory is reused by the next task
    }
}

// ---- the kernel ------------------------------------------------------------------

// Profiling (`qwen-mk bench --profile`): block 0 stamps the global timer at
// each phase boundary, just after the barrier, when every block is done.
__device__ __forceinline__ void stamp_phase(const DecodeParams& p, int index) {
    if (p.phase_times != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        p.phase_times[index] = now;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) decode_step(const DecodeParams p) {
    __shared__ __align__(16) SharedStorage sm;
    __shared__ float scratch[CONSUMER_WARPS];
    __shared__ unsigned long long ring_barriers[2 * RING_MAX_SLOTS];
    __shared__ float residual[RESIDUAL_MAX_ROWS];  // this block's rows of x (see below)
    extern __shared__ __align__(128) unsigned char ring_storage[];

    const DecodeState* state = p.state;
    if (state->done) return;  // every block reads the same flag: nobody writes it during this launch

    WeightRing ring(ring_storage, ring_barriers, (int)p.ring_slots);
    if (threadIdx.x / WARP == PRODUCER_WARP) {
        if (threadIdx.x % WARP == 0) ring.produce(p.layers, (int)p.ring_in_flight);
        return;
    }

    const int pos = (int)state->pos;
    const bf16* embedding = p.embed + (size_t)p.tokens[pos] * HIDDEN;
    // The O and the down projections split the rows of x alike, so the rows
    // a block adds to in E are the ones it wrote in C: it keeps them in
    // shared memory instead of reading them back.
    static_assert(Streamed<O_PROJ>::UNITS == HIDDEN && Streamed<DOWN_PROJ>::UNITS == HIDDEN, "");
    int own_begin, own_end;
    WeightRing::block_units<O_PROJ>(own_begin, own_end);
    stamp_phase(p, 0);
    GridBarrier barrier(p.barrier);

    for (int layer = 0; layer < NUM_LAYERS; ++layer) {
        // The residual stream of layer 0 is the token's embedding row.
        const bool first = layer == 0;

        // A: RMSNorm + QKV projection.
        rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync>(
            first ? nullptr : p.x, embedding, layer_weights(p, layer, QMK_OFF_INPUT_NORM), p.eps, sm.vec, scratch);
        project<QKV_PROJ>(ring, layer, sm.vec, [&](int row, const float (&y)[1]) { p.qkv[row] = y[0]; });
        barrier.sync();
        stamp_phase(p, 1 + layer * 5 + 0);

        // B: attention (the producer streams the next phases' rows meanwhile).
        attention_phase(p, layer, pos, sm.attn);
        barrier.sync();
        stamp_phase(p, 1 + layer * 5 + 1);

        // C: O projection + residual.
        load_vec_to_shared<Q_DIM>(p.attn, sm.vec);
        project<O_PROJ>(ring, layer, sm.vec, [&](int row, const float (&y)[1]) {
            float& x = residual[row - own_begin];
            x = (first ? bf16_to_f32(embedding[row]) : x) + y[0];
            p.x[row] = x;
        });
        barrier.sync();
        stamp_phase(p, 1 + layer * 5 + 2);

        // D: RMSNorm + gate/up + SiLU.
        rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync>(
            p.x, nullptr, layer_weights(p, layer, QMK_OFF_POST_ATTN_NORM), p.eps, sm.vec, scratch);
        project<GATE_UP_PROJ>(ring, layer, sm.vec, [&](int j, const float (&gu)[2]) {
            p.mlp[j] = gu[0] / (1.f + __expf(-gu[0])) * gu[1];
        });
        barrier.sync();
        stamp_phase(p, 1 + layer * 5 + 3);

        // E: down projection + residual.
        load_vec_to_shared<INTERMEDIATE>(p.mlp, sm.vec);
        project<DOWN_PROJ>(ring, layer, sm.vec, [&](int row, const float (&y)[1]) {
            float& x = residual[row - own_begin];
            x += y[0];
            p.x[row] = x;
        });
        if (layer + 1 < NUM_LAYERS) barrier.sync();  // the launch's end orders the last layer
        stamp_phase(p, 1 + layer * 5 + 4);
    }
}

}  // namespace qmk
