// How long one decode block takes to compute its share of a projection once
// the rows are in shared memory, on CUDA cores (the decode kernel's
// rows_dot) and on the tensor cores (mma.sync m16n8k16), measured alone: no
// stream, no handoff, one block per SM, clock64 around the phase (issue 4).
//
// The shares are a 132-SM GPU's: QKV 31 rows of K = 1,024; gate/up 24 row
// pairs of K = 1,024; O 8 rows of K = 2,048; down 8 rows of K = 3,072. The
// rows lie in shared memory one after another (as the decode kernel's ring
// holds them: "packed", each row's 16-byte groups on the same banks as the
// row before's) or each 16 bytes further on than the row before ("skewed":
// eight consecutive rows start on eight different bank groups).
//
// The tensor-core version takes the rows 16 at a time as the A operand, the
// input vector as two B columns (its bf16 high parts and the bf16 rounding
// of what is left), splits K over the warps, and sums the warps' partial
// results in shared memory, as reference/experiments/
// 2026-11-28-decode-projections-on-tensor-cores.patch does in the kernel.
//
// It takes the kernel's own rows_dot, ProjectionLayout, dot8 and
// warp_sum8_transposed from kernels/common.cuh (with the constants build.rs
// passes, from kernel_defines.h), and builds with one nvcc line on
// the device machine (no cargo):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/projection_probe benches/projection_probe.cu
//   /tmp/projection_probe
// prints, per shape and method, the median cycles of a phase over the
// blocks and repeats, and the largest error against a double-precision sum.
#include <cuda_runtime.h>

