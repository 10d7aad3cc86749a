// One decode step of Qwen3-0.6B, all 28 layers, in one persistent cooperative
// kernel. The grid is one block per SM (sized on the host from the device);
// each phase needs the whole output of the one before it:
//
//   per layer:  A  RMSNorm + fused QKV projection          -> qkv (f32)
//               B  q/k RMSNorm, RoPE, KV-cache append, attention over the
//                  cache split into chunks, merged by the last chunk's block
//                                                           -> attn (f32)
//               C  O projection + residual                 -> x (f32)
//               D  RMSNorm + gate/up projections, SiLU     -> mlp (f32)
//               E  down projection + residual              -> x (f32)
//
// The final RMSNorm and the vocabulary projection are the LM-head kernel's
// (lm_head.cu). The residual stream and all activations stay in f32; weights
// and the KV cache are bf16.
//
// There is no grid barrier. Every value a phase hands on is stored with a tag
// naming the launch, layer and phase that wrote it (TaggedVector, in
// decode_common.cuh); a reader loads the values it needs and reloads any
// whose tag is not yet the one it expects, so finding the data ready and
// reading it is one round trip.
//
// A block is one producer warp and CONSUMER_WARPS consumer warps. The
// producer streams the block's weight rows of every phase, and the cached
// keys and values of its attention chunk, into a ring of shared-memory
// slots (decode_stream_ring.cuh), running ahead through attention and the
// waits for inputs; the consumers run the phases above and read their rows
// from the ring. Consumers synchronise among themselves
// with a named barrier, never with __syncthreads, which would wait for the
// producer. Every phase ends in that barrier, after the block's results are
// stored: without it, the warps done first went on to poll for the next
// phase's inputs while the block's own results, which every other block
// waits for, were still being stored (the barriers made a step 4.7% faster
// at 0-255 on the H200, 3.1-5.5% elsewhere; RESULTS.md).
//
// This file holds the projections (A, C, D, E) and the kernel; attention
// (B) is decode_attention.cuh.
#include "common.cuh"
#include "decode_attention.cuh"
#include "decode_common.cuh"
#include "decode_stream_ring.cuh"

namespace qmk {

// Rows of the residual stream a block owns, at most (the host checks the
// grid: HIDDEN / blocks, rounded up, must not exceed it).
constexpr int RESIDUAL_MAX_ROWS = QMK_DECODE_RESIDUAL_MAX_ROWS;
// So the grid has at least NUM_KV_HEADS blocks: one attention task each at most.
static_assert(HIDDEN / RESIDUAL_MAX_ROWS >= NUM_KV_HEADS, "");

union SharedStorage {
    struct {
        float vec[HIDDEN];  // the normalised input of the QKV and gate/up projections
        // The inputs of the O and down projections, each split-K warp's
        // slice (ProjectionLayout within it). Beside vec, not over it: E's
        // warps fill theirs while D's slower warps may still read vec.
        float slices[INTERMEDIATE];
    } proj;
    AttentionShared attn;
};

// Units of projection P a warp takes at once. A warp's rows of K = HIDDEN
// are short dependent chains (load, 32 FMAs, 5 shuffles): taken one after
// another, a warp waits on each in turn; taken together they overlap. Rows
// of K = Q_DIM and INTERMEDIATE are long enough alone.
template <int P>
constexpr int UNITS_AT_ONCE = Streamed<P>::K == HIDDEN ? (SlotLayout<P>::PAIRED ? 2 : 3) : 1;

// One round of a warp in a projection phase: its J units u0 + j
// CONSUMER_WARPS (all of which exist), read from the ring and dotted with
// `vec` together.
template <int P, int J, typename Store>
__device__ __forceinline__ void project_round(const StreamRing& ring, int layer, const float* vec, long long& ring_wait,
                                              int u0, int begin, Store& store) {
    using S = Streamed<P>;
    using L = SlotLayout<P>;
    constexpr int ROWS = L::PAIRED ? 2 : 1;  // rows of a unit
    int uses[J];
#pragma unroll
    for (int j = 0; j < J; ++j) uses[j] = ring.slot_of<P>(layer, u0 + j * CONSUMER_WARPS);
    const long long t0 = clock64();
    ring.wait_all(uses);
    const unsigned char* rows[J * ROWS];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const unsigned char* row =
            ring.slot_data(uses[j]) + ((u0 + j * CONSUMER_WARPS) % L::PER_SLOT) * L::ROW_BYTES;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) rows[j * ROWS + r] = row + r * L::PAIRED_OFFSET;
    }
    ring_wait += clock64() - t0;
    float y[J * ROWS];
    rows_dot<S::K>(rows, vec, y);
    __syncwarp();  // every lane has read the rows
    if (threadIdx.x % WARP == 0) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
            ring.release(uses[j], L::UNIT_UNITS);
            float unit_y[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) unit_y[r] = y[j * ROWS + r];
            store(begin + u0 + j * CONSUMER_WARPS, unit_y);
        }
    }
}

