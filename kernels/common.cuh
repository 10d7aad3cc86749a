// Shared pieces of the qwen-mk kernels: model dimensions (passed by build.rs
// from src/kernel_dims.rs), the structs shared with the Rust host code, and
// small device helpers (loads, dot products, reductions).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace qmk {

constexpr int HIDDEN = QMK_HIDDEN;
constexpr int NUM_LAYERS = QMK_NUM_LAYERS;
constexpr int NUM_Q_HEADS = QMK_NUM_Q_HEADS;
constexpr int NUM_KV_HEADS = QMK_NUM_KV_HEADS;
constexpr int HEAD_DIM = QMK_HEAD_DIM;
constexpr int INTERMEDIATE = QMK_INTERMEDIATE;
constexpr int Q_DIM = NUM_Q_HEADS * HEAD_DIM;
constexpr int KV_DIM = NUM_KV_HEADS * HEAD_DIM;
constexpr int QKV_ROWS = Q_DIM + 2 * KV_DIM;
constexpr int GQA_GROUP = NUM_Q_HEADS / NUM_KV_HEADS;
constexpr int WARP = 32;

static_assert(HEAD_DIM == 128, "attention maps 128 head dims onto lanes");
static_assert(GQA_GROUP == 2, "attention handles two query heads per KV head");
static_assert(HIDDEN % 256 == 0 && Q_DIM % 256 == 0 && INTERMEDIATE % 256 == 0,
              "a warp reads rows in 256-element strides");

typedef __nv_bfloat16 bf16;

// State of the device-side token loop; src/gpu/decoder.rs mirrors it.
struct DecodeState {
    unsigned int pos;          // position the next decode step processes
    unsigned int n_fixed;      // tokens[0..n_fixed) are given (prompt / teacher forcing)
    unsigned int done;         // set once an EOS is produced or the cache is full
    unsigned int stop_on_eos;  // whether an EOS id sets done
    unsigned int eos_ids[4];
    unsigned int n_eos;
};


// ---- loads -----------------------------------------------------------------

