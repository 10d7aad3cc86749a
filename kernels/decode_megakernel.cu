// One decode step of Qwen3-0.6B, all 28 layers, in one persistent cooperative
// kernel. The grid is one block per SM (sized on the host from the device);
// each phase needs the whole output of the one before it:
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
// There is no grid barrier. Every value a phase hands on is stored with a tag
// naming the launch, layer and phase that wrote it (TaggedVector); a reader
// loads the values it needs and reloads any whose tag is not yet the one it
// expects, so finding the data ready and reading it is one round trip.
//
// A block is one producer warp and CONSUMER_WARPS consumer warps. The
// producer streams the block's weight rows of every phase into a ring of
// shared-memory slots (decode_weight_ring.cuh), running ahead through
// attention and the waits for inputs; the consumers run the phases above and read
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
    float* x;                    // residual stream after the last layer, HIDDEN (the LM head's input)
    unsigned long long* x_tagged;     // residual stream, HIDDEN tagged values (TaggedVector)
    unsigned long long* qkv_tagged;   // QKV_ROWS
    unsigned long long* attn_tagged;  // Q_DIM
    unsigned long long* mlp_tagged;   // INTERMEDIATE
    float* attn_partials;        // NUM_Q_HEADS x max_chunks x (HEAD_DIM + 2)
    unsigned int* attn_counters; // NUM_LAYERS x NUM_KV_HEADS, zero between launches
    unsigned long long* launches;  // block arrivals of every launch since the sequence began
    const DecodeState* state;
    const unsigned int* tokens;  // context + 1 token ids
    unsigned int context;        // positions the KV cache holds
    unsigned int max_chunks;     // attention chunks the partials buffer holds per head
    float eps;                   // RMSNorm epsilon
    unsigned int ring_slots;     // weight-ring slots in the dynamic shared memory (<= RING_MAX_SLOTS)
    unsigned int ring_in_flight; // copies the producer keeps outstanding (<= ring_slots)
    unsigned long long* phase_times;  // null, or PHASE_STAMPS timestamps + 3 producer and 2 consumer clock counts (bench --profile)
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

// ---- the vectors phases hand on ----------------------------------------------------

// A phase's output for other blocks is a vector of 64-bit words: the f32
// value in the low half, in the high half the tag of the write, unique to
// (launch, layer, handoff) within a sequence. An aligned 64-bit store is
// single-copy atomic, so a reader that sees the tag it expects sees that
// write's value. Readers spin on the values themselves: no grid barrier, no
// flag to read before the data. A block can only write a handoff once every
// block has read the previous one it overwrites, because each phase needs
// the whole output of the phase before it, which every block has a part in.
// The host zeroes the vectors (tag 0 is never written) with the counters at
// the start of a sequence.
enum Handoff { QKV_OUT = 0, ATTN_OUT = 1, X_AFTER_ATTN = 2, MLP_OUT = 3, X_AFTER_MLP = 4, HANDOFFS = 5 };

struct TaggedVector {
    unsigned long long* words;
    unsigned int tag;