// A warp's round of J units, or of `left` of them where it has fewer left:
// the warp's last round takes only the units that remain.
template <int P, int J, typename Store>
__device__ __forceinline__ void project_round_upto(int left, const StreamRing& ring, int layer, const float* vec,
                                                   long long& ring_wait, int u0, int begin, Store& store) {
    if constexpr (J > 1) {
        if (left < J) return project_round_upto<P, J - 1>(left, ring, layer, vec, ring_wait, u0, begin, store);
    }
    project_round<P, J>(ring, layer, vec, ring_wait, u0, begin, store);
}

// A projection phase: the block's units of projection P, read from the
// ring, dotted with `vec`; consumer warps take units in turn, up to
// UNITS_AT_ONCE at a time. A warp's last round takes only the units it has
// left: it used to repeat a unit's rows for results it threw away, and the
// warps that did were the phase's slowest (H200: -0.5 to -0.9% a step,
// RESULTS.md). `store(unit, y)` runs on lane 0 with the unit's one (or,
// gate/up, two) results. `ring_wait` gathers the cycles thread 0 waits for
// rows (bench --profile).
template <int P, typename Store>
__device__ __forceinline__ void project(const StreamRing& ring, int layer, const float* vec, long long& ring_wait,
                                        Store store) {
    constexpr int AT_ONCE = UNITS_AT_ONCE<P>;
    int begin, end;
    StreamRing::block_units<P>(begin, end);
    const int n = end - begin;
    const int warp = threadIdx.x / WARP;
    for (int u0 = warp; u0 < n; u0 += CONSUMER_WARPS * AT_ONCE) {
        const int left = (n - u0 + CONSUMER_WARPS - 1) / CONSUMER_WARPS;  // the same in every lane
        project_round_upto<P, AT_ONCE>(left, ring, layer, vec, ring_wait, u0, begin, store);
    }
}

// The O and down projections (K = Q_DIM, INTERMEDIATE) have few rows a
// block (HIDDEN / blocks: 7-8 on 132 SMs), and long ones. Taken a row a
// warp, each of 8 warps needed the whole input vector for its one row.
// Split by K instead, each warp takes a slice of the input (256 elements, or
// 512 where 256 would need more slices than there are warps) for every row
// of the block, eight rows at a time, and the slices' sums meet in shared
// memory. So a warp needs only its slice of the handed-on vector, and can
// start when that has arrived, whatever the other slices' writers are doing
// (H200: -3.4% per token at 0-255 with project_split_k below, RESULTS.md).
template <int P>
struct SplitK {
    static constexpr int K = Streamed<P>::K;
    static constexpr int STEPS = K / (8 * WARP) <= CONSUMER_WARPS ? 1 : 2;  // 256 elements each
    static constexpr int SLICES = K / (8 * WARP * STEPS);
    static constexpr int ROWS_AT_ONCE = 8;  // warp_sum8_transposed's
    // Slots a group of ROWS_AT_ONCE rows may lie in.
    static constexpr int GROUP_SLOTS = (ROWS_AT_ONCE - 1) / SlotLayout<P>::PER_SLOT + 2;
    static_assert(K % (8 * WARP * STEPS) == 0 && SLICES <= CONSUMER_WARPS && !SlotLayout<P>::PAIRED, "");
};
constexpr int SPLIT_K_MAX_SLICES = 8;
static_assert(SplitK<O_PROJ>::SLICES <= SPLIT_K_MAX_SLICES && SplitK<DOWN_PROJ>::SLICES <= SPLIT_K_MAX_SLICES, "");
typedef float SplitKPartials[SPLIT_K_MAX_SLICES][RESIDUAL_MAX_ROWS];

