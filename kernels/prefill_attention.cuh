// Causal attention for batched prefill, flash-attention style: a block holds
// 64 query positions of both query heads of one KV head, streams that KV
// head's cached keys and values through shared memory in tiles of 64, and
// keeps the softmax online (running max and sum), so no positions x
// positions matrix ever exists.
//
// The block's loop is written once, here; the two matrix products of a tile
// (S = Q K^T and O += P V) come from a tensor-core back-end chosen per
// architecture: mma.sync (prefill_attention.cu, every target) or Hopper's
// warpgroup wgmma (prefill_attention_hopper.cu, sm_90a).
//
// The queries are rows [0, rows) of the chunk, at positions start_pos + row;
// the cache already holds every key up to start_pos + rows - 1 (earlier
// chunks and turns, and this chunk's own keys, written by
// prefill_qk_norm_rope), so a chunk that continues a cache attends to all of
// it. When a few query blocks face a long cache (a short turn after a long
// conversation), the keys are split among `splits` blocks (blockIdx.z) so
// the whole GPU streams them: each split leaves its unnormalised output and
// its running max and sum, and prefill_attention_merge (prefill.cu) combines
// them, flash-decoding style.
//
// Warp w owns query head 2 * kv_head + w / 4 and positions 16 * (w % 4) ..
// + 15 of the block, so warps 0-3 and 4-7 are the two warpgroups wgmma
// needs. In the fragment layouts (the same for mma.sync m16n8k16 and for a
// warp's quarter of wgmma m64nNk16) a lane holds rows lane / 4 and
// lane / 4 + 8 of its warp's 16, and two adjacent columns of every 8-column
// group.
#pragma once

#include "common.cuh"

namespace qmk {

constexpr int FA_QUERIES = QMK_PREFILL_ATTN_QUERIES;  // query positions per block
constexpr int FA_KEYS = QMK_PREFILL_ATTN_KEYS;        // keys per shared-memory tile
constexpr int FA_THREADS = QMK_PREFILL_ATTN_THREADS;
constexpr int FA_WARPS = FA_THREADS / WARP;
// Tiles t + 1 and t + 2 load while tile t is used: one barrier per tile.
constexpr int FA_STAGES = QMK_PREFILL_ATTN_STAGES;
constexpr int CHUNKS_PER_ROW = HEAD_DIM * 2 / 16;  // 16-byte chunks in one key's row
constexpr int TILE_ELEMS = FA_KEYS * HEAD_DIM;
// A tile is two halves of 64 head dims each: FA_KEYS rows of 128 bytes.
constexpr int TILE_HALF_BYTES = FA_KEYS * 128;
// K and V tiles of every stage: the dynamic shared memory the host sets.
constexpr int FA_SMEM_BYTES = FA_STAGES * 2 * TILE_ELEMS * 2;
static_assert(FA_WARPS / 4 == GQA_GROUP && FA_QUERIES == 4 * 16, "4 warps of 16 positions per query head");
static_assert(FA_SMEM_BYTES == QMK_PREFILL_ATTN_SMEM_BYTES, "the host sets this much dynamic shared memory");
static_assert(FA_KEYS % 16 == 0 && (FA_KEYS * CHUNKS_PER_ROW) % FA_THREADS == 0, "tile loads divide evenly");
static_assert(FA_SMEM_BYTES <= 99 * 1024, "must fit an RTX 5090's shared memory per block");

struct PrefillAttentionParams {
    const bf16* q;        // rows x NUM_Q_HEADS x HEAD_DIM (normalised, rotated)
    const bf16* k_cache;  // this layer: NUM_KV_HEADS x context x HEAD_DIM
    const bf16* v_cache;  // same layout
    bf16* out;            // rows x Q_DIM, when splits == 1
    // When splits > 1: splits x rows x NUM_Q_HEADS of HEAD_DIM unnormalised
    // outputs, and of (running max, sum).
    float* partial_out;
    float2* partial_max_sum;
    unsigned int rows;
    unsigned int start_pos;
    unsigned int context;
    // Key ranges (gridDim.z). The host picks them so that each one's first
    // tile holds a key every query attends to: every running max is finite.
    unsigned int splits;
};

// The tile layout is the one wgmma reads with 128-byte swizzling (and
// ldmatrix reads without bank conflicts): half h = chunk / 8 of a key's row
// holds its head dims 64h .. 64h + 63 in a 128-byte row, and 16-byte chunk
// c of row r sits at position c ^ (r % 8) of that row, so the 8 rows one
// access reads land in 8 different bank groups. Halves and tiles are
// multiples of 1,024 bytes, as the swizzle pattern requires.
__device__ __forceinline__ unsigned int tile_offset(int row, int chunk) {
    return (unsigned int)((chunk / 8) * TILE_HALF_BYTES + row * 128 + (((chunk % 8) ^ (row & 7)) * 16));
}

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

// Copies keys [first, first + FA_KEYS) of one head into a tile; keys past
// `end` are zero-filled (they are masked, and zeros keep 0 * garbage out of
// the P.V product).
__device__ __forceinline__ void load_tile_async(unsigned int tile_smem, const bf16* head, int first, int end) {
    constexpr int CHUNKS = FA_KEYS * CHUNKS_PER_ROW;
#pragma unroll
    for (int i = 0; i < CHUNKS / FA_THREADS; ++i) {
        const int c = threadIdx.x + i * FA_THREADS;
        const int row = c / CHUNKS_PER_ROW, chunk = c % CHUNKS_PER_ROW;
        const int key = first + row;
        const bool valid = key < end;
        const bf16* src = head + (size_t)(valid ? key : 0) * HEAD_DIM + chunk * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(tile_smem + tile_offset(row, chunk)),
                     "l"(src), "r"(valid ? 16 : 0)
                     : "memory");
    }
}