#include "kernel_defines.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#define CHECK(call)                                                                   \
    do {                                                                              \
        cudaError_t err_ = (call);                                                    \
        if (err_ != cudaSuccess) {                                                    \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#include "../kernels/common.cuh"

using qmk::bf16;
using qmk::dot8;
using qmk::ProjectionLayout;
using qmk::rows_dot;
using qmk::WARP;
using qmk::warp_sum8_transposed;
constexpr int THREADS = 384;                // as the decode kernel: 11 working warps and one more
constexpr int WORKERS = THREADS - WARP;     // the consumer warps' threads
constexpr int WORK_WARPS = WORKERS / WARP;  // 11
constexpr int REPEATS = 64;
constexpr int ROWS_BYTES = 48 * 2048 + 48 * 16 + 1024;

__device__ __forceinline__ void worker_sync() { asm volatile("bar.sync 1, %0;" ::"n"(WORKERS) : "memory"); }

// ---- CUDA cores: the decode kernel's rows_dot, as its project() takes it ----

// `n` units of `rows_per_unit` rows (a gate/up unit is a row pair), AT_ONCE
// units a warp at a time; unit u's row r at rows + (u * rows_per_unit + r) * stride.
template <int K, int AT_ONCE, int ROWS_PER_UNIT>
__device__ void project_cuda_cores(const unsigned char* rows, int stride, int n, const float* vec, float* out) {
    const int warp = threadIdx.x / WARP;
    for (int u0 = warp; u0 < n; u0 += WORK_WARPS * AT_ONCE) {
        const unsigned char* r[AT_ONCE * ROWS_PER_UNIT];
#pragma unroll
        for (int j = 0; j < AT_ONCE; ++j) {
            const int u = u0 + j * WORK_WARPS < n ? u0 + j * WORK_WARPS : u0;
#pragma unroll
            for (int k = 0; k < ROWS_PER_UNIT; ++k) r[j * ROWS_PER_UNIT + k] = rows + (u * ROWS_PER_UNIT + k) * stride;
        }
        float y[AT_ONCE * ROWS_PER_UNIT];
        rows_dot<K>(r, vec, y);
        if (threadIdx.x % WARP == 0)
#pragma unroll
            for (int j = 0; j < AT_ONCE; ++j) {
                const int u = u0 + j * WORK_WARPS;
                if (u < n)
#pragma unroll
                    for (int k = 0; k < ROWS_PER_UNIT; ++k) out[u * ROWS_PER_UNIT + k] = y[j * ROWS_PER_UNIT + k];
            }
    }
}

// The same rows split by K instead: each warp takes a slice of K (256
// elements, or 512 where 256 would need more slices than there are warps)
// for every row, its slice of the input vector read once, and the warps'
// sums meet in shared memory, eight rows at a time, as the kernel's
// project_split_k does (there each warp's slice comes from the handoff).
template <int K>
__device__ void project_split_k(const unsigned char* rows, int stride, int n, const float* vec, float* partials,
                                float* out) {
    constexpr int STEPS = K / (8 * WARP) <= WORK_WARPS ? 1 : 2;
    constexpr int SLICES = K / (8 * WARP * STEPS);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (warp < SLICES) {
        const int first = (lane >> 2 & 1) * 4;
        int at[STEPS];
        float4 lo[STEPS], hi[STEPS];
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            at[s] = ((warp * STEPS + s) * WARP + lane) * 8;
            lo[s] = *reinterpret_cast<const float4*>(vec + at[s] + first);
            hi[s] = *reinterpret_cast<const float4*>(vec + at[s] + 4 - first);
        }
        for (int g = 0; g < n; g += 8) {
            float y[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const unsigned char* row = rows + min(g + r, n - 1) * stride;
                y[r] = 0.f;
#pragma unroll
                for (int s = 0; s < STEPS; ++s)
                    y[r] = dot8(*reinterpret_cast<const uint4*>(row + at[s] * 2), lo[s], hi[s], y[r]);
            }
            const float sum = warp_sum8_transposed(y);
            if (lane % 4 == 0 && g + lane / 4 < n) partials[warp * 64 + g + lane / 4] = sum;
        }
    }
    worker_sync();
    for (int u = threadIdx.x; u < n; u += WORKERS) {
        float y = 0.f;
#pragma unroll
        for (int w = 0; w < SLICES; ++w) y += partials[w * 64 + u];
        out[u] = y;
    }
}

// ---- tensor cores -----------------------------------------------------------

__device__ __forceinline__ void mma_bf16(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                         unsigned int a3, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Rows [0, n) (n_rows of them, any unit structure: a row is a row here) in
// tiles of 16, K split into CHUNKS ranges; `split` is the input vector as
// bf16 high parts and low parts, 16 bytes of each per 8 elements.
template <int K, int CHUNKS>
__device__ void project_tensor_cores(const unsigned char* rows, int stride, int n, const uint4* split, float* partials,
                                     float* out) {
    constexpr int PAIRS = K / 32;  // two MMAs (32 columns) a step
    const int tiles = (n + 15) / 16;
    const int items = tiles * CHUNKS;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    for (int item = warp; item < items; item += WORK_WARPS) {
        const int tile = item / CHUNKS, chunk = item % CHUNKS;
        const int u0 = min(tile * 16 + g, n - 1), u8 = min(tile * 16 + g + 8, n - 1);
        const unsigned char* row0 = rows + u0 * stride + q * 16;
        const unsigned char* row8 = rows + u8 * stride + q * 16;
        const int first = chunk * PAIRS / CHUNKS, last = (chunk + 1) * PAIRS / CHUNKS;
        float even[4] = {0.f, 0.f, 0.f, 0.f}, odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
        for (int j = first; j < last; ++j) {
            const uint4 r = *reinterpret_cast<const uint4*>(row0 + j * 64);
            const uint4 s = *reinterpret_cast<const uint4*>(row8 + j * 64);
            const uint4 v = g < 2 ? split[(4 * j + q) * 2 + g] : make_uint4(0u, 0u, 0u, 0u);
            mma_bf16(even, r.x, s.x, r.y, s.y, v.x, v.y);
            mma_bf16(odd, r.z, s.z, r.w, s.w, v.z, v.w);
        }
        if (q == 0) {  // columns 0 (high parts) and 1 (low parts)
            partials[item * 16 + g] = even[0] + even[1] + odd[0] + odd[1];
            partials[item * 16 + g + 8] = even[2] + even[3] + odd[2] + odd[3];
        }
    }
    worker_sync();
    for (int u = threadIdx.x; u < n; u += WORKERS) {
        const int tile = u / 16;
        float y = 0.f;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) y += partials[(tile * CHUNKS + c) * 16 + u % 16];
        out[u] = y;
    }
}

// ---- the probe kernel --------------------------------------------------------

enum Method { CUDA_CORES = 0, TENSOR_CORES = 1, SPLIT_K = 2 };
const char* const METHOD_NAMES[] = {"CUDA cores", "tensor cores", "split K"};
enum Shape { QKV = 0, GATE_UP = 1, O = 2, DOWN = 3 };
struct ShapeInfo {
    const char* name;
    int k, rows, at_once, rows_per_unit;
};
__host__ __device__ constexpr ShapeInfo shape_info(int shape) {
    return shape == QKV       ? ShapeInfo{"qkv", 1024, 31, 3, 1}
           : shape == GATE_UP ? ShapeInfo{"gate/up", 1024, 48, 2, 2}
           : shape == O       ? ShapeInfo{"o", 2048, 8, 1, 1}
                              : ShapeInfo{"down", 3072, 8, 1, 1};
}

template <int K, int AT_ONCE, int ROWS_PER_UNIT, int CHUNKS>
__device__ void run_phase(int method, const unsigned char* rows, int stride, int n_rows, const float* vec,
                          const uint4* split, float* partials, float* out) {
    if (method == CUDA_CORES)
        project_cuda_cores<K, AT_ONCE, ROWS_PER_UNIT>(rows, stride, n_rows / ROWS_PER_UNIT, vec, out);
    else if (method == TENSOR_CORES)
        project_tensor_cores<K, CHUNKS>(rows, stride, n_rows, split, partials, out);
    else
        project_split_k<K>(rows, stride, n_rows, vec, partials, out);
}

// Every block copies the same rows and vector from global memory into
// shared memory, then times REPEATS phases; block b's cycles go to
// cycles[b * REPEATS + r], its results (first block only) to `result`.
__global__ void __launch_bounds__(THREADS, 1)
    probe(int shape, int method, int stride, const bf16* weights, const float* x, long long* cycles, float* result) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* rows = smem;
    float* vec = reinterpret_cast<float*>(smem + ROWS_BYTES);          // 3072 floats, ProjectionLayout
    uint4* split = reinterpret_cast<uint4*>(vec + 3072);                // 3072 x 2 bf16
    float* partials = reinterpret_cast<float*>(split + 3072 * 2 / 8);   // up to 11 x 16 x 4
    float* out = partials + 16 * 64;
    const ShapeInfo s = shape_info(shape);
    for (int i = threadIdx.x; i < s.rows * s.k; i += THREADS) {
        const int row = i / s.k, col = i % s.k;
        reinterpret_cast<bf16*>(rows + row * stride)[col] = weights[i];
    }
    for (int i = threadIdx.x; i < s.k; i += THREADS) {
        vec[ProjectionLayout::at(i)] = x[i];
        bf16* halves = reinterpret_cast<bf16*>(split);
        const bf16 high = __float2bfloat16_rn(x[i]);
        halves[(i >> 3) * 16 + (i & 7)] = high;
        halves[(i >> 3) * 16 + (i & 7) + 8] = __float2bfloat16_rn(x[i] - __bfloat162float(high));
    }
    __syncthreads();
    if (threadIdx.x >= WORKERS) return;
    for (int r = 0; r < REPEATS; ++r) {
        worker_sync();
        const long long t0 = clock64();
        switch (shape) {
        case QKV: run_phase<1024, 3, 1, 5>(method, rows, stride, s.rows, vec, split, partials, out); break;
        case GATE_UP: run_phase<1024, 2, 2, 3>(method, rows, stride, s.rows, vec, split, partials, out); break;
        case O: run_phase<2048, 1, 1, 11>(method, rows, stride, s.rows, vec, split, partials, out); break;
        default: run_phase<3072, 1, 1, 11>(method, rows, stride, s.rows, vec, split, partials, out); break;
        }
        worker_sync();
        if (threadIdx.x == 0) cycles[blockIdx.x * REPEATS + r] = clock64() - t0;
    }
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < s.rows; i += WORKERS) result[i] = out[i];
}

