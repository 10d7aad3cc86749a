// The decode kernel's stream: every block's share of every projection of
// every layer, and the cached keys and values of its attention chunk,
// copied into a ring of shared-memory slots by one producer thread, in the
// order the phases read them, while the other warps compute.
//
// Weights never depend on activations, and the cached keys and values were
// written by earlier steps, so the copies can run ahead through attention
// and through the waits for other blocks, as far as the ring reaches (a
// block's share of a layer's weights is about 240 KB on a 132-SM H100, the
// ring up to 192 KB). The producer keeps only a few slots in flight at once:
// the memory probe (benches/memory_probe.cu) measured that about 36 KB in
// flight per SM reaches full bandwidth, and that more only lengthens the
// round trips of the latency-bound loads every phase also makes (5 us at
// 192 KB in flight). It does ask L2 for each slot's bytes before it waits
// to copy them (a bulk prefetch, which needs neither a slot nor a barrier):
// with one copy in flight, the next one then comes from L2 instead of HBM
// (measured on the H100: -2.5% per token at short context, -5% at 4,096;
// prefetching two slots ahead was slower than one). Only the attention
// tiles copied several at a time go without it.
//
// This stream, not the handoffs, is what a short-context layer takes: a
// diagnostic build whose handoffs cost nothing is only 2% faster, and 8%
// with two copies in flight; but with the real handoffs two copies make a
// step 3-9% slower, because copies in flight on any SM lengthen the L2
// round trips a handoff is made of (H200, RESULTS.md, session 22).
//
// Each slot has two mbarriers: `full` completes when the slot's copy has
// landed (transaction bytes), `empty` when the consumers have read it
// (RING_SLOT_UNITS arrivals, one per 2 KB of rows), and a word saying which
// use of the ring it is armed for. A consumer warp may wait for a use up to
// a whole ring ahead of the last one it read (warps take units in turn), but
// an mbarrier's parity only tells a phase from the next: so it first waits
// until the producer has armed the slot for that use, which the producer
// does only once the slot's previous use has landed and been read.
//
// A slot holds whole rows of one projection, or one tile of keys and
// values; a block's last slot of a projection may be partly used, and the
// producer arrives for the unused part itself.
#pragma once

#include "decode_common.cuh"