// 2^x by the special-function unit (relative error about 2^-22).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Scores of 16 rows x FA_KEYS keys per warp, P fragments, and the output
// accumulator of 16 rows x HEAD_DIM, in the fragment layout above.
typedef float ScoreTile[FA_KEYS / 8][4];
typedef unsigned int ProbFragments[FA_KEYS / 16][4];
typedef float OutputTile[HEAD_DIM / 8][4];
typedef unsigned int QueryFragments[HEAD_DIM / 16][4];

// The block's loop. TensorCores provides
//   SKIPS_WARPS: whether a warp may skip a tile on its own (mma.sync) or the
//                warpgroup computes together (wgmma);
//   tiles_landed(): what makes cp.async's writes visible to its reads;
//   scores(s, q, k_tile, lane): s = Q K^T for the warp's 16 rows;
//   accumulate(out, p, v_tile, lane): out += P V.
template <class TensorCores>
__device__ __forceinline__ void attention_block(const PrefillAttentionParams& p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    // Blocks start in grid order, x fastest: the KV heads of the latest
    // (longest) query block first, so the short blocks fill the tail.
    const int kv_head = blockIdx.x;
    const int query_block = gridDim.y - 1 - blockIdx.y;
    const int q_head = kv_head * GQA_GROUP + warp / 4;
    const int row0 = query_block * FA_QUERIES + (warp % 4) * 16 + lane / 4;  // and row0 + 8
    const int rows = (int)p.rows, start = (int)p.start_pos;
    const int keys_end = start + rows;  // the cache holds keys [0, keys_end)
    const int block_last_pos = start + min(query_block * FA_QUERIES + FA_QUERIES, rows) - 1;
    const int tiles = block_last_pos / FA_KEYS + 1;
    // This block's tiles: [t_begin, t_end) of them.
    const int split = blockIdx.z, splits = (int)p.splits;
    const int t_begin = split * tiles / splits, t_end = (split + 1) * tiles / splits;
    const int warp_first_pos = start + query_block * FA_QUERIES + (warp % 4) * 16;
    const int pos[2] = {start + row0, start + row0 + 8};

    const size_t head_base = (size_t)kv_head * p.context * HEAD_DIM;
    const bf16* k_head = p.k_cache + head_base;
    const bf16* v_head = p.v_cache + head_base;
    const unsigned int smem_base = smem_u32(smem);
    auto k_tile = [&](int stage) { return smem_base + stage * 2 * TILE_ELEMS * 2; };
    auto v_tile = [&](int stage) { return k_tile(stage) + TILE_ELEMS * 2; };

    // The first FA_STAGES - 1 tiles start loading; one commit group per
    // tile, empty past the last, so group counting is the same for every
    // block. Tile t_begin + i goes to stage i % FA_STAGES.
#pragma unroll
    for (int i = 0; i < FA_STAGES - 1; ++i) {
        if (t_begin + i < t_end) {
            load_tile_async(k_tile(i), k_head, (t_begin + i) * FA_KEYS, keys_end);
            load_tile_async(v_tile(i), v_head, (t_begin + i) * FA_KEYS, keys_end);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    }

    // This lane's query fragments for the 8 k-steps of 16 head dims.
    QueryFragments q_frag;
    {
        const bf16* q_rows[2];
#pragma unroll
        for (int h = 0; h < 2; ++h)
            q_rows[h] = p.q + ((size_t)min(row0 + 8 * h, rows - 1) * NUM_Q_HEADS + q_head) * HEAD_DIM;
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
            const int col = ks * 16 + (lane % 4) * 2;
            q_frag[ks][0] = *reinterpret_cast<const unsigned int*>(q_rows[0] + col);
            q_frag[ks][1] = *reinterpret_cast<const unsigned int*>(q_rows[1] + col);
            q_frag[ks][2] = *reinterpret_cast<const unsigned int*>(q_rows[0] + col + 8);
            q_frag[ks][3] = *reinterpret_cast<const unsigned int*>(q_rows[1] + col + 8);
        }
    }

    // Softmax in base 2: scores are scaled by log2(e) / sqrt(HEAD_DIM).
    const float scale = 1.4426950408889634f * rsqrtf((float)HEAD_DIM);
    OutputTile out = {};
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};  // this lane's share; the quad's lanes are summed at the end

    for (int i = 0; t_begin + i < t_end; ++i) {
        const int stage = i % FA_STAGES;
        // Tile i has landed (only the newer groups may be pending), and after
        // the barrier every warp is done with tile i - 1, whose stage the
        // load of tile i + FA_STAGES - 1 reuses.
        asm volatile("cp.async.wait_group %0;" ::"n"(FA_STAGES - 2) : "memory");
        TensorCores::tiles_landed();
        __syncthreads();
        const int next = t_begin + i + FA_STAGES - 1;
        if (next < t_end) {
            load_tile_async(k_tile((i + FA_STAGES - 1) % FA_STAGES), k_head, next * FA_KEYS, keys_end);
            load_tile_async(v_tile((i + FA_STAGES - 1) % FA_STAGES), v_head, next * FA_KEYS, keys_end);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");

        const int first_key = (t_begin + i) * FA_KEYS;
        // Every key of the tile after this warp's positions: nothing to add.
        if (TensorCores::SKIPS_WARPS && first_key > warp_first_pos + 15) continue;

        ScoreTile s = {};
        TensorCores::scores(s, q_frag, k_tile(stage), lane);
        // Causal mask, only on tiles that reach past this warp's first position.
        if (first_key + FA_KEYS - 1 > warp_first_pos) {
#pragma unroll
            for (int n = 0; n < FA_KEYS / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (first_key + n * 8 + (lane % 4) * 2 + (e & 1) > pos[e / 2]) s[n][e] = -INFINITY;
        }
        // Online softmax: new running max, rescale what came before. The
        // max stays finite: the split's first tile holds a key every row
        // attends to (key 0, in tile 0, when there is one split).
        float correction[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float m = -INFINITY;
#pragma unroll
            for (int n = 0; n < FA_KEYS / 8; ++n) m = fmaxf(m, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float new_max = fmaxf(row_max[h], m * scale);
            correction[h] = fast_exp2(row_max[h] - new_max);
            row_max[h] = new_max;
            row_sum[h] *= correction[h];
        }
#pragma unroll
        for (int d = 0; d < HEAD_DIM / 8; ++d) {
            out[d][0] *= correction[0];
            out[d][1] *= correction[0];
            out[d][2] *= correction[1];
            out[d][3] *= correction[1];
        }
        // P = exp2(S * scale - max), as bf16 A fragments of 16 keys each.
        ProbFragments p_frag;
#pragma unroll
        for (int n = 0; n < FA_KEYS / 8; ++n) {
            float e[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                e[i] = fast_exp2(s[n][i] * scale - row_max[i / 2]);
                row_sum[i / 2] += e[i];
            }
            p_frag[n / 2][(n % 2) * 2 + 0] = pack_bf16x2(e[0], e[1]);
            p_frag[n / 2][(n % 2) * 2 + 1] = pack_bf16x2(e[2], e[3]);
        }
        TensorCores::accumulate(out, p_frag, v_tile(stage), lane);
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
        const int row = row0 + 8 * h;
        if (row >= rows) continue;
        if (splits == 1) {
            const float inv = 1.f / row_sum[h];
            bf16* dst = p.out + (size_t)row * Q_DIM + q_head * HEAD_DIM + (lane % 4) * 2;
#pragma unroll
            for (int d = 0; d < HEAD_DIM / 8; ++d)
                *reinterpret_cast<unsigned int*>(dst + d * 8) =
                    pack_bf16x2(out[d][2 * h] * inv, out[d][2 * h + 1] * inv);
        } else {
            const size_t slot = ((size_t)split * rows + row) * NUM_Q_HEADS + q_head;
            float* dst = p.partial_out + slot * HEAD_DIM + (lane % 4) * 2;
#pragma unroll
            for (int d = 0; d < HEAD_DIM / 8; ++d)
                *reinterpret_cast<float2*>(dst + d * 8) = make_float2(out[d][2 * h], out[d][2 * h + 1]);
            if (lane % 4 == 0) p.partial_max_sum[slot] = make_float2(row_max[h], row_sum[h]);
        }
    }
}

}  // namespace qmk