    __device__ void store(int i, float value) const {
        const unsigned long long word = ((unsigned long long)tag << 32) | __float_as_uint(value);
        asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(words + i), "l"(word) : "memory");
    }
    // Starts reading element i; `await` finishes it. Issue every load before
    // the first await, so that they travel together.
    __device__ unsigned long long load(int i) const {
        unsigned long long word;
        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(words + i) : "memory");
        return word;
    }
    __device__ float await(int i, unsigned long long word) const {
        while ((unsigned int)(word >> 32) != tag) word = load(i);
        return __uint_as_float((unsigned int)word);
    }
};

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
// `ring_wait` gathers the cycles thread 0 waits for rows (bench --profile).
template <int P, typename Store>
__device__ __forceinline__ void project(const WeightRing& ring, int layer, const float* vec, long long& ring_wait,
                                        Store store) {
    using S = Streamed<P>;
    using L = SlotLayout<P>;
    int begin, end;
    WeightRing::block_units<P>(begin, end);
    const int warp = threadIdx.x / WARP;
    for (int u = warp; u < end - begin; u += CONSUMER_WARPS) {
        const int index = ring.slot_of<P>(layer, u);
        const long long t0 = clock64();
        const unsigned char* row = ring.wait_full(index) + (u % L::PER_SLOT) * L::ROW_BYTES;
        ring_wait += clock64() - t0;
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

// The whole of a handed-on vector into shared memory.
template <int N>
__device__ __forceinline__ void gather_to_shared(const TaggedVector& src, float* dst) {
    constexpr int PER_THREAD = (N + CONSUMERS - 1) / CONSUMERS;
    unsigned long long words[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * CONSUMERS;
        if (i < N) words[k] = src.load(i);
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * CONSUMERS;
        if (i < N) dst[i] = src.await(i, words[k]);
    }
    consumer_sync();
}

// RMSNorm of the handed-on residual stream into shared memory (as
// rms_norm_to_shared; the weights load with the first read of x).
__device__ __forceinline__ void gather_rms_norm(const TaggedVector& x, const bf16* weight, float eps, float* out,
                                                float* scratch) {
    constexpr int PER_THREAD = (HIDDEN + CONSUMERS - 1) / CONSUMERS;
    unsigned long long words[PER_THREAD];
    float v[PER_THREAD], w[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * CONSUMERS;
        if (i < HIDDEN) {
            words[k] = x.load(i);
            w[k] = bf16_to_f32(weight[i]);
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * CONSUMERS;
        v[k] = i < HIDDEN ? x.await(i, words[k]) : 0.f;
        ss = fmaf(v[k], v[k], ss);
    }
    const float inv_rms = rsqrtf(block_sum<CONSUMERS, ConsumerSync>(ss, scratch) / HIDDEN + eps);
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * CONSUMERS;
        if (i < HIDDEN) out[i] = v[k] * inv_rms * w[k];
    }
    consumer_sync();
}

// ---- profiling ---------------------------------------------------------------------

// `qwen-mk bench --profile`: block 0 stamps the global timer at the start,
// then twice per phase: when its inputs have arrived, and when it is done.
constexpr int PHASE_STAMPS = 1 + 2 * 5 * NUM_LAYERS;
enum Stamp { INPUTS_READY = 0, PHASE_DONE = 1 };

__device__ __forceinline__ void stamp_phase(const DecodeParams& p, int layer, int phase, Stamp what) {
    if (p.phase_times != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        p.phase_times[layer < 0 ? 0 : 1 + (layer * 5 + phase) * 2 + what] = now;
    }
}

// ---- phase B: attention --------------------------------------------------------

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
        unsigned long long words[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) words[i] = qkv.load(row0 + lane + 32 * i);
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = qkv.await(row0 + lane + 32 * i, words[i]);
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

// ---- the kernel ------------------------------------------------------------------


extern "C" __global__ void __launch_bounds__(THREADS, 1) decode_step(const DecodeParams p) {
    __shared__ __align__(16) SharedStorage sm;
    __shared__ float scratch[CONSUMER_WARPS];
    __shared__ unsigned long long ring_barriers[2 * RING_MAX_SLOTS];
    __shared__ float residual[RESIDUAL_MAX_ROWS];  // this block's rows of x (see below)
    __shared__ unsigned int first_tag;
    extern __shared__ __align__(128) unsigned char ring_storage[];

    const DecodeState* state = p.state;
    if (state->done) return;  // every block reads the same flag: nobody writes it during this launch

    WeightRing ring(ring_storage, ring_barriers, (int)p.ring_slots);  // ends in __syncthreads
    if (threadIdx.x / WARP == PRODUCER_WARP) {
        if (threadIdx.x % WARP == 0) {
            const bool profiled = p.phase_times != nullptr && blockIdx.x == 0;
            ring.produce(p.layers, (int)p.ring_in_flight, profiled ? p.phase_times + PHASE_STAMPS : nullptr);
        }
        return;
    }
    // This launch's number in the sequence: every block adds one arrival, and
    // all of the previous launch's are in before this one starts. Nothing
    // waits for the answer until layer 0's first handoff.
    unsigned long long arrivals_before = 0;
    if (threadIdx.x == 0) arrivals_before = atomicAdd(p.launches, 1ull);

    const int pos = (int)state->pos;
    const bf16* embedding = p.embed + (size_t)p.tokens[pos] * HIDDEN;
    // The O and the down projections split the rows of x alike, so the rows
    // a block adds to in E are the ones it wrote in C: it keeps them in
    // shared memory instead of reading them back.
    static_assert(Streamed<O_PROJ>::UNITS == HIDDEN && Streamed<DOWN_PROJ>::UNITS == HIDDEN, "");
    int own_begin, own_end;
    WeightRing::block_units<O_PROJ>(own_begin, own_end);
    const Handoffs handoffs{&p, &first_tag};
    stamp_phase(p, -1, 0, PHASE_DONE);
    const long long start = clock64();
    long long ring_wait = 0;

    for (int layer = 0; layer < NUM_LAYERS; ++layer) {
        // The residual stream of layer 0 is the token's embedding row.
        const bool first = layer == 0;
        const bool last = layer + 1 == NUM_LAYERS;
        // A: RMSNorm + QKV projection.
        const bf16* input_norm = layer_weights(p, layer, QMK_OFF_INPUT_NORM);
        if (first) {
            rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync>(nullptr, embedding, input_norm, p.eps, sm.vec,
                                                                scratch);
            if (threadIdx.x == 0) first_tag = (unsigned int)(arrivals_before / gridDim.x) * (HANDOFFS * NUM_LAYERS) + 1;
            consumer_sync();
        } else {
            gather_rms_norm(handoffs.at(layer - 1, X_AFTER_MLP), input_norm, p.eps, sm.vec, scratch);
        }
        stamp_phase(p, layer, 0, INPUTS_READY);
        const TaggedVector qkv = handoffs.at(layer, QKV_OUT), attn = handoffs.at(layer, ATTN_OUT);
        const TaggedVector x_mid = handoffs.at(layer, X_AFTER_ATTN), mlp = handoffs.at(layer, MLP_OUT);
        const TaggedVector x_out = handoffs.at(layer, X_AFTER_MLP);
        project<QKV_PROJ>(ring, layer, sm.vec, ring_wait, [&](int row, const float (&y)[1]) { qkv.store(row, y[0]); });
        stamp_phase(p, layer, 0, PHASE_DONE);

        // B: attention (the producer streams the next phases' rows meanwhile).
        consumer_sync();  // the attention scratch shares shared memory with sm.vec
        attention_phase(p, qkv, attn, layer, pos, sm.attn);
        stamp_phase(p, layer, 1, PHASE_DONE);

        // C: O projection + residual.
        consumer_sync();
        gather_to_shared<Q_DIM>(attn, sm.vec);
        stamp_phase(p, layer, 2, INPUTS_READY);
        project<O_PROJ>(ring, layer, sm.vec, ring_wait, [&](int row, const float (&y)[1]) {
            float& x = residual[row - own_begin];
            x = (first ? bf16_to_f32(embedding[row]) : x) + y[0];
            x_mid.store(row, x);
        });
        stamp_phase(p, layer, 2, PHASE_DONE);

        // D: RMSNorm + gate/up + SiLU (its first consumer barrier comes
        // before it writes sm.vec).
        gather_rms_norm(x_mid, layer_weights(p, layer, QMK_OFF_POST_ATTN_NORM), p.eps, sm.vec, scratch);
        stamp_phase(p, layer, 3, INPUTS_READY);
        project<GATE_UP_PROJ>(ring, layer, sm.vec, ring_wait,
                              [&](int j, const float (&gu)[2]) { mlp.store(j, gu[0] / (1.f + __expf(-gu[0])) * gu[1]); });
        stamp_phase(p, layer, 3, PHASE_DONE);

        // E: down projection + residual.
        consumer_sync();
        gather_to_shared<INTERMEDIATE>(mlp, sm.vec);
        stamp_phase(p, layer, 4, INPUTS_READY);
        project<DOWN_PROJ>(ring, layer, sm.vec, ring_wait, [&](int row, const float (&y)[1]) {
            float& x = residual[row - own_begin];
            x += y[0];
            x_out.store(row, x);
            if (last) p.x[row] = x;  // the LM head's input (the launch's end orders it)
        });
        stamp_phase(p, layer, 4, PHASE_DONE);
    }
    if (p.phase_times != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
        p.phase_times[PHASE_STAMPS + 3] = clock64() - start;
        p.phase_times[PHASE_STAMPS + 4] = ring_wait;
    }
}

}  // namespace qmk
