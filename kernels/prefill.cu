// The element-wise steps of batched prefill (src/gpu/prefill.rs). The
// matrix products between them are cuBLAS GEMMs and the attention is
// prefill_attention.cu. One row is one prompt position; the residual stream
// stays in f32, and what feeds the tensor cores is rounded to bf16.
#include "common.cuh"

namespace qmk {

// Threads per row of the row-wise kernels: 8 elements of HIDDEN each.
constexpr int ROW_THREADS = QMK_PREFILL_ROW_THREADS;
static_assert(ROW_THREADS * 8 == HIDDEN && ROW_THREADS % WARP == 0, "a row is whole warps of 8 elements a thread");
// Rows of prefill_rms_norm per block, a warp each.
constexpr int NORM_ROWS_PER_BLOCK = QMK_PREFILL_NORM_ROWS_PER_BLOCK;
static_assert(HIDDEN % (8 * WARP) == 0, "a warp reads a row in 256-element slices");

// x[row] = embed[tokens[row]], widened to f32. Grid: one block per row.
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
    prefill_embed(const unsigned int* tokens, const bf16* embed, float* x) {
    const int row = blockIdx.x, i = threadIdx.x * 8;
    float v[8];
    unpack8(*reinterpret_cast<const uint4*>(embed + (size_t)tokens[row] * HIDDEN + i), v);
    float4* dst = reinterpret_cast<float4*>(x + (size_t)row * HIDDEN + i);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// out[row] = bf16(x[row] * rsqrt(mean(x[row]^2) + eps) * weight), the same
// f32 arithmetic as the decode kernel, rounded once for the GEMM. A warp per
// row, 32 elements a lane: 8 loads of 16 bytes in flight.
extern "C" __global__ void __launch_bounds__(NORM_ROWS_PER_BLOCK * WARP)
    prefill_rms_norm(const float* x, const bf16* weight, bf16* out, float eps, unsigned int rows) {
    constexpr int SLICES = HIDDEN / (8 * WARP);
    const unsigned int row = blockIdx.x * NORM_ROWS_PER_BLOCK + threadIdx.x / WARP;
    if (row >= rows) return;
    const int lane = threadIdx.x % WARP;
    float v[SLICES][8];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < SLICES; ++j) {
        const float4* src = reinterpret_cast<const float4*>(x + (size_t)row * HIDDEN + (j * WARP + lane) * 8);
        const float4 a = src[0], b = src[1];
        const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            v[j][e] = f[e];
            ss = fmaf(f[e], f[e], ss);
        }
    }
    const float inv_rms = rsqrtf(warp_sum(ss) / HIDDEN + eps);
#pragma unroll
    for (int j = 0; j < SLICES; ++j) {
        const int i = (j * WARP + lane) * 8;
        float w[8];
        unpack8(*reinterpret_cast<const uint4*>(weight + i), w);
        uint4 packed;
        packed.x = pack_bf16x2(v[j][0] * inv_rms * w[0], v[j][1] * inv_rms * w[1]);
        packed.y = pack_bf16x2(v[j][2] * inv_rms * w[2], v[j][3] * inv_rms * w[3]);
        packed.z = pack_bf16x2(v[j][4] * inv_rms * w[4], v[j][5] * inv_rms * w[5]);
        packed.w = pack_bf16x2(v[j][6] * inv_rms * w[6], v[j][7] * inv_rms * w[7]);
        *reinterpret_cast<uint4*>(out + (size_t)row * HIDDEN + i) = packed;
    }
}

// cos and sin of every RoPE angle of rows [0, rows) at positions start_pos +
// row: (cos, sin) pairs, HEAD_DIM / 2 a row. Computed once per chunk and
// read by all 28 layers (sincosf of a large angle is slow). Grid: one warp a
// row.
extern "C" __global__ void __launch_bounds__(WARP)
    prefill_rope_table(const float* inv_freq, unsigned int start_pos, float2* table) {
    const int row = blockIdx.x, lane = threadIdx.x;
    float freq[2], c[2], s[2];
    load_rope_freqs(inv_freq, freq);
    rope_angles(freq, (float)(start_pos + row), c, s);
#pragma unroll
    for (int i = 0; i < 2; ++i) table[row * (HEAD_DIM / 2) + lane + 32 * i] = make_float2(c[i], s[i]);
}

// Heads of the fused QKV output one block handles: a warp per head.
constexpr int HEADS_PER_BLOCK = QMK_PREFILL_QKV_HEADS_PER_BLOCK;
constexpr int QKV_HEADS = NUM_Q_HEADS + 2 * NUM_KV_HEADS;
static_assert(QKV_HEADS % HEADS_PER_BLOCK == 0, "blocks cover whole heads");

