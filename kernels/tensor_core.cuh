// Tensor-core helpers shared by prefill's and decode's attention: the
// swizzled layout of a tile of keys or values in shared memory, the
// ldmatrix loads that read it, and mma.sync m16n8k16 (bf16 in, f32
// accumulate). In the fragment layouts a lane holds rows lane / 4 and
// lane / 4 + 8 of an operand's 16, and two adjacent columns of every
// 8-column group (PTX ISA, "Matrix Fragments for mma.m16n8k16").
#pragma once

#include "common.cuh"

namespace qmk {

// A tile of keys (or values) is two halves of 64 head dims each: half
// h = chunk / 8 of a key's row holds its head dims 64h .. 64h + 63 in a row
// of 128 bytes, `half_bytes` apart, and 16-byte chunk c of row r sits at
// position c ^ (r % 8) of that row, so the 8 rows one ldmatrix reads land in
// 8 different bank groups (unswizzled, rows 128 or 256 bytes apart would all
// be on the same banks). It is the layout of the TMA's and wgmma's 128-byte
// swizzle: halves start on 1,024-byte boundaries, as its pattern requires.
__device__ __forceinline__ unsigned int swizzled_offset(int row, int chunk, int half_bytes) {
    return (unsigned int)((chunk / 8) * half_bytes + row * 128 + (((chunk % 8) ^ (row & 7)) * 16));
}

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

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

}  // namespace qmk
