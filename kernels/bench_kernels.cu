// Helpers of `qwen-mk bench`: a random fill that gives the KV cache
// real-looking contents at long positions without decoding thousands of
// tokens first (timing on zeros can flatter a kernel), and a streaming read
// that measures the device's read bandwidth, the ceiling decode is held to.
#include "common.cuh"

namespace qmk {

__device__ __forceinline__ unsigned int hash32(unsigned long long x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (unsigned int)x;
}

extern "C" __global__ void fill_random_bf16(bf16* dst, unsigned long long n, unsigned int seed) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const float u = (float)(hash32(i ^ ((unsigned long long)seed << 40)) >> 8) * (1.0f / 8388608.0f);
        dst[i] = __float2bfloat16(u - 1.0f);
    }
}

// Reads `n` 16-byte words once each (streaming, like the weights in decode);
// the XOR of everything goes to `sink` so the reads cannot be optimised away.
extern "C" __global__ void read_bandwidth(const uint4* src, unsigned long long n, unsigned int* sink) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned int acc = 0;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = load_weights16(reinterpret_cast<const bf16*>(src + i));
        const uint4 b = load_weights16(reinterpret_cast<const bf16*>(src + i + stride));
        const uint4 c = load_weights16(reinterpret_cast<const bf16*>(src + i + 2 * stride));
        const uint4 d = load_weights16(reinterpret_cast<const bf16*>(src + i + 3 * stride));
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        const uint4 a = load_weights16(reinterpret_cast<const bf16*>(src + i));
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9e3779b9u) *sink = acc;  // practically never taken; keeps the loads live
}

}  // namespace qmk