// Weights are read-only for the whole launch and streamed exactly once: the
// non-coherent path, not allocated in L1.
__device__ __forceinline__ uint4 load_weights16(const bf16* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// Data written during the launch (activations, KV cache, partial results)
// is read at L2, which is coherent across SMs: never through L1 or the
// non-coherent path.
__device__ __forceinline__ uint4 load_coherent16(const void* p) {
    return __ldcg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ float load_coherent(const float* p) { return __ldcg(p); }

// ---- bf16 arithmetic -------------------------------------------------------

// A bf16 is the top half of an f32: widening is a shift.
__device__ __forceinline__ float bf16_lo(unsigned int pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int pair) { return __uint_as_float(pair & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_f32(bf16 v) { return __bfloat162float(v); }

// Dot product of 8 packed bf16 with 8 floats (a then b).
__device__ __forceinline__ float dot8(uint4 w, float4 a, float4 b, float acc) {
    acc = fmaf(bf16_lo(w.x), a.x, acc);
    acc = fmaf(bf16_hi(w.x), a.y, acc);
    acc = fmaf(bf16_lo(w.y), a.z, acc);
    acc = fmaf(bf16_hi(w.y), a.w, acc);
    acc = fmaf(bf16_lo(w.z), b.x, acc);
    acc = fmaf(bf16_hi(w.z), b.y, acc);
    acc = fmaf(bf16_lo(w.w), b.z, acc);
    acc = fmaf(bf16_hi(w.w), b.w, acc);
    return acc;
}

// The same with the 8 floats at x (16-byte aligned).
__device__ __forceinline__ float dot8(uint4 w, const float* x, float acc) {
    return dot8(w, *reinterpret_cast<const float4*>(x), *reinterpret_cast<const float4*>(x + 4), acc);
}

// Two floats rounded to bf16 and packed, the first in the low half.
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned int*>(&v);
}

__device__ __forceinline__ void unpack8(uint4 w, float out[8]) {
    out[0] = bf16_lo(w.x); out[1] = bf16_hi(w.x);
    out[2] = bf16_lo(w.y); out[3] = bf16_hi(w.y);
    out[4] = bf16_lo(w.z); out[5] = bf16_hi(w.z);
    out[6] = bf16_lo(w.w); out[7] = bf16_hi(w.w);
}

// ---- reductions ------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// How a projection's input vector lies in shared memory. A lane reads 8
// floats (32 bytes) of it per step as two 16-byte loads; in order, lanes 32
// bytes apart would put two lanes of every quarter-warp on the same banks.
// Swapping the two halves of the 8 for lanes 4-7 of every 8 (bit 5 of the
// element index) makes each load cover all 32 banks once.
struct ProjectionLayout {
    static __device__ __forceinline__ int at(int i) { return i ^ (((i >> 5) & 1) << 2); }
};

// Dot products of R bf16 rows of K (in shared memory) with `vec` (K floats
// in shared memory, ProjectionLayout), summed over the warp: every lane gets
// them. The rows' FMA chains and shuffles are independent and interleave,
// and `vec` is read once for all of them.
template <int K, int R>
__device__ __forceinline__ void rows_dot(const unsigned char* const (&rows)[R], const float* vec, float (&y)[R]) {
    const int lane = threadIdx.x % WARP;
    const int first = (lane >> 2 & 1) * 4;  // where this lane's first four of the 8 lie
#pragma unroll
    for (int r = 0; r < R; ++r) y[r] = 0.f;
#pragma unroll
    for (int s = 0; s < K / (8 * WARP); ++s) {
        const int at = (s * WARP + lane) * 8;
        const float4 lo = *reinterpret_cast<const float4*>(vec + at + first);
        const float4 hi = *reinterpret_cast<const float4*>(vec + at + 4 - first);
#pragma unroll
        for (int r = 0; r < R; ++r)
            y[r] = dot8(*reinterpret_cast<const uint4*>(rows[r] + at * (int)sizeof(bf16)), lo, hi, y[r]);
    }
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2)
#pragma unroll
        for (int r = 0; r < R; ++r) y[r] += __shfl_xor_sync(0xffffffffu, y[r], offset);
}

// Eight sums over the warp at once: lane l gets the total of v[l / 4] (9
// shuffles, against 40 for eight warp_sums). Each round halves the values a
// lane keeps and adds the half its partner kept.
__device__ __forceinline__ float warp_sum8_transposed(const float (&v)[8]) {
    const int lane = threadIdx.x % WARP;
    const bool upper4 = lane & 16, upper2 = lane & 8, upper1 = lane & 4;
    float four[4], two[2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        four[i] = (upper4 ? v[4 + i] : v[i]) + __shfl_xor_sync(0xffffffffu, upper4 ? v[i] : v[4 + i], 16);
#pragma unroll
    for (int i = 0; i < 2; ++i)
        two[i] = (upper2 ? four[2 + i] : four[i]) + __shfl_xor_sync(0xffffffffu, upper2 ? four[i] : four[2 + i], 8);
    float one = (upper1 ? two[1] : two[0]) + __shfl_xor_sync(0xffffffffu, upper1 ? two[0] : two[1], 4);
    one += __shfl_xor_sync(0xffffffffu, one, 2);
    return one + __shfl_xor_sync(0xffffffffu, one, 1);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The barrier of the threads taking part in a block-wide step: all of them
// by default; the decode kernel passes its consumer warps' named barrier.
struct BlockSync {
    __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// Sum over the first THREADS threads of the block; `scratch` holds one float
// per warp. Every one of them gets the result.
template <int THREADS, typename Sync = BlockSync>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    constexpr int WARPS = THREADS / WARP;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    Sync{}();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    Sync{}();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += scratch[w];
    return total;
}

// Rows [begin, end) of `total` that part `part` of `parts` owns: balanced
// contiguous ranges. In 32 bits (total * parts < 2^32, which the host
// checks): a 64-bit division is a called routine of some hundred
// instructions, and the decode kernel splits every phase's rows this way.
__device__ __forceinline__ void split_range(int total, int part, int parts, int& begin, int& end) {
    begin = (int)((unsigned int)total * (unsigned int)part / (unsigned int)parts);
    end = (int)((unsigned int)total * (unsigned int)(part + 1) / (unsigned int)parts);
}

// Vectors read with every load issued before the first is used: `load(i)`
// starts reading element i; a read is over when `ready(raw)`, and then
// `value(raw)` is the element; `back_off()` runs before late elements are
// read again. Three kinds: f32 written earlier in the launch, read-only
// bf16, and the decode kernel's tagged vectors, which may not be written yet.
struct CoherentF32 {  // f32 written in this launch: read at L2
    const float* values;
    __device__ float load(int i) const { return load_coherent(values + i); }
    __device__ bool ready(float) const { return true; }
    __device__ float value(float raw) const { return raw; }
    __device__ void back_off() const {}
};
struct Bf16Row {  // read-only bf16, such as an embedding row
    const bf16* values;
    __device__ float load(int i) const { return bf16_to_f32(values[i]); }
    __device__ bool ready(float) const { return true; }
    __device__ float value(float raw) const { return raw; }
    __device__ void back_off() const {}
};

// A vector handed from block to block within a launch (the decode kernel's
// handoffs, decode_common.cuh): 64-bit words, the f32 value in the low half
// and in the high half the tag of the write. An aligned 64-bit store is
// single-copy atomic, so a reader that sees the tag it expects sees that
// write's value.
struct TaggedVector {
    unsigned long long* words;
    unsigned int tag;

    __device__ void store(int i, float value) const {
        const unsigned long long word = ((unsigned long long)tag << 32) | __float_as_uint(value);
        asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(words + i), "l"(word) : "memory");
    }
    // Starts reading element i; await_all finishes it.
    __device__ unsigned long long load(int i) const {
        unsigned long long word;
        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(words + i) : "memory");
        return word;
    }
    __device__ bool ready(unsigned long long word) const { return (unsigned int)(word >> 32) == tag; }
    // Before reading late values again (src/kernel_dims.rs says why).
    __device__ void back_off() const { __nanosleep(QMK_DECODE_POLL_BACKOFF_NS); }
    __device__ float value(unsigned long long word) const { return __uint_as_float((unsigned int)word); }
};

// Finishes the reads of elements index(k), k < K (none where it is
// negative), started with src.load. Elements not ready yet are all read
// again at once: each round of polling costs one round trip, however many
// elements are late. Every lane of the warp calls it, and the lanes poll
// in the same rounds until none is late: left to leave the loop one by
// one, they did not come together again, and the warp ran on in pieces (the
// RMSNorms' warp sums after a handoff took the compiler's divergent shuffle
// path in 74-82% of warps). Polling together made a step 3.8 / 5.2 / 4.2 /
// 3.0% faster at 0-255 / 1,024 / 4,096 / 16,384 (H200, RESULTS.md).
template <int K, typename Source, typename Raw, typename Index>
__device__ __forceinline__ void await_all(const Source& src, Raw (&raw)[K], Index index) {
    for (;;) {
        bool late = false;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int i = index(k);
            if (i >= 0 && !src.ready(raw[k])) {
                raw[k] = src.load(i);
                late = true;
            }
        }
        if (!__any_sync(0xffffffffu, late)) return;
        src.back_off();
    }
}

// Where element i of a vector goes in shared memory: by default, at i.
struct InOrder {
    static __device__ __forceinline__ int at(int i) { return i; }
};

// RMSNorm of N floats into shared memory: out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i].
// Every load is issued before the first use: one round trip to memory, not
// one for x and another for the weight. Element i goes to out[Layout::at(i)].
template <int THREADS, int N, typename Sync = BlockSync, typename Layout = InOrder, typename Source>
__device__ __forceinline__ void rms_norm_to_shared(const Source& x, const bf16* weight, float eps, float* out,
                                                   float* scratch) {
    constexpr int PER_THREAD = (N + THREADS - 1) / THREADS;
    decltype(x.load(0)) raw[PER_THREAD];
    float v[PER_THREAD], w[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * THREADS;
        if (i < N) {
            raw[k] = x.load(i);
            w[k] = bf16_to_f32(weight[i]);
        }
    }
    await_all(x, raw, [](int k) { const int i = threadIdx.x + k * THREADS; return i < N ? i : -1; });
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * THREADS;
        v[k] = i < N ? x.value(raw[k]) : 0.f;
        ss = fmaf(v[k], v[k], ss);
    }
    const float inv_rms = rsqrtf(block_sum<THREADS, Sync>(ss, scratch) / N + eps);
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * THREADS;
        if (i < N) out[Layout::at(i)] = v[k] * inv_rms * w[k];
    }
    Sync{}();
}

