// Prefill attention on Hopper's warpgroup MMA (wgmma, sm_90a): each
// warpgroup (4 warps, 64 rows: one query head's 64 positions) multiplies
// with one instruction per 16-deep step, reading K and V straight from the
// swizzled shared tiles through matrix descriptors; Q and P stay in
// registers. Twice the mma.sync rate on H100, and no ldmatrix traffic. The
// block's loop is in prefill_attention.cuh; other targets compile an empty
// kernel that the host never launches (it picks this one on compute
// capability 9.0 only).
#include "prefill_attention.cuh"

namespace qmk {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor: start address, leading- and stride-
// dimension byte offsets (all in 16-byte units) and 128-byte swizzling.
__device__ __forceinline__ uint64_t matrix_descriptor(unsigned int addr, unsigned int leading_bytes,
                                                      unsigned int stride_bytes) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)(leading_bytes >> 4) << 16 |
           (uint64_t)(stride_bytes >> 4) << 32 | 1ull << 62;
}

// Keeps the compiler from moving reads or writes of accumulator registers
// across the asynchronous MMAs that own them.
template <int N>
__device__ __forceinline__ void pin_registers(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[i][e])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_and_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;" ::: "memory");
}

#define QMK_F4(a, i) "+f"(a[i][0]), "+f"(a[i][1]), "+f"(a[i][2]), "+f"(a[i][3])

// s (64 x 64 per warpgroup) += a (64 x 16, registers) * b^T, b 64 keys x 16
// dims, K-major in shared memory.
__device__ __forceinline__ void wgmma_scores(ScoreTile& s, const unsigned int (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : QMK_F4(s, 0), QMK_F4(s, 1), QMK_F4(s, 2), QMK_F4(s, 3),
          QMK_F4(s, 4), QMK_F4(s, 5), QMK_F4(s, 6), QMK_F4(s, 7)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// out (64 x 128 per warpgroup) += a (64 x 16, registers) * b, b 16 keys x
// 128 dims stored key-major ("transposed" for wgmma).
__device__ __forceinline__ void wgmma_values(OutputTile& out, const unsigned int (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : QMK_F4(out, 0), QMK_F4(out, 1), QMK_F4(out, 2), QMK_F4(out, 3),
          QMK_F4(out, 4), QMK_F4(out, 5), QMK_F4(out, 6), QMK_F4(out, 7),
          QMK_F4(out, 8), QMK_F4(out, 9), QMK_F4(out, 10), QMK_F4(out, 11),
          QMK_F4(out, 12), QMK_F4(out, 13), QMK_F4(out, 14), QMK_F4(out, 15)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

#undef QMK_F4

struct Wgmma {
    // The warpgroup computes every tile together.
    static constexpr bool SKIPS_WARPS = false;

    // wgmma reads shared memory through the async proxy; cp.async wrote it
    // through the generic one.
    static __device__ __forceinline__ void tiles_landed() {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }

    // K tile as B (keys x dims, dims contiguous: K-major). A 16-dim step is
    // 32 bytes into a 128-byte swizzled row; steps 4-7 are in the second
    // half. 8-key row groups are 1,024 bytes apart (the stride offset; a
    // swizzled K-major operand ignores the leading one).
    static __device__ __forceinline__ void scores(ScoreTile& s, const QueryFragments& q, unsigned int k_tile, int) {
        pin_registers(s);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks)
            wgmma_scores(s, q[ks], matrix_descriptor(k_tile + (ks / 4) * TILE_HALF_BYTES + (ks % 4) * 32, 16, 1024));
        wgmma_commit_and_wait();
        pin_registers(s);
    }

    // V tile as B (keys x dims, dims contiguous: MN-major). A 16-key step is
    // 2,048 bytes; the two 64-dim halves are TILE_HALF_BYTES apart (leading
    // offset), 8-key row groups 1,024 bytes (stride offset).
    static __device__ __forceinline__ void accumulate(OutputTile& out, const ProbFragments& p, unsigned int v_tile,
                                                      int) {
        pin_registers(out);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; ++kk)
            wgmma_values(out, p[kk], matrix_descriptor(v_tile + kk * 16 * 128, TILE_HALF_BYTES, 1024));
        wgmma_commit_and_wait();
        pin_registers(out);
    }
};

extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    prefill_attention_wgmma(const PrefillAttentionParams p) {
    attention_block<Wgmma>(p);
}

#else

extern "C" __global__ void prefill_attention_wgmma(const PrefillAttentionParams) { __trap(); }

#endif

}  // namespace qmk
