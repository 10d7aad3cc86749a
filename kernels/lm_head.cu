// The LM head of one decode step: final RMSNorm, the vocabulary GEMV, and
// the argmax over every row of the vocabulary (ties go to the lowest id, as
// torch.argmax). The block that finishes last reduces the per-block winners,
// records the token and advances the device-side token loop (token_loop.cuh),
// so the host never has to synchronise between steps. When sampling, it
// writes the logits and leaves the token to the sampler (sample.cu).
#include "common.cuh"
#include "token_loop.cuh"

namespace qmk {

constexpr int THREADS = QMK_LM_HEAD_THREADS;
constexpr int WARPS = THREADS / WARP;

struct LmHeadParams {
    const float* x;                // residual stream after the last layer, HIDDEN
    const bf16* final_norm;        // HIDDEN
    const bf16* head;              // vocab x HIDDEN (the embedding when tied)
    float* logits;                 // vocab, or null when not wanted
    unsigned long long* block_best;  // gridDim.x argmax keys
    unsigned int* blocks_done;     // zero between launches
    DecodeState* state;
    unsigned int* tokens;          // context + 1
    unsigned int* predicted;       // argmax at each position, context
    unsigned int* host_tokens;     // pinned, mapped host copy of `predicted`, or null
    unsigned int vocab;
    unsigned int context;
    float eps;
    unsigned int advance;          // 0: leave the token to the sampler (sample.cu)
};

extern "C" __global__ void __launch_bounds__(THREADS) lm_head(const LmHeadParams p) {
    __shared__ __align__(16) float normed[HIDDEN];
    __shared__ float scratch[WARPS];
    __shared__ unsigned long long warp_best[WARPS];
    __shared__ bool is_last;

    if (p.state->done) return;  // nobody writes `done` until every block has passed here

    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    constexpr int SLICES = HIDDEN / (8 * WARP);
    constexpr int R = 2;  // rows per warp at a time: 8 loads of 16 bytes in flight per lane
    int begin, end;
    split_range((int)p.vocab, blockIdx.x, gridDim.x, begin, end);
    rms_norm_to_shared<THREADS, HIDDEN>(CoherentF32{p.x}, p.final_norm, p.eps, normed, scratch);

    unsigned long long best = 0;  // below every real key
    for (int row = begin + warp * R; row < end; row += WARPS * R) {
        uint4 w[R][SLICES];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const bf16* src = p.head + (size_t)min(row + r, end - 1) * HIDDEN;
#pragma unroll
            for (int s = 0; s < SLICES; ++s) w[r][s] = load_weights16(src + (s * WARP + lane) * 8);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float acc = 0.f;
#pragma unroll
            for (int s = 0; s < SLICES; ++s) acc = dot8(w[r][s], normed + (s * WARP + lane) * 8, acc);
            const float logit = warp_sum(acc);
            if (row + r < end) {
                const unsigned long long key = argmax_key(logit, (unsigned int)(row + r));
                best = key > best ? key : best;
                if (p.logits && lane == 0) p.logits[row + r] = logit;
            }
        }
    }

    // Block winner, then the last block to finish picks the grid's winner.
    best = warp_max_key(best);
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long block = 0;
        for (int w = 0; w < WARPS; ++w) block = warp_best[w] > block ? warp_best[w] : block;
        p.block_best[blockIdx.x] = block;
        __threadfence();
        is_last = atomicAdd(p.blocks_done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    unsigned long long grid_best = 0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += THREADS) {
        const unsigned long long key = __ldcg(p.block_best + b);
        grid_best = key > grid_best ? key : grid_best;
    }
    grid_best = warp_max_key(grid_best);
    if (lane == 0) warp_best[warp] = grid_best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 0; w < WARPS; ++w) grid_best = warp_best[w] > grid_best ? warp_best[w] : grid_best;
        if (p.advance) TokenLoop{p.state, p.tokens, p.predicted, p.host_tokens, p.context}.advance(argmax_key_id(grid_best));
        *p.blocks_done = 0;  // ready for the next launch
    }
}

}  // namespace qmk
