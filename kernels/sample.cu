// Sampling the next token from the logits the LM head wrote, for
// `generate --sample`: temperature, top-k (at most SAMPLE_MAX_TOP_K), then
// top-p, in that order, as transformers' logits warpers apply them, and one
// uniform draw from a counter-based generator of (seed, position). The math
// of the choice is src/sampling.rs's, operation for operation, so the CPU
// and the GPU pick the same token from the same logits.
//
// Each block finds the top k of a slice of SAMPLE_SLICE logits (each warp
// the top k of its 128 by k rounds of a warp-wide max, then one warp the
// block's from the warps') and hands them on; the block that finishes last
// merges the blocks' lists the same way, picks the token and advances the
// token loop (token_loop.cuh) in the LM head's place.
#include "common.cuh"
#include "token_loop.cuh"

namespace qmk {

constexpr int THREADS = QMK_SAMPLE_THREADS;
constexpr int SLICE = QMK_SAMPLE_SLICE;            // logits a block takes
constexpr int MAX_TOP_K = QMK_SAMPLE_MAX_TOP_K;
constexpr int MAX_BLOCKS = QMK_SAMPLE_MAX_BLOCKS;  // so the vocabulary is at most SLICE x MAX_BLOCKS

struct SampleParams {
    const float* logits;             // vocab, this step's
    unsigned long long* candidates;  // gridDim.x x MAX_TOP_K keys
    unsigned int* blocks_done;       // zero between launches
    DecodeState* state;
    unsigned int* tokens;
    unsigned int* predicted;
    unsigned int* host_tokens;
    unsigned long long seed;
    unsigned int vocab;
    unsigned int context;
    unsigned int top_k;  // 1 .. MAX_TOP_K
    float temperature;   // > 0
    float top_p;         // (0, 1]
};

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The draw for position `pos`: 24 random bits as a float in [0, 1).
__device__ __forceinline__ float uniform(unsigned long long seed, unsigned int pos) {
    return (float)(splitmix64(seed ^ splitmix64(pos)) >> 40) * (1.0f / 16777216.0f);
}

// Keys of the slice each lane holds.
constexpr int PER_LANE = SLICE / THREADS;
static_assert(PER_LANE == 4, "a lane sorts its four keys with a five-step network");
// Lists a lane of the merging warp follows.
constexpr int LISTS_PER_LANE = MAX_BLOCKS / WARP;
static_assert(THREADS / WARP <= WARP && MAX_BLOCKS % WARP == 0, "");

__device__ __forceinline__ void order(unsigned long long& a, unsigned long long& b) {
    if (a < b) {
        const unsigned long long t = a;
        a = b;
        b = t;
    }
}

// The warp's k largest of its lanes' PER_LANE keys each, largest first, into
// out[0..k): k rounds of a warp-wide max over the lanes' largest remaining
// key, the lane that held it moving on to its next.
__device__ void warp_top_k(unsigned long long (&r)[PER_LANE], int k, unsigned long long* out) {
    order(r[0], r[1]);
    order(r[2], r[3]);
    order(r[0], r[2]);
    order(r[1], r[3]);
    order(r[1], r[2]);
    const int lane = threadIdx.x % WARP;
    for (int i = 0; i < k; ++i) {
        const unsigned long long best = warp_max_key(r[0]);
        if (lane == 0) out[i] = best;
        if (lane == __ffs(__ballot_sync(0xffffffffu, r[0] == best)) - 1) {
#pragma unroll
            for (int j = 0; j + 1 < PER_LANE; ++j) r[j] = r[j + 1];
            r[PER_LANE - 1] = 0ull;
        }
    }
}

// Run by one warp: the k largest keys of n lists (n <= MAX_BLOCKS) of k
// keys each, largest first, list l at lists + l * MAX_TOP_K, into
// out[0..k). Lane i follows lists i, i + 32, ...
__device__ void warp_merge(const unsigned long long* lists, int n, int k, unsigned long long* out) {
    const int lane = threadIdx.x % WARP;
    int next[LISTS_PER_LANE] = {};
    for (int i = 0; i < k; ++i) {
        unsigned long long mine = 0ull;
        int from = 0;
#pragma unroll
        for (int j = 0; j < LISTS_PER_LANE; ++j) {
            const int list = lane + j * WARP;
            const unsigned long long head = list < n && next[j] < k ? lists[list * MAX_TOP_K + next[j]] : 0ull;
            if (head > mine) {
                mine = head;
                from = j;
            }
        }
        const unsigned long long best = warp_max_key(mine);
        if (lane == 0) out[i] = best;
        if (lane == __ffs(__ballot_sync(0xffffffffu, mine == best)) - 1) {
#pragma unroll
            for (int j = 0; j < LISTS_PER_LANE; ++j) next[j] += j == from;
        }
    }
}

// The token drawn from the k best keys (largest first): softmax at the
// temperature, the smallest prefix whose mass reaches top_p (at least one
// token), and the first token whose running mass passes u times the kept
// mass. src/sampling.rs's `choose` is the same, step for step.
__device__ unsigned int choose(const unsigned long long* keys, int k, float temperature, float top_p, float u) {
    const float top = argmax_key_logit(keys[0]) / temperature;
    float total = 0.f;
    for (int i = 0; i < k; ++i) total += expf(argmax_key_logit(keys[i]) / temperature - top);
    float kept_mass = 0.f;
    int kept = 0;
    while (kept < k && (kept == 0 || kept_mass < top_p * total)) {
        kept_mass += expf(argmax_key_logit(keys[kept]) / temperature - top);
        ++kept;
    }
    const float target = u * kept_mass;
    float running = 0.f;
    for (int i = 0; i < kept; ++i) {
        running += expf(argmax_key_logit(keys[i]) / temperature - top);
        if (target < running) return argmax_key_id(keys[i]);
    }
    return argmax_key_id(keys[kept - 1]);
}

extern "C" __global__ void __launch_bounds__(THREADS) sample_token(const SampleParams p) {
    extern __shared__ unsigned long long lists[];  // MAX_BLOCKS lists of MAX_TOP_K keys
    __shared__ bool is_last;
    if (p.state->done) return;  // nobody writes `done` until every block has passed here

    // This block's slice: each warp its top k, then warp 0 the block's.
    const int k = (int)p.top_k;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    unsigned long long r[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        const int id = blockIdx.x * SLICE + warp * PER_LANE * WARP + j * WARP + lane;
        r[j] = id < (int)p.vocab ? argmax_key(__ldcg(p.logits + id), (unsigned int)id) : 0ull;  // 0: below all
    }
    warp_top_k(r, k, lists + warp * MAX_TOP_K);
    __syncthreads();
    if (warp == 0) warp_merge(lists, THREADS / WARP, k, p.candidates + blockIdx.x * MAX_TOP_K);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(p.blocks_done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;

    // The last block: the grid's top k from the blocks', then the draw.
    __threadfence();
    for (int i = threadIdx.x; i < (int)gridDim.x * MAX_TOP_K; i += THREADS)
        lists[i] = i % MAX_TOP_K < k ? __ldcg(p.candidates + i) : 0ull;
    __syncthreads();
    if (warp == 0) warp_merge(lists, gridDim.x, k, lists + MAX_BLOCKS * MAX_TOP_K);
    __syncthreads();
    if (threadIdx.x == 0) {
        const TokenLoop loop{p.state, p.tokens, p.predicted, p.host_tokens, p.context};
        const unsigned long long* best = lists + MAX_BLOCKS * MAX_TOP_K;
        const unsigned int token = choose(best, k, p.temperature, p.top_p, uniform(p.seed, p.state->pos));
        *p.blocks_done = 0;  // ready for the next launch
        loop.advance(token);
    }
}

}  // namespace qmk