int main() {
    int device = 0, sms = 0;
    CHECK(cudaGetDevice(&device));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, device));
    printf("%s, %d SMs; median SM cycles of one phase over %d blocks x %d repeats\n", prop.name, sms, sms, REPEATS);

    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    const int max_elems = 48 * 3072;
    std::vector<bf16> w(max_elems);
    std::vector<float> x(3072);
    for (auto& v : w) v = __float2bfloat16(normal(rng) * 0.02f);
    for (auto& v : x) v = normal(rng);
    bf16* d_w;
    float *d_x, *d_result;
    long long* d_cycles;
    CHECK(cudaMalloc(&d_w, max_elems * sizeof(bf16)));
    CHECK(cudaMalloc(&d_x, 3072 * sizeof(float)));
    CHECK(cudaMalloc(&d_result, 64 * sizeof(float)));
    CHECK(cudaMalloc(&d_cycles, (size_t)sms * REPEATS * sizeof(long long)));
    CHECK(cudaMemcpy(d_w, w.data(), w.size() * sizeof(bf16), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_x, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
    const int smem = ROWS_BYTES + 3072 * 4 + 3072 * 4 + 16 * 64 * 4 + 64 * 4;
    CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));

    printf("%-8s %-13s %-7s %8s %8s %12s\n", "shape", "method", "rows", "cycles", "us@1.98", "max rel err");
    for (int shape = 0; shape < 4; ++shape) {
        const ShapeInfo s = shape_info(shape);
        std::vector<double> truth(s.rows);
        double scale = 0;
        for (int r = 0; r < s.rows; ++r) {
            double acc = 0;
            for (int c = 0; c < s.k; ++c) acc += (double)__bfloat162float(w[r * s.k + c]) * x[c];
            truth[r] = acc;
            scale = std::max(scale, std::fabs(acc));
        }
        for (int method = 0; method < 3; ++method)
            for (int skewed = 0; skewed < 2; ++skewed) {
                if (method == SPLIT_K && (s.rows_per_unit != 1 || skewed)) continue;
                const int stride = s.k * 2 + (skewed ? 16 : 0);
                probe<<<sms, THREADS, smem>>>(shape, method, stride, d_w, d_x, d_cycles, d_result);
                CHECK(cudaGetLastError());
                CHECK(cudaDeviceSynchronize());
                std::vector<long long> cycles((size_t)sms * REPEATS);
                std::vector<float> result(s.rows);
                CHECK(cudaMemcpy(cycles.data(), d_cycles, cycles.size() * sizeof(long long), cudaMemcpyDeviceToHost));
                CHECK(cudaMemcpy(result.data(), d_result, s.rows * sizeof(float), cudaMemcpyDeviceToHost));
                std::vector<long long> warm;
                for (int b = 0; b < sms; ++b)
                    for (int r = 1; r < REPEATS; ++r) warm.push_back(cycles[(size_t)b * REPEATS + r]);
                std::nth_element(warm.begin(), warm.begin() + warm.size() / 2, warm.end());
                const long long median = warm[warm.size() / 2];
                double err = 0;
                for (int r = 0; r < s.rows; ++r) err = std::max(err, std::fabs(result[r] - truth[r]) / scale);
                printf("%-8s %-13s %-7s %8lld %8.3f %12.2e\n", s.name, METHOD_NAMES[method],
                       skewed ? "skewed" : "packed", median, median / 1980.0, err);
            }
    }
    return 0;
}
