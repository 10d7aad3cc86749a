// The element-wise steps of batched prefill (src/gpu/prefill.rs). The
// matrix products between them are cuBLAS GEMMs and the attention is
// prefill_attention.cu. One row is one prompt position; the residual stream
// stays in f32, and what feeds the tensor cores is rounded to bf16.
#include "common.cuh"

namespace qmk {

// Threads per row of the row-wise kernels: 8 elements of HIDDEN each.
constexpr int ROW_THREADS = QMK_PREFILL_ROW_THREADS;
static_assert(ROW_THREADS * 8 == HIDDEN && ROW_THREADS % WARP == 0, "a row is whole warps of 8 elements a thread");

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
// f32 arithmetic as the decode kernel, rounded once for the GEMM.
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
    prefill_rms_norm(const float* x, const bf16* weight, bf16* out, float eps) {
    __shared__ float scratch[ROW_THREADS / WARP];
    const int row = blockIdx.x, i = threadIdx.x * 8;
    const float4* src = reinterpret_cast<const float4*>(x + (size_t)row * HIDDEN + i);
    const float4 a = src[0], b = src[1];
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) ss = fmaf(v[j], v[j], ss);
    const float inv_rms = rsqrtf(block_sum<ROW_THREADS>(ss, scratch) / HIDDEN + eps);
    float w[8];
    unpack8(*reinterpret_cast<const uint4*>(weight + i), w);
    uint4 packed;
    packed.x = pack_bf16x2(v[0] * inv_rms * w[0], v[1] * inv_rms * w[1]);
    packed.y = pack_bf16x2(v[2] * inv_rms * w[2], v[3] * inv_rms * w[3]);
    packed.z = pack_bf16x2(v[4] * inv_rms * w[4], v[5] * inv_rms * w[5]);
    packed.w = pack_bf16x2(v[6] * inv_rms * w[6], v[7] * inv_rms * w[7]);
    *reinterpret_cast<uint4*>(out + (size_t)row * HIDDEN + i) = packed;
}

// Heads of the fused QKV output one block handles: a warp per head.
constexpr int HEADS_PER_BLOCK = 8;
constexpr int QKV_HEADS = NUM_Q_HEADS + 2 * NUM_KV_HEADS;
static_assert(QKV_HEADS % HEADS_PER_BLOCK == 0, "blocks cover whole heads");

// q/k RMSNorm and RoPE on the fused QKV projection (f32) of each row: the
// query heads go to `q` (rows x NUM_Q_HEADS x HEAD_DIM, bf16), K and V into
// this layer's cache at position start_pos + row. Grid: (rows, QKV_HEADS /
// HEADS_PER_BLOCK); the arithmetic is the decode kernel's norm_rope_head.
extern "C" __global__ void __launch_bounds__(HEADS_PER_BLOCK * WARP)
    prefill_qk_norm_rope(const float* qkv, unsigned int start_pos, const bf16* q_norm, const bf16* k_norm,
                         const float* inv_freq, float eps, bf16* q, bf16* k_cache, bf16* v_cache,
                         unsigned int context) {
    const int row = blockIdx.x, lane = threadIdx.x % WARP;
    const int head = blockIdx.y * HEADS_PER_BLOCK + threadIdx.x / WARP;  // Q heads, then K, then V
    const unsigned int pos = start_pos + row;
    const float* src = qkv + (size_t)row * QKV_ROWS + head * HEAD_DIM;
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = src[lane + 32 * i];
    bf16* dst;
    if (head < NUM_Q_HEADS) {
        norm_rope_head(v, q_norm, inv_freq, (float)pos, eps);
        dst = q + ((size_t)row * NUM_Q_HEADS + head) * HEAD_DIM;
    } else if (head < NUM_Q_HEADS + NUM_KV_HEADS) {
        norm_rope_head(v, k_norm, inv_freq, (float)pos, eps);
        dst = k_cache + ((size_t)(head - NUM_Q_HEADS) * context + pos) * HEAD_DIM;
    } else {
        dst = v_cache + ((size_t)(head - NUM_Q_HEADS - NUM_KV_HEADS) * context + pos) * HEAD_DIM;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[lane + 32 * i] = __float2bfloat16(v[i]);
}

// h = silu(gate) * up, from the fused gate|up projection (rows x 2
// INTERMEDIATE, f32) to bf16 for the down GEMM. Four elements a thread.
extern "C" __global__ void prefill_silu_mul(const float* gate_up, bf16* h, unsigned int rows) {
    constexpr int QUADS = INTERMEDIATE / 4;
    const unsigned int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * QUADS) return;
    const unsigned int row = index / QUADS, col = index % QUADS * 4;
    const float4 g = *reinterpret_cast<const float4*>(gate_up + (size_t)row * 2 * INTERMEDIATE + col);
    const float4 u = *reinterpret_cast<const float4*>(gate_up + (size_t)row * 2 * INTERMEDIATE + INTERMEDIATE + col);
    auto silu = [](float a) { return a / (1.f + __expf(-a)); };
    uint2 packed;
    packed.x = pack_bf16x2(silu(g.x) * u.x, silu(g.y) * u.y);
    packed.y = pack_bf16x2(silu(g.z) * u.z, silu(g.w) * u.w);
    *reinterpret_cast<uint2*>(h + (size_t)row * INTERMEDIATE + col) = packed;
}

}  // namespace qmk