// q/k RMSNorm and RoPE on the fused QKV projection (bf16) of each row: the
// query heads go to `q` (rows x NUM_Q_HEADS x HEAD_DIM, bf16), K and V into
// this layer's cache at position start_pos + row. Grid: (rows, QKV_HEADS /
// HEADS_PER_BLOCK); the arithmetic is the decode kernel's (HeadNormRope),
// with the angles from prefill_rope_table.
extern "C" __global__ void __launch_bounds__(HEADS_PER_BLOCK * WARP)
    prefill_qk_norm_rope(const bf16* qkv, unsigned int start_pos, const bf16* q_norm, const bf16* k_norm,
                         const float2* rope_table, float eps, bf16* q, bf16* k_cache, bf16* v_cache,
                         unsigned int context) {
    const int row = blockIdx.x, lane = threadIdx.x % WARP;
    const int head = blockIdx.y * HEADS_PER_BLOCK + threadIdx.x / WARP;  // Q heads, then K, then V
    const unsigned int pos = start_pos + row;
    const bf16* src = qkv + (size_t)row * QKV_ROWS + head * HEAD_DIM;
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = bf16_to_f32(src[lane + 32 * i]);
    bf16* dst;
    if (head < NUM_Q_HEADS + NUM_KV_HEADS) {
        const bool is_q = head < NUM_Q_HEADS;
        rms_norm_head(v, is_q ? q_norm : k_norm, eps);
        float c[2], s[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float2 angle = rope_table[row * (HEAD_DIM / 2) + lane + 32 * i];
            c[i] = angle.x;
            s[i] = angle.y;
        }
        rotate_head(v, c, s);
        dst = is_q ? q + ((size_t)row * NUM_Q_HEADS + head) * HEAD_DIM
                   : k_cache + ((size_t)(head - NUM_Q_HEADS) * context + pos) * HEAD_DIM;
    } else {
        dst = v_cache + ((size_t)(head - NUM_Q_HEADS - NUM_KV_HEADS) * context + pos) * HEAD_DIM;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[lane + 32 * i] = __float2bfloat16(v[i]);
}

// h = silu(gate) * up, from the fused gate|up projection (rows x 2
// INTERMEDIATE, bf16) to bf16 for the down GEMM. Eight elements a thread.
extern "C" __global__ void prefill_silu_mul(const bf16* gate_up, bf16* h, unsigned int rows) {
    constexpr int OCTETS = INTERMEDIATE / 8;
    const unsigned int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * OCTETS) return;
    const unsigned int row = index / OCTETS, col = index % OCTETS * 8;
    const bf16* gate = gate_up + (size_t)row * 2 * INTERMEDIATE + col;
    float g[8], u[8];
    unpack8(*reinterpret_cast<const uint4*>(gate), g);
    unpack8(*reinterpret_cast<const uint4*>(gate + INTERMEDIATE), u);
    auto silu_mul = [&](int i) { return g[i] / (1.f + __expf(-g[i])) * u[i]; };
    uint4 packed;
    packed.x = pack_bf16x2(silu_mul(0), silu_mul(1));
    packed.y = pack_bf16x2(silu_mul(2), silu_mul(3));
    packed.z = pack_bf16x2(silu_mul(4), silu_mul(5));
    packed.w = pack_bf16x2(silu_mul(6), silu_mul(7));
    *reinterpret_cast<uint4*>(h + (size_t)row * INTERMEDIATE + col) = packed;
}

// Combines the key splits of prefill_attention (prefill_attention.cuh, when
// splits > 1): each left, for every (row, query head), its unnormalised
// output o_s and running (max m_s, sum l_s) in base 2; with M the largest
// m_s, out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, rounded to bf16
// as the unsplit kernel writes it. A warp per (row, query head), four head
// dims a lane; grid: rows x NUM_Q_HEADS / MERGE_SLOTS_PER_BLOCK blocks.
constexpr int MERGE_SLOTS_PER_BLOCK = QMK_PREFILL_MERGE_SLOTS_PER_BLOCK;
static_assert(HEAD_DIM == 4 * WARP, "four head dims a lane");

extern "C" __global__ void __launch_bounds__(MERGE_SLOTS_PER_BLOCK * WARP)
    prefill_attention_merge(const float* partial_out, const float2* partial_max_sum, bf16* out, unsigned int rows,
                            unsigned int splits) {
    const unsigned int slots = rows * NUM_Q_HEADS;
    const unsigned int slot = blockIdx.x * MERGE_SLOTS_PER_BLOCK + threadIdx.x / WARP;  // row * NUM_Q_HEADS + head
    if (slot >= slots) return;
    const int lane = threadIdx.x % WARP;
    float max = -INFINITY;
    for (unsigned int s = 0; s < splits; ++s) max = fmaxf(max, partial_max_sum[s * slots + slot].x);
    float sum = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (unsigned int s = 0; s < splits; ++s) {
        const float2 max_sum = partial_max_sum[s * slots + slot];
        const float weight = exp2f(max_sum.x - max);
        sum += weight * max_sum.y;
        const float4 o = *reinterpret_cast<const float4*>(partial_out + ((size_t)s * slots + slot) * HEAD_DIM + lane * 4);
        acc[0] += weight * o.x;
        acc[1] += weight * o.y;
        acc[2] += weight * o.z;
        acc[3] += weight * o.w;
    }
    const float inv = 1.f / sum;
    uint2 packed;
    packed.x = pack_bf16x2(acc[0] * inv, acc[1] * inv);
    packed.y = pack_bf16x2(acc[2] * inv, acc[3] * inv);
    *reinterpret_cast<uint2*>(out + (size_t)slot * HEAD_DIM + lane * 4) = packed;
}

}  // namespace qmk