// Projection P split by K (SplitK). Each warp reads its own slice of the
// handed-on input (coalesced, into its part of `slices`) and starts once
// that slice has arrived: no block-wide gather of the whole vector, no
// barrier before the phase. `inputs_ready()` runs once warp 0's slice is in
// (bench --profile); `store(unit, y)` runs on one consumer thread per unit,
// after the block's sums are complete.
template <int P, typename InputsReady, typename Store>
__device__ __forceinline__ void project_split_k(const StreamRing& ring, int layer, const TaggedVector& input,
                                                float* slices, SplitKPartials& partial, long long& ring_wait,
                                                InputsReady inputs_ready, Store store) {
    using L = SlotLayout<P>;
    using KS = SplitK<P>;
    int begin, end;
    StreamRing::block_units<P>(begin, end);
    const int n = end - begin;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (warp < KS::SLICES) {
        constexpr int SLICE = KS::STEPS * 8 * WARP;  // elements
        const int base = warp * SLICE;
        float* slice = slices + base;
        unsigned long long words[SLICE / WARP];
#pragma unroll
        for (int k = 0; k < SLICE / WARP; ++k) words[k] = input.load(base + k * WARP + lane);
        await_all(input, words, [&](int k) { return base + k * WARP + lane; });
        inputs_ready();
#pragma unroll
        for (int k = 0; k < SLICE / WARP; ++k) slice[ProjectionLayout::at(k * WARP + lane)] = input.value(words[k]);
        __syncwarp();
        // This lane's 8 elements of each step of the slice, as rows_dot reads them.
        const int first = (lane >> 2 & 1) * 4;
        int at[KS::STEPS];
        float4 lo[KS::STEPS], hi[KS::STEPS];
#pragma unroll
        for (int s = 0; s < KS::STEPS; ++s) {
            const int in_slice = (s * WARP + lane) * 8;
            at[s] = base + in_slice;
            lo[s] = *reinterpret_cast<const float4*>(slice + in_slice + first);
            hi[s] = *reinterpret_cast<const float4*>(slice + in_slice + 4 - first);
        }
        for (int g = 0; g < n; g += KS::ROWS_AT_ONCE) {
            const int last = min(g + KS::ROWS_AT_ONCE, n) - 1;
            const int first_use = ring.slot_of<P>(layer, g), last_use = ring.slot_of<P>(layer, last);
            int uses[KS::GROUP_SLOTS];
#pragma unroll
            for (int j = 0; j < KS::GROUP_SLOTS; ++j) uses[j] = min(first_use + j, last_use);
            const long long t0 = clock64();
            ring.wait_all(uses);
            ring_wait += clock64() - t0;
            float y[KS::ROWS_AT_ONCE];
#pragma unroll
            for (int r = 0; r < KS::ROWS_AT_ONCE; ++r) {
                const int u = min(g + r, last);  // past the last row: the last again, unused
                const unsigned char* row = ring.slot_data(ring.slot_of<P>(layer, u)) + (u % L::PER_SLOT) * L::ROW_BYTES;
                y[r] = 0.f;
#pragma unroll
                for (int s = 0; s < KS::STEPS; ++s)
                    y[r] = dot8(*reinterpret_cast<const uint4*>(row + at[s] * (int)sizeof(bf16)), lo[s], hi[s], y[r]);
            }
            const float sum = warp_sum8_transposed(y);
            if (lane % 4 == 0 && g + lane / 4 <= last) partial[warp][g + lane / 4] = sum;
        }
    }
    // Every slice summed, every row read: only now are the rows given back
    // to the ring, so a block's rows of P must fit it at once (the host's
    // grid check, src/gpu/decoder/grid.rs; released a group at a time
    // instead, a step was 0.2-0.9% slower, RESULTS.md).
    consumer_sync();
    for (int u = threadIdx.x; u < n; u += CONSUMERS) {
        float y[1] = {0.f};
#pragma unroll
        for (int w = 0; w < KS::SLICES; ++w) y[0] += partial[w][u];
        ring.release(ring.slot_of<P>(layer, u), L::UNIT_UNITS);
        store(begin + u, y);
    }
}