// ---- q/k norm and RoPE ---------------------------------------------------------

// A head as a warp holds it: 4 values a lane, dims lane + 32 i.

// RMSNorm over one head, with this lane's weights (dims lane + 32 i).
__device__ __forceinline__ void rms_norm_head(float (&v)[4], const float (&weight)[4], float eps) {
    const float ss = warp_sum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]);
    const float inv_rms = rsqrtf(ss / HEAD_DIM + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = v[i] * inv_rms * weight[i];
}

__device__ __forceinline__ void load_head_weights(const bf16* norm_weight, float (&weight)[4]) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < 4; ++i) weight[i] = bf16_to_f32(norm_weight[lane + 32 * i]);
}

__device__ __forceinline__ void rms_norm_head(float (&v)[4], const bf16* norm_weight, float eps) {
    float weight[4];
    load_head_weights(norm_weight, weight);
    rms_norm_head(v, weight, eps);
}

// cos and sin of the RoPE angles of this lane's two frequencies (lane and
// lane + 32) at `pos`: the same f32 product as transformers, position times
// inverse frequency.
__device__ __forceinline__ void rope_angles(const float (&freq)[2], float pos, float (&c)[2], float (&s)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) sincosf(pos * freq[i], &s[i], &c[i]);
}

__device__ __forceinline__ void load_rope_freqs(const float* inv_freq, float (&freq)[2]) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < 2; ++i) freq[i] = inv_freq[lane + 32 * i];
}