namespace qmk {

// A slot is 12 KB: 6 rows of K = HIDDEN (QKV), 3 of K = Q_DIM (O), 3 gate/up
// row pairs, or 2 rows of K = INTERMEDIATE (down).
constexpr int RING_UNIT_BYTES = HIDDEN * (int)sizeof(bf16);
constexpr int RING_SLOT_UNITS = QMK_RING_SLOT_BYTES / RING_UNIT_BYTES;
constexpr int RING_SLOT_BYTES = RING_SLOT_UNITS * RING_UNIT_BYTES;
constexpr int RING_MAX_SLOTS = QMK_RING_MAX_SLOTS;
static_assert(RING_SLOT_BYTES == QMK_RING_SLOT_BYTES, "a slot is a whole number of 2 KB units");

// A tile of attention keys: a slot's first half holds up to KV_TILE cached
// keys of a chunk, one 256-byte row each, its second half their values.
constexpr int KV_ROW_BYTES = HEAD_DIM * (int)sizeof(bf16);
constexpr int KV_TILE = RING_SLOT_BYTES / 2 / KV_ROW_BYTES;
constexpr int KV_VALUES_OFFSET = RING_SLOT_BYTES / 2;
static_assert(KV_TILE == QMK_DECODE_KV_TILE, "src/kernel_dims.rs counts tiles of DECODE_KV_TILE positions");
static_assert(KV_TILE >= 4 && KV_TILE % 4 == 0 && KV_TILE <= WARP,
              "attention scores a tile four keys at a time, then softmaxes it a lane per key");

// Tiles of this block's attention chunk in every layer of a step at `pos`.
__device__ __forceinline__ int kv_tiles(const AttentionTask& task, int pos) {
    return task.exists() ? (max(task.cached_end(pos) - task.begin, 0) + KV_TILE - 1) / KV_TILE : 0;
}

// The four projections of a layer, in the order the phases read them.
enum Projection { QKV_PROJ = 0, O_PROJ = 1, GATE_UP_PROJ = 2, DOWN_PROJ = 3, NUM_PROJECTIONS = 4 };

// How one projection's rows travel: `units` work units, each a row of K
// columns (gate/up: the gate row and the up row of one neuron).
template <int P>
struct Streamed;
template <>
struct Streamed<QKV_PROJ> {
    static constexpr int K = HIDDEN, UNITS = QKV_ROWS, WEIGHTS = QMK_OFF_QKV, PAIRED = -1;
};
template <>
struct Streamed<O_PROJ> {
    static constexpr int K = Q_DIM, UNITS = HIDDEN, WEIGHTS = QMK_OFF_O, PAIRED = -1;
};
template <>
struct Streamed<GATE_UP_PROJ> {
    static constexpr int K = HIDDEN, UNITS = INTERMEDIATE, WEIGHTS = QMK_OFF_GATE, PAIRED = QMK_OFF_UP;
};
template <>
struct Streamed<DOWN_PROJ> {
    static constexpr int K = INTERMEDIATE, UNITS = HIDDEN, WEIGHTS = QMK_OFF_DOWN, PAIRED = -1;
};

// Layout of projection P's units in a slot: the rows of its first matrix,
// then (gate/up) the paired rows from half way.
template <int P>
struct SlotLayout {
    static constexpr int ROW_BYTES = Streamed<P>::K * (int)sizeof(bf16);
    static constexpr int ROW_UNITS = ROW_BYTES / RING_UNIT_BYTES;  // 2 KB units a row occupies
    static constexpr bool PAIRED = Streamed<P>::PAIRED >= 0;
    static constexpr int UNIT_UNITS = ROW_UNITS * (PAIRED ? 2 : 1);
    static constexpr int PER_SLOT = RING_SLOT_UNITS / UNIT_UNITS;  // work units a slot holds
    static constexpr int PAIRED_OFFSET = PER_SLOT * ROW_BYTES;     // bytes
    static_assert(ROW_BYTES % RING_UNIT_BYTES == 0, "rows are whole 2 KB units");
    static_assert(PER_SLOT >= 1 && RING_SLOT_UNITS % UNIT_UNITS == 0, "a slot holds whole work units");
};

__device__ __forceinline__ unsigned int smem_address(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbarrier_wait(const unsigned long long* bar, unsigned int parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(smem_address(bar)),
        "r"(parity)
        : "memory");
}

// Whether the phase of parity `parity` of the mbarrier `bar` has completed
// (without waiting; acquire, as mbarrier_wait).
__device__ __forceinline__ bool mbarrier_test(const unsigned long long* bar, unsigned int parity) {
    unsigned int done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// The ring's slot count where every GPU of the architecture gives a block
// the same shared memory (src/kernel_dims.rs): a use's slot and lap are then
// a mask and a shift, or a multiply, not divisions by a run-time count,
// which cost 4% of a step on the H200. Elsewhere 0: the host's count.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr int RING_FIXED_SLOTS = QMK_RING_SLOTS_SM90;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 1200
constexpr int RING_FIXED_SLOTS = QMK_RING_SLOTS_SM120;
#else
constexpr int RING_FIXED_SLOTS = 0;
#endif
static_assert(RING_FIXED_SLOTS <= RING_MAX_SLOTS, "");

struct StreamRing {
    unsigned char* storage;     // n_slots x RING_SLOT_BYTES of dynamic shared memory
    unsigned long long* full;   // n_slots mbarriers
    unsigned long long* empty;  // n_slots mbarriers
    volatile int* armed;        // n_slots: the use each slot's `full` now counts
    volatile int* tiles_layer;  // the layer whose attention tiles the consumers now read (-1: none yet)
    int n_slots;
    int slots_per_layer;           // this block's, the same in every layer
    int first_slot[NUM_PROJECTIONS];  // of each projection within a layer
    int first_kv_slot, n_kv_tiles;    // the attention chunk's tiles, between QKV and O

    // Called by every thread of the block; ends in __syncthreads, after
    // which the producer warp and the consumer warps part. `kv_tiles_` is
    // kv_tiles() of the block's attention task.
    __device__ StreamRing(unsigned char* storage_, unsigned long long* barriers, int* armed_, int* tiles_layer_,
                          int n_slots_, int kv_tiles_)
        : storage(storage_),
          full(barriers),
          empty(barriers + RING_MAX_SLOTS),
          armed(armed_),
          tiles_layer(tiles_layer_),
          n_slots(n_slots_) {
        // A compiled-in count the launch does not match would use shared
        // memory the block does not have: fail the launch instead (the host
        // checks it first, in ring_slots, src/gpu/decoder.rs).
        if (RING_FIXED_SLOTS != 0 && n_slots != RING_FIXED_SLOTS) __trap();
        slots_per_layer = 0;
        first_slot[QKV_PROJ] = slots_per_layer;
        slots_per_layer += projection_slots<QKV_PROJ>();
        first_kv_slot = slots_per_layer;
        n_kv_tiles = kv_tiles_;
        slots_per_layer += n_kv_tiles;
        first_slot[O_PROJ] = slots_per_layer;
        slots_per_layer += projection_slots<O_PROJ>();
        first_slot[GATE_UP_PROJ] = slots_per_layer;
        slots_per_layer += projection_slots<GATE_UP_PROJ>();
        first_slot[DOWN_PROJ] = slots_per_layer;
        slots_per_layer += projection_slots<DOWN_PROJ>();
        if (threadIdx.x == 0) {
            *tiles_layer = -1;
            for (int s = 0; s < n_slots; ++s) {
                armed[s] = -1;
                asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(full + s)) : "memory");
                asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(empty + s)),
                             "r"(RING_SLOT_UNITS)
                             : "memory");
            }
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
    }

    // This block's units of projection P: a balanced contiguous range.
    template <int P>
    static __device__ void block_units(int& begin, int& end) {
        split_range(Streamed<P>::UNITS, blockIdx.x, gridDim.x, begin, end);
    }

    template <int P>
    static __device__ int projection_slots() {
        int begin, end;
        block_units<P>(begin, end);
        return (end - begin + SlotLayout<P>::PER_SLOT - 1) / SlotLayout<P>::PER_SLOT;
    }

    // Slot of use `index` of the ring, and how many times round it is.
    __device__ int slot(int index) const { return (int)((unsigned int)index % slot_count()); }
    __device__ unsigned int lap(int index) const { return (unsigned int)index / slot_count(); }
    __device__ unsigned int slot_count() const { return RING_FIXED_SLOTS ? RING_FIXED_SLOTS : n_slots; }

    // ---- consumer side ----

    // Index (in the launch's sequence of slot uses) of the slot holding unit
    // `u` (counted from the block's first) of projection P in `layer`.
    template <int P>
    __device__ int slot_of(int layer, int u) const {
        return layer * slots_per_layer + first_slot[P] + u / SlotLayout<P>::PER_SLOT;
    }

    // Index of the slot holding tile `tile` of the attention chunk in `layer`.
    __device__ int kv_slot_of(int layer, int tile) const { return layer * slots_per_layer + first_kv_slot + tile; }

    // Waits until every use in `indices` has landed. Usually they all have
    // (the stream runs ahead of the phases): one look at all of them then,
    // its shared-memory reads and barrier tests issued together, instead of
    // one wait after another.
    template <int N>
    __device__ void wait_all(const int (&indices)[N]) const {
        int armed_for[N];
#pragma unroll
        for (int j = 0; j < N; ++j) armed_for[j] = armed[slot(indices[j])];
        bool landed = true;
#pragma unroll
        for (int j = 0; j < N; ++j) landed = landed && armed_for[j] == indices[j];
        if (landed) {
            // Armed for these uses, so each `full` now counts them.
#pragma unroll
            for (int j = 0; j < N; ++j) landed = mbarrier_test(full + slot(indices[j]), lap(indices[j]) & 1u) && landed;
            if (landed) return;
        }
#pragma unroll
        for (int j = 0; j < N; ++j) wait_full(indices[j]);
    }

    // Where use `index`'s slot lies (once it has landed).
    __device__ const unsigned char* slot_data(int index) const { return storage + (size_t)slot(index) * RING_SLOT_BYTES; }

    // Waits until use `index` of the ring has landed; returns the slot.
    __device__ const unsigned char* wait_full(int index) const {
        const int s = slot(index);
        while (armed[s] != index) {
        }
        mbarrier_wait(full + s, lap(index) & 1u);
        return slot_data(index);
    }

    // One warp is done reading `units` 2 KB units of use `index` (lane 0
    // calls, after __syncwarp). Relaxed, not release: the reads are done
    // (their values are summed already), and a release would also wait for
    // this thread's earlier global stores to land (measured: one round trip
    // per row a warp handles).
    __device__ void release(int index, int units) const {
        asm volatile("mbarrier.arrive.relaxed.cta.shared::cta.b64 _, [%0], %1;" ::"r"(
                         smem_address(empty + slot(index))),
                     "r"(units)
                     : "memory");
    }

    // The consumers have their queries and now read the attention tiles of
    // `layer` (consumer thread 0 calls it): the producer streams the rest of
    // those tiles deeper from here on (produce_kv_tiles).
    __device__ void reading_tiles(int layer) const { *tiles_layer = layer; }

    // ---- producer side (one thread) ----

    // Where the producer's time goes (bench --profile): SM clock cycles in
    // all, waiting for a slot the consumers still read, and waiting for the
    // copy in flight.
    struct ProducerClock {
        long long waited_for_slot = 0, waited_for_copy = 0;
    };

    // Streams the block's rows of all layers and its attention chunk's
    // cached keys and values, keeping at most p.ring_in_flight slots copying
    // at once. A chunk that is its head's whole cache (at most
    // ATTN_ONE_CHUNK keys) goes with p.ring_one_chunk_in_flight: only the
    // NUM_Q_HEADS blocks with such a chunk stream tiles then, and attention
    // needs them in place when it starts. Any other chunk's tiles go with
    // p.ring_in_flight until the block's consumers start reading them, then
    // with p.ring_kv_in_flight and no L2 prefetch: the stream runs ahead
    // into a layer's tiles while the consumers are still in E and A, and
    // copies in flight then, on nearly every block, slow those phases'
    // handoffs; while the consumers read tiles, no handoff but the merge is
    // awaited (src/kernel_dims.rs, RING_KV_IN_FLIGHT and
    // RING_ONE_CHUNK_IN_FLIGHT, say what was measured).
    // `cycles`, when not null, receives the ProducerClock counts (total,
    // slot, copy).
    __device__ void produce(const DecodeParams& p, const AttentionTask& task, int pos,
                            unsigned long long* cycles) const {
        const int in_flight = (int)p.ring_in_flight;
        // The chunk's copies in flight before its consumers read its tiles,
        // and once they do.
        const bool one_chunk = task.n_chunks == 1;
        const int kv_early = one_chunk ? (int)p.ring_one_chunk_in_flight : in_flight;
        const int kv_read = one_chunk ? (int)p.ring_one_chunk_in_flight : (int)p.ring_kv_in_flight;
        unsigned long long policy;  // read once a step (weights, split chunks' tiles): evict from L2 first
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        const long long start = clock64();
        ProducerClock clock;
        int index = 0;
        for (int layer = 0; layer < NUM_LAYERS; ++layer) {
            const bf16* w = layer_weights(p, layer, 0);
            produce_projection<QKV_PROJ>(w, index, in_flight, policy, clock);
            produce_kv_tiles(p, task, pos, layer, index, kv_early, kv_read, policy, clock);
            produce_projection<O_PROJ>(w, index, in_flight, policy, clock);
            produce_projection<GATE_UP_PROJ>(w, index, in_flight, policy, clock);
            produce_projection<DOWN_PROJ>(w, index, in_flight, policy, clock);
        }
        if (cycles != nullptr) {
            // The last copies land after the loop: wait, so the total is the stream's.
            const int last = index - 1;
            mbarrier_wait(full + slot(last), lap(last) & 1u);
            cycles[0] = clock64() - start;
            cycles[1] = clock.waited_for_slot;
            cycles[2] = clock.waited_for_copy;
        }
    }

    template <int P>
    __device__ void produce_projection(const bf16* layer_weights, int& index, int in_flight,
                                       unsigned long long policy, ProducerClock& clock) const {
        using S = Streamed<P>;
        using L = SlotLayout<P>;
        int begin, end;
        block_units<P>(begin, end);
        for (int unit = begin; unit < end; unit += L::PER_SLOT, ++index) {
            const int count = min(L::PER_SLOT, end - unit);
            const unsigned int row_bytes = count * L::ROW_BYTES;
            const bf16* rows = layer_weights + S::WEIGHTS + (size_t)unit * S::K;
            const bf16* paired_rows = L::PAIRED ? layer_weights + S::PAIRED + (size_t)unit * S::K : nullptr;
            prefetch_l2(rows, row_bytes);  // acquire may wait a whole copy
            if (L::PAIRED) prefetch_l2(paired_rows, row_bytes);
            unsigned char* dst = acquire(index, in_flight, row_bytes * (L::PAIRED ? 2 : 1), clock);
            unsigned long long* landed = full + slot(index);
            copy(dst, rows, row_bytes, landed, policy);
            if (L::PAIRED) copy(dst + L::PAIRED_OFFSET, paired_rows, row_bytes, landed, policy);
            // The units this use leaves empty count as read already.
            const int unused = (L::PER_SLOT - count) * L::UNIT_UNITS;
            if (unused > 0) release(index, unused);
        }
    }

    // The block's attention chunk of `layer`: its cached keys and values in
    // tiles of KV_TILE positions. A chunk that is its head's whole cache (at
    // most ATTN_ONE_CHUNK keys: 29 MB of cache in all) is copied without a
    // hint and stays in L2 for the next step. A split chunk's tiles are read
    // once a step from a cache larger than L2, so they go evict-first like
    // the weights (at the default priority they pushed out of L2 the lines
    // every block reads: H200 +3.5% at 16,384). The two kinds take separate
    // branches: one copy helper with an optional hint made the kernel 1.3%
    // slower at 0-255, its code laid out afresh (RESULTS.md, session 25).
    __device__ void produce_kv_tiles(const DecodeParams& p, const AttentionTask& task, int pos, int layer, int& index,
                                     int early_in_flight, int read_in_flight, unsigned long long policy,
                                     ProducerClock& clock) const {
        const bool read_once = task.n_chunks > 1;
        const size_t head = kv_cache_head(p, layer, task.kv_head);
        const int cached_end = task.cached_end(pos);
        for (int key = task.begin; key < cached_end; key += KV_TILE, ++index) {
            const unsigned int bytes = min(KV_TILE, cached_end - key) * KV_ROW_BYTES;
            const bf16* keys = p.k_cache + head + (size_t)key * HEAD_DIM;
            const bf16* values = p.v_cache + head + (size_t)key * HEAD_DIM;
            const bool read = early_in_flight != read_in_flight && *tiles_layer == layer;
            const int in_flight = read ? read_in_flight : early_in_flight;
            // With several copies in flight once the tiles are read, asking
            // L2 for them first costs more than it brings (H200: -1.0% at
            // 16,384 keys, -4.2% at 32,768 without; RESULTS.md, session 24).
            if (read_once) {  // evict-first
                if (!read) {
                    prefetch_l2(keys, bytes, policy);
                    prefetch_l2(values, bytes, policy);
                }
                unsigned char* dst = acquire(index, in_flight, 2 * bytes, clock);
                unsigned long long* landed = full + slot(index);
                copy(dst, keys, bytes, landed, policy);
                copy(dst + KV_VALUES_OFFSET, values, bytes, landed, policy);
                continue;
            }
            if (!read) {
                prefetch_l2(keys, bytes);
                prefetch_l2(values, bytes);
            }
            unsigned char* dst = acquire(index, in_flight, 2 * bytes, clock);
            unsigned long long* landed = full + slot(index);
            copy(dst, keys, bytes, landed);
            copy(dst + KV_VALUES_OFFSET, values, bytes, landed);
        }
    }

    // Waits until use `index` of the ring may be filled (the consumers are
    // done with the slot's previous use, and fewer than `in_flight` copies
    // are outstanding), announces the bytes its copies will bring, and
    // returns the slot.
    __device__ unsigned char* acquire(int index, int in_flight, unsigned int bytes, ProducerClock& clock) const {
        const int s = slot(index);
        const long long t0 = clock64();
        if (index >= (int)slot_count()) mbarrier_wait(empty + s, (lap(index) - 1) & 1u);
        const long long t1 = clock64();
        if (index >= in_flight) {
            const int older = index - in_flight;
            mbarrier_wait(full + slot(older), lap(older) & 1u);
        }
        clock.waited_for_slot += t1 - t0;
        clock.waited_for_copy += clock64() - t1;
        armed[s] = index;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(full + s)),
                     "r"(bytes)
                     : "memory");
        return storage + (size_t)s * RING_SLOT_BYTES;
    }

    // Starts bringing `bytes` at `src` into L2 (no shared memory, no barrier).
    static __device__ void prefetch_l2(const bf16* src, unsigned int bytes) {
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
    }
    // The same with an L2 eviction policy.
    static __device__ void prefetch_l2(const bf16* src, unsigned int bytes, unsigned long long policy) {
        asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(src), "r"(bytes),
                     "l"(policy)
                     : "memory");
    }
    static __device__ void copy(unsigned char* dst, const bf16* src, unsigned int bytes, unsigned long long* bar) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_address(dst)),
            "l"(src), "r"(bytes), "r"(smem_address(bar))
            : "memory");
    }
    static __device__ void copy(unsigned char* dst, const bf16* src, unsigned int bytes, unsigned long long* bar,
                                unsigned long long policy) {
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
            "%4;" ::"r"(smem_address(dst)),
            "l"(src), "r"(bytes), "r"(smem_address(bar)), "l"(policy)
            : "memory");
    }
};

}  // namespace qmk