// ---- the kernel ------------------------------------------------------------------


extern "C" __global__ void __launch_bounds__(THREADS, 1) decode_step(const DecodeParams p) {
    __shared__ __align__(16) SharedStorage sm;
    __shared__ float scratch[CONSUMER_WARPS];
    __shared__ unsigned long long ring_barriers[2 * RING_MAX_SLOTS];
    __shared__ int ring_armed[RING_MAX_SLOTS];
    __shared__ int ring_tiles_layer;
    __shared__ AttentionTask block_task;
    __shared__ float residual[RESIDUAL_MAX_ROWS];  // this block's rows of x (see below)
    __shared__ SplitKPartials split_partials;
    __shared__ unsigned int first_tag;
    extern __shared__ __align__(128) unsigned char ring_storage[];

    const DecodeState* state = p.state;
    if (state->done) return;  // every block reads the same flag: nobody writes it during this launch

    const int pos = (int)state->pos;
    const AttentionTask task = AttentionTask::of_block(pos, blockIdx.x, gridDim.x);
    if (threadIdx.x == 0) block_task = task;  // attention reads it there in every layer
    const StreamRing ring(ring_storage, ring_barriers, ring_armed, &ring_tiles_layer, (int)p.ring_slots,
                          kv_tiles(task, pos));  // ends in __syncthreads
    if (threadIdx.x / WARP == PRODUCER_WARP) {
        if (threadIdx.x % WARP == 0) {
            const bool profiled = p.phase_times != nullptr && blockIdx.x == 0;
            ring.produce(p, task, pos, profiled ? profile_clocks(p) : nullptr);
        }
        return;
    }
    // This launch's number in the sequence: every block adds one arrival, and
    // all of the previous launch's are in before this one starts. Nothing
    // waits for the answer until layer 0's first handoff.
    unsigned long long arrivals_before = 0;
    if (threadIdx.x == 0) arrivals_before = atomicAdd(p.launches, 1ull);

    const bf16* embedding = p.embed + (size_t)p.tokens[pos] * HIDDEN;
    // The O and the down projections split the rows of x alike, so the rows
    // a block adds to in E are the ones it wrote in C: it keeps them in
    // shared memory instead of reading them back.
    static_assert(Streamed<O_PROJ>::UNITS == HIDDEN && Streamed<DOWN_PROJ>::UNITS == HIDDEN, "");
    int own_begin, own_end;
    StreamRing::block_units<O_PROJ>(own_begin, own_end);
    const Handoffs handoffs{&p, &first_tag};
    // C and E: row `row` of x becomes `before` + `y`, kept and handed on.
    auto add_to_residual = [&](int row, float before, float y, const TaggedVector& out) {
        const float x = before + y;
        residual[row - own_begin] = x;
        out.store(row, x);
        return x;
    };
    stamp_phase(p, -1, 0, PHASE_DONE);
    const long long start = clock64();
    long long ring_wait = 0;

    for (int layer = 0; layer < NUM_LAYERS; ++layer) {
        // The residual stream of layer 0 is the token's embedding row.
        const bool first = layer == 0;
        const bool last = layer + 1 == NUM_LAYERS;
        // A: RMSNorm + QKV projection.
        if (first) {
            rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync, ProjectionLayout>(
                Bf16Row{embedding}, layer_weights(p, layer, QMK_OFF_INPUT_NORM), p.eps, sm.proj.vec, scratch);
            if (threadIdx.x == 0) first_tag = (unsigned int)(arrivals_before / gridDim.x) * (HANDOFFS * NUM_LAYERS) + 1;
            consumer_sync();
        } else {
            rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync, ProjectionLayout>(
                handoffs.at(layer - 1, X_AFTER_MLP), layer_weights(p, layer, QMK_OFF_INPUT_NORM), p.eps, sm.proj.vec,
                scratch);
        }
        stamp_phase(p, layer, 0, INPUTS_READY);
        const TaggedVector qkv = handoffs.at(layer, QKV_OUT), attn = handoffs.at(layer, ATTN_OUT);
        const TaggedVector x_mid = handoffs.at(layer, X_AFTER_ATTN), mlp = handoffs.at(layer, MLP_OUT);
        const TaggedVector x_out = handoffs.at(layer, X_AFTER_MLP);
        project<QKV_PROJ>(ring, layer, sm.proj.vec, ring_wait, [&](int row, const float (&y)[1]) { qkv.store(row, y[0]); });
        consumer_sync();  // also: the attention scratch shares shared memory with sm.proj.vec
        stamp_phase(p, layer, 0, PHASE_DONE);

        // B: attention (the producer streams the next phases' rows
        // meanwhile). It ends in a consumer barrier where it has work.
        attention_phase(p, ring, qkv, attn, block_task, layer, pos, sm.attn);
        stamp_phase(p, layer, 1, PHASE_DONE);

        // C: O projection + residual. Its warps' slices overwrite the
        // attention scratch, which every warp is done with (attention_phase
        // ends in a consumer barrier).
        project_split_k<O_PROJ>(
            ring, layer, attn, sm.proj.slices, split_partials, ring_wait,
            [&] { stamp_phase(p, layer, 2, INPUTS_READY); },
            [&](int row, const float (&y)[1]) {
                add_to_residual(row, first ? bf16_to_f32(embedding[row]) : residual[row - own_begin], y[0], x_mid);
            });
        consumer_sync();
        stamp_phase(p, layer, 2, PHASE_DONE);

        // D: RMSNorm + gate/up + SiLU (its first consumer barrier comes
        // before it writes sm.proj.vec).
        rms_norm_to_shared<CONSUMERS, HIDDEN, ConsumerSync, ProjectionLayout>(
            x_mid, layer_weights(p, layer, QMK_OFF_POST_ATTN_NORM), p.eps, sm.proj.vec, scratch);
        stamp_phase(p, layer, 3, INPUTS_READY);
        project<GATE_UP_PROJ>(ring, layer, sm.proj.vec, ring_wait,
                              [&](int j, const float (&gu)[2]) { mlp.store(j, gu[0] / (1.f + __expf(-gu[0])) * gu[1]); });
        consumer_sync();
        stamp_phase(p, layer, 3, PHASE_DONE);

        // E: down projection + residual.
        project_split_k<DOWN_PROJ>(
            ring, layer, mlp, sm.proj.slices, split_partials, ring_wait,
            [&] { stamp_phase(p, layer, 4, INPUTS_READY); },
            [&](int row, const float (&y)[1]) {
                const float x = add_to_residual(row, residual[row - own_begin], y[0], x_out);
                if (last) p.x[row] = x;  // the LM head's input (the launch's end orders it)
            });
        consumer_sync();
        stamp_phase(p, layer, 4, PHASE_DONE);
    }
    if (p.phase_times != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
        profile_clocks(p)[3] = clock64() - start;
        profile_clocks(p)[4] = ring_wait;
    }
}

}  // namespace qmk
