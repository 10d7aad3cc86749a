// Sampling the next token from the logits the LM head wrote, for
// `generate --sample`: temperature, top-k (at most SAMPLE_MAX_TOP_K), then
// top-p, in that order, as transformers' logits warpers apply them, and one
// uniform draw from a counter-based generator of (seed, position). The math
// of the choice is src/sampling.rs's, operation for operation, so the CPU
// and the GPU pick the same token from the same logits.
//
// Each block sorts a slice of SAMPLE_SLICE logits in shared memory and
// hands on its top k; the block that finishes last sorts those, picks the
// token and advances the token loop (token_loop.cuh) in the LM head's place.
#include "common.cuh"
#include "token_loop.cuh"

namespace qmk {

constexpr int THREADS = QMK_SAMPLE_THREADS;
constexpr int SLICE = QMK_SAMPLE_SLICE;            // logits a block sorts
constexpr int MAX_TOP_K = QMK_SAMPLE_MAX_TOP_K;
constexpr int MAX_BLOCKS = QMK_SAMPLE_MAX_BLOCKS;  // so the vocabulary is at most SLICE x MAX_BLOCKS
constexpr int MERGED = MAX_BLOCKS * MAX_TOP_K;     // keys the last block sorts, at most
static_assert((SLICE & (SLICE - 1)) == 0 && (MERGED & (MERGED - 1)) == 0, "bitonic sorts of powers of two");

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

// The logit an argmax_key holds.
__device__ __forceinline__ float key_logit(unsigned long long key) {
    const unsigned int ordered = (unsigned int)(key >> 32);
    return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

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

// Sorts n keys (a power of two) in shared memory, largest first: a
// bitonic network, every thread of the block taking pairs in turn.
__device__ void sort_descending(unsigned long long* keys, int n) {
    for (int size = 2; size <= n; size *= 2)
        for (int stride = size / 2; stride > 0; stride /= 2) {
            for (int i = threadIdx.x; i < n / 2; i += THREADS) {
                const int lo = 2 * stride * (i / stride) + i % stride, hi = lo + stride;
                const bool descending = (lo & size) == 0;
                const unsigned long long a = keys[lo], b = keys[hi];
                if ((a < b) == descending) {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
}

// The token drawn from the k best keys (largest first): softmax at the
// temperature, the smallest prefix whose mass reaches top_p (at least one
// token), and the first token whose running mass passes u times the kept
// mass. src/sampling.rs's `choose` is the same, step for step.
__device__ unsigned int choose(const unsigned long long* keys, int k, float temperature, float top_p, float u) {
    const float top = key_logit(keys[0]) / temperature;
    float total = 0.f;
    for (int i = 0; i < k; ++i) total += expf(key_logit(keys[i]) / temperature - top);
    float kept_mass = 0.f;
    int kept = 0;
    while (kept < k && (kept == 0 || kept_mass < top_p * total)) {
        kept_mass += expf(key_logit(keys[kept]) / temperature - top);
        ++kept;
    }
    const float target = u * kept_mass;
    float running = 0.f;
    for (int i = 0; i < kept; ++i) {
        running += expf(key_logit(keys[i]) / temperature - top);
        if (target < running) return argmax_key_id(keys[i]);
    }
    return argmax_key_id(keys[kept - 1]);
}

extern "C" __global__ void __launch_bounds__(THREADS) sample_token(const SampleParams p) {
    extern __shared__ unsigned long long keys[];  // SLICE, then the last block's MERGED
    __shared__ bool is_last;
    if (p.state->done) return;  // nobody writes `done` until every block has passed here

    const int k = (int)p.top_k;
    const int begin = blockIdx.x * SLICE;
    for (int i = threadIdx.x; i < SLICE; i += THREADS) {
        const int id = begin + i;
        keys[i] = id < (int)p.vocab ? argmax_key(__ldcg(p.logits + id), (unsigned int)id) : 0ull;  // 0: below all
    }
    __syncthreads();
    sort_descending(keys, SLICE);
    for (int i = threadIdx.x; i < k; i += THREADS) p.candidates[blockIdx.x * MAX_TOP_K + i] = keys[i];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(p.blocks_done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    int n = 1;
    while (n < (int)gridDim.x * k) n *= 2;
    for (int i = threadIdx.x; i < n; i += THREADS)
        keys[i] = i < (int)gridDim.x * k ? __ldcg(p.candidates + (i / k) * MAX_TOP_K + i % k) : 0ull;
    __syncthreads();
    sort_descending(keys, n);
    if (threadIdx.x == 0) {
        const TokenLoop loop{p.state, p.tokens, p.predicted, p.host_tokens, p.context};
        const unsigned int token = choose(keys, k, p.temperature, p.top_p, uniform(p.seed, p.state->pos));
        *p.blocks_done = 0;  // ready for the next launch
        loop.advance(token);
    }
}

}  // namespace qmk
