// Prefill attention on mma.sync (m16n8k16, bf16 in, f32 accumulate): every
// target, and the RTX 5090's path. Each warp multiplies its own 16 rows,
// reading K and V fragments from the shared tiles with ldmatrix. The
// block's loop is in prefill_attention.cuh.
#include "prefill_attention.cuh"

namespace qmk {

__device__ __forceinline__ void ldmatrix_x4(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int addr, unsigned int (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a (16x16, row) * b (16x8, col).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                         unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct MmaSync {
    static constexpr bool SKIPS_WARPS = true;

    // cp.async and ldmatrix are both generic-proxy accesses: the barrier
    // alone orders them.
    static __device__ __forceinline__ void tiles_landed() {}

    static __device__ __forceinline__ void scores(ScoreTile& s, const QueryFragments& q, unsigned int k_tile,
                                                  int lane) {
#pragma unroll
        for (int n = 0; n < FA_KEYS / 8; ++n) {
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 32; ++j) {
                // b0, b1 of k-steps 2j and 2j + 1 for keys 8n .. 8n + 7.
                unsigned int b[4];
                ldmatrix_x4(k_tile + tile_offset(n * 8 + lane % 8, 4 * j + lane / 8), b);
                mma_bf16(s[n], q[2 * j], b[0], b[1]);
                mma_bf16(s[n], q[2 * j + 1], b[2], b[3]);
            }
        }
    }

    // V tiles are [key][dim]: read transposed.
    static __device__ __forceinline__ void accumulate(OutputTile& out, const ProbFragments& p,
                                                      unsigned int v_tile, int lane) {
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < HEAD_DIM / 16; ++j) {
                unsigned int b[4];
                const int key = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                ldmatrix_x4_trans(v_tile + tile_offset(key, 2 * j + lane / 16), b);
                mma_bf16(out[2 * j], p[kk], b[0], b[1]);
                mma_bf16(out[2 * j + 1], p[kk], b[2], b[3]);
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    prefill_attention(const PrefillAttentionParams p) {
    attention_block<MmaSync>(p);
}

}  // namespace qmk