// RoPE in the rotate-half form: dim d pairs with d + 64.
__device__ __forceinline__ void rotate_head(float (&v)[4], const float (&c)[2], const float (&s)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float lo = v[i], hi = v[i + 2];
        v[i] = lo * c[i] - hi * s[i];
        v[i + 2] = hi * c[i] + lo * s[i];
    }
}

// q/k norm and RoPE of one head, in two steps: `prepare` loads the norm
// weights and computes the rotation angles, none of which depend on the
// head's values, so that they are ready before those arrive (sincosf of a
// large angle takes a slow path); `apply` normalises and rotates.
struct HeadNormRope {
    float weight[4], c[2], s[2];

    __device__ __forceinline__ void prepare(const bf16* norm_weight, const float* inv_freq, float pos) {
        float freq[2];
        load_head_weights(norm_weight, weight);
        load_rope_freqs(inv_freq, freq);
        rope_angles(freq, pos, c, s);
    }
    __device__ __forceinline__ void apply(float (&v)[4], float eps) const {
        rms_norm_head(v, weight, eps);
        rotate_head(v, c, s);
    }
};

// ---- argmax ------------------------------------------------------------------

// (logit, id) packed so that the larger key has the larger logit and, on a
// tie, the lower id: torch.argmax's rule.
__device__ __forceinline__ unsigned long long argmax_key(float logit, unsigned int id) {
    const unsigned int bits = __float_as_uint(logit);
    const unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (unsigned long long)(0xffffffffu - id);
}
__device__ __forceinline__ unsigned int argmax_key_id(unsigned long long key) {
    return 0xffffffffu - (unsigned int)(key & 0xffffffffu);
}
__device__ __forceinline__ float argmax_key_logit(unsigned long long key) {
    const unsigned int ordered = (unsigned int)(key >> 32);
    return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}
// The warp's largest key, in every lane, by two warp reductions of 32 bits
// (redux.sync, an instruction each) instead of five rounds of 64-bit
// shuffles: the largest high half (the logit's order), then the largest low
// half among the lanes that hold it (the lowest id).
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
    const unsigned int high = (unsigned int)(key >> 32);
    const unsigned int top = __reduce_max_sync(0xffffffffu, high);
    const unsigned int low = __reduce_max_sync(0xffffffffu, high == top ? (unsigned int)key : 0u);
    return ((unsigned long long)top << 32) | low;
}

}  // namespace qmk
