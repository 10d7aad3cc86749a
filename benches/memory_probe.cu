// What the decode kernel's design depends on, measured on its own (issue 4):
//
//  1. How the latency of one L2 round trip (the kind every decode phase has
//     on its critical path: reading the input vector, the grid barrier)
//     grows while each SM keeps D bulk copies of weights in flight.
//  2. What bandwidth those bulk copies reach, per depth D.
//  3. What one grid barrier costs (release add + acquire spin), alone, and
//     with relaxed polling or a back-off between polls.
//  4. What one handoff costs as the decode kernel makes them (its own
//     TaggedVector and await_all, kernels/common.cuh): every block stores its rows of a
//     1,024-element vector as tagged 64-bit words, then reads all 1,024 and
//     reads again the ones whose tag is not yet the round's; alone, and while
//     each SM streams D bulk copies as in part 1. A layer of the decode
//     kernel makes five such handoffs in a row. 4b: the same with G reads of
//     each late element in flight at once (staggered), 4c: among fewer
//     blocks (each line of the vector then has fewer readers).
//  5. The same within a thread-block cluster, through distributed shared
//     memory: every block of a cluster of C stores its share of a
//     512-element vector into every block's shared memory, then either
//     polls its own copy for the round's tags or passes a cluster barrier.
//  6. What a reduction by atomic adds into L2 costs (the exchange a matrix
//     product split by its input would make instead of a handoff): every
//     block adds partial sums to rows of a 1,024-element vector, counts
//     itself in, and reads all of it once every block has: by contributors
//     a row, layout in L2, order of the adds, and u64 fixed point or f32.
//  7. How far each L2 line is from each SM: the latency of dependent reads
//     of each of 2,048 lines (L2 hits) from thread 0 of every SM, and whether
//     the lines group by SM (the L2 is two partitions: a line homed in the
//     far one should cost more, and which is far depends on the SM).
//
// Standalone but for kernels/common.cuh (with the constants build.rs passes,
// benches/kernel_defines.h): on the device machine,
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/memory_probe benches/memory_probe.cu
//   /tmp/memory_probe            (or `/tmp/memory_probe barriers`: parts 3-6 only;
//                                 `/tmp/memory_probe lines`: part 7 only)
// One block per SM. In part 1 each block's thread 32 streams its own 6 MB
// region of a 1 GB buffer through D shared-memory slots (a slot is refilled
// as soon as its copy lands), while thread 0 chases pointers through a
// 256 KB table that stays in L2 (ld.global.cg) for as long as the stream
// runs.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "kernel_defines.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../kernels/common.cuh"

#define CHECK(call)                                                                   \
    do {                                                                              \
        cudaError_t err_ = (call);                                                    \
        if (err_ != cudaSuccess) {                                                    \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

constexpr int MAX_SLOTS = 16;
constexpr size_t REGION_BYTES = 6u << 20;  // each block's share of the weight stand-in
constexpr int CHASE_ENTRIES = 64 * 1024;   // 256 KB: L2-resident

__device__ unsigned int smem_u32(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }

__device__ void wait_parity(unsigned long long* bar, unsigned int parity) {
    asm volatile(
        "{\n.reg .pred done;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra W_%=;\n}\n" ::"r"(
            smem_u32(bar)),
        "r"(parity)
        : "memory");
}

__device__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The slots' `full` mbarriers (one thread calls, before a block barrier).
__device__ void init_slot_barriers(unsigned long long* full) {
    for (int i = 0; i < MAX_SLOTS; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(full + i)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One thread streams `copies` bulk copies of `slot_bytes` from `region`
// through `depth` shared-memory slots, a slot refilled as soon as its copy
// lands; or, with `stop`, until *stop is set. `full`: depth mbarriers,
// initialised with a count of 1.
__device__ void stream_region(const unsigned char* region, unsigned char* slots, unsigned long long* full, int depth,
                              int slot_bytes, int copies, const volatile int* stop) {
    auto issue = [&](int i) {
        const int slot = i % depth;
        const size_t offset = ((size_t)i * slot_bytes) % (REGION_BYTES - slot_bytes);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(full + slot)),
                     "r"(slot_bytes)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_u32(slots + (size_t)slot * slot_bytes)),
            "l"(region + offset), "r"(slot_bytes), "r"(smem_u32(full + slot))
            : "memory");
    };
    for (int i = 0; i < depth; ++i) issue(i);
    for (int i = depth; stop ? true : i < copies + depth; ++i) {
        const int done = i - depth;  // the copy to retire before reusing its slot
        wait_parity(full + done % depth, (done / depth) & 1);
        if (stop ? *stop != 0 : i >= copies) {
            for (int j = done + 1; j < i; ++j) wait_parity(full + j % depth, (j / depth) & 1);  // drain
            return;
        }
        issue(i);
    }
}

struct ProbeResult {
    unsigned long long hops;
    unsigned long long ns;  // over all hops
};

// Part 1. `depth` = 0: no stream, `hops_alone` hops are timed.
__global__ void stream_and_chase(const unsigned char* weights, const unsigned int* chase, int depth, int slot_bytes,
                                 int copies, int hops_alone, ProbeResult* results, volatile unsigned int* sink) {
    extern __shared__ __align__(128) unsigned char slots[];
    __shared__ unsigned long long full[MAX_SLOTS];
    __shared__ volatile int stream_done;
    if (threadIdx.x == 0) {
        init_slot_barriers(full);
        stream_done = depth == 0;
    }
    __syncthreads();
    const unsigned char* region = weights + (size_t)blockIdx.x * REGION_BYTES;

    if (threadIdx.x == 32 && depth > 0) {
        stream_region(region, slots, full, depth, slot_bytes, copies, nullptr);
        stream_done = 1;
    }
    if (threadIdx.x == 0) {
        // Each hop's address is the previous hop's value, so the hops run one
        // at a time: the loop's time over its hops is the round-trip latency.
        unsigned int at = blockIdx.x * 97 % CHASE_ENTRIES;
        unsigned long long hops = 0;
        const unsigned long long t0 = now_ns();
        while (depth == 0 ? hops < (unsigned long long)hops_alone : !stream_done) {
            at = __ldcg(chase + at);
            ++hops;
        }
        sink[blockIdx.x] = at;  // waits for the last hop before the clock is read
        const unsigned long long t1 = now_ns();
        results[blockIdx.x] = {hops, t1 - t0};
    }
}

// Part 3: `rounds` grid barriers back to back, as the decode kernel's
// (release add, then spin until the count reaches the target). `relaxed`:
// spin on relaxed loads and acquire once after; `sleep_ns` > 0: back off
// that long between polls, so 132 pollers leave the counter's L2 slice
// some room for the arrivals.
__global__ void barriers(unsigned long long* count, int rounds, int relaxed, int sleep_ns) {
    unsigned long long target = 0;
    if (threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
        target = now - now % ((unsigned long long)rounds * gridDim.x);
    }
    for (int r = 0; r < rounds; ++r) {
        __syncthreads();
        if (threadIdx.x == 0) {
            asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
            target += gridDim.x;
            unsigned long long seen;
            for (;;) {
                if (relaxed)
                    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(count) : "memory");
                else
                    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(count) : "memory");
                if (seen >= target) break;
                if (sleep_ns > 0) __nanosleep(sleep_ns);
            }
            if (relaxed) asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
        __syncthreads();
    }
}

// Parts 4 and 6: the threads past HANDOFF_CONSUMERS leave at once but for
// thread HANDOFF_CONSUMERS, which streams `depth` copies in flight (when
// depth > 0) until *stop is set, then leaves too; true on the consumers.
constexpr int HANDOFF_CONSUMERS = 352;  // the decode kernel's 11 consumer warps
__device__ bool consumer_or_stream(const unsigned char* weights, int depth, int slot_bytes, volatile int* stop) {
    extern __shared__ __align__(128) unsigned char slots[];
    __shared__ unsigned long long full[MAX_SLOTS];
    if (threadIdx.x == 0) {
        init_slot_barriers(full);
        *stop = 0;
    }
    __syncthreads();
    if (threadIdx.x < HANDOFF_CONSUMERS) return true;
    if (threadIdx.x == HANDOFF_CONSUMERS && depth > 0)
        stream_region(weights + (size_t)blockIdx.x * REGION_BYTES, slots, full, depth, slot_bytes, 0, stop);
    return false;
}

// Part 4: `rounds` handoffs of an n-element vector (n <= HANDOFF_N), as the
// decode kernel's (one block per SM, HANDOFF_CONSUMERS threads polling, the
// words of two alternating buffers tagged tag0 + round). Each writer stores
// its values into `copies` replicas of the vector and block b reads replica
// b % copies, so that fewer SMs poll each L2 line. Thread HANDOFF_CONSUMERS
// streams `depth` copies in flight meanwhile, when depth > 0.
constexpr int HANDOFF_N = 1024;
constexpr int HANDOFF_MAX_COPIES = 8;

// await_all with G reads of every element in flight, each issued `stagger`
// cycles after the one before: a read that finds a late element is issued
// again at once, so the element is sampled in L2 every round trip / G
// instead of every round trip. Issues the reads itself (raw need not be
// loaded); raw[k] ends holding the ready word.
template <int G, int K, typename Index>
__device__ __forceinline__ void await_all_staggered(const qmk::TaggedVector& first, unsigned long long (&raw)[K],
                                                    Index index, long long stagger, int replica_stride) {
    // Read g reads replica g when replica_stride is not 0 (else all read the first).
    auto src_of = [&](int g) { return qmk::TaggedVector{first.words + g * replica_stride, first.tag}; };
    unsigned long long reads[G][K];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g > 0) {
            const long long t0 = clock64();
            while (clock64() - t0 < stagger) {
            }
        }
#pragma unroll
        for (int k = 0; k < K; ++k)
            if (index(k) >= 0) reads[g][k] = src_of(g).load(index(k));
    }
    unsigned int done = 0;
#pragma unroll
    for (int k = 0; k < K; ++k)
        if (index(k) < 0) done |= 1u << k;
    for (;;) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
            for (int k = 0; k < K; ++k) {
                if (done >> k & 1) continue;
                if (first.ready(reads[g][k])) {
                    raw[k] = reads[g][k];
                    done |= 1u << k;
                } else {
                    reads[g][k] = src_of(g).load(index(k));
                }
            }
            if (done == (1u << K) - 1) return;
        }
    }
}

__global__ void handoffs(unsigned long long* words, int n, int copies, int rounds, unsigned int tag0,
                         const unsigned char* weights, int depth, int slot_bytes, float* sink, int reads,
                         int stagger) {
    __shared__ volatile int stop;
    if (!consumer_or_stream(weights, depth, slot_bytes, &stop)) return;
    const int begin = n * blockIdx.x / gridDim.x, end = n * (blockIdx.x + 1) / gridDim.x;
    constexpr int PER_THREAD = (HANDOFF_N + HANDOFF_CONSUMERS - 1) / HANDOFF_CONSUMERS;
    float total = 0.f;
    for (int r = 0; r < rounds; ++r) {
        unsigned long long* buf = words + (r & 1) * HANDOFF_MAX_COPIES * HANDOFF_N;
        const unsigned int tag = tag0 + r;
        const int row = begin + threadIdx.x;
        if (row < end)
            for (int c = 0; c < copies; ++c) qmk::TaggedVector{buf + c * HANDOFF_N, tag}.store(row, total + row);
        // Staggered reads (reads > 1) with `copies` = reads: read g from replica g.
        const bool read_replicas = reads > 1 && copies == reads;
        const qmk::TaggedVector mine{buf + (read_replicas ? 0 : blockIdx.x % copies) * HANDOFF_N, tag};
        const int replica_stride = read_replicas ? HANDOFF_N : 0;
        auto index = [&](int k) {
            const int i = threadIdx.x + k * HANDOFF_CONSUMERS;
            return i < n ? i : -1;
        };
        unsigned long long raw[PER_THREAD];
        if (reads == 2) {
            await_all_staggered<2>(mine, raw, index, stagger, replica_stride);
        } else if (reads == 3) {
            await_all_staggered<3>(mine, raw, index, stagger, replica_stride);
        } else {
#pragma unroll
            for (int k = 0; k < PER_THREAD; ++k)
                if (index(k) >= 0) raw[k] = mine.load(index(k));
            qmk::await_all(mine, raw, index);
        }
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k)
            if (index(k) >= 0) total += mine.value(raw[k]);
        asm volatile("bar.sync 1, %0;" ::"n"(HANDOFF_CONSUMERS) : "memory");
    }
    if (threadIdx.x == 0) {
        sink[blockIdx.x] = total;
        stop = 1;
    }
}

// Part 5: `rounds` handoffs of a CLUSTER_N-element vector among the blocks
// of each cluster, through distributed shared memory. `tagged`: readers
// poll their own copy for the round's tag (as part 4); else the blocks pass
// a cluster barrier after their stores. Thread HANDOFF_CONSUMERS streams
// `depth` copies in flight meanwhile, when depth > 0.
constexpr int CLUSTER_N = 512;  // a KV head's QKV rows: two query heads, its key and its value
__global__ void cluster_handoffs(int rounds, unsigned int tag0, int tagged, const unsigned char* weights, int depth,
                                 int slot_bytes, float* sink) {
    namespace cg = cooperative_groups;
    extern __shared__ __align__(128) unsigned char slots[];
    __shared__ unsigned long long full[MAX_SLOTS];
    __shared__ volatile int stop;
    __shared__ unsigned long long vec[2][CLUSTER_N];
    cg::cluster_group cluster = cg::this_cluster();
    for (int i = threadIdx.x; i < 2 * CLUSTER_N; i += blockDim.x) vec[i / CLUSTER_N][i % CLUSTER_N] = 0;
    if (threadIdx.x == 0) {
        init_slot_barriers(full);
        stop = 0;
    }
    cluster.sync();  // every block's vectors zeroed before anyone stores into them
    if (threadIdx.x >= HANDOFF_CONSUMERS) {
        // The streaming thread (tagged runs only: it would miss the barriers)
        // and the rest of the last warp, which take part in the barriers.
        if (threadIdx.x == HANDOFF_CONSUMERS && depth > 0)
            stream_region(weights + (size_t)blockIdx.x * REGION_BYTES, slots, full, depth, slot_bytes, 0, &stop);
        if (!tagged)
            for (int r = 0; r < rounds; ++r) cluster.sync();
    } else {
        const int blocks = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
        const int begin = CLUSTER_N * rank / blocks, end = CLUSTER_N * (rank + 1) / blocks;
        float total = 0.f;
        for (int r = 0; r < rounds; ++r) {
            const unsigned long long tag = tag0 + r;
            // (rank, row) pairs of this block's stores, spread over the threads.
            for (int j = threadIdx.x; j < blocks * (end - begin); j += HANDOFF_CONSUMERS) {
                const int to = j / (end - begin), row = begin + j % (end - begin);
                volatile unsigned long long* remote = cluster.map_shared_rank(&vec[r & 1][0], to);
                remote[row] = tag << 32 | __float_as_uint(total + row);
            }
            if (tagged) {
                for (int i = threadIdx.x; i < CLUSTER_N; i += HANDOFF_CONSUMERS) {
                    unsigned long long word;
                    do word = *(volatile unsigned long long*)&vec[r & 1][i];
                    while (word >> 32 != tag);
                    total += __uint_as_float((unsigned int)word);
                }
                asm volatile("bar.sync 1, %0;" ::"n"(HANDOFF_CONSUMERS) : "memory");
            } else {
                cluster.sync();
                for (int i = threadIdx.x; i < CLUSTER_N; i += HANDOFF_CONSUMERS)
                    total += __uint_as_float((unsigned int)vec[r & 1][i]);
            }
        }
        if (threadIdx.x == 0) {
            sink[blockIdx.x] = total;
            stop = 1;
        }
    }
    __syncwarp();    // the last warp's streaming thread rejoins its warp first
    cluster.sync();  // no block leaves while another may still store into its shared memory
}

// Part 6: `rounds` reductions of an n-element vector by atomic adds, the
// exchange a design with matrix products split by their input (K) would
// make instead of handing on rows: every block adds its partial sums to
// rows of the vector in L2, fences, counts itself in; readers wait for the
// count, then read all n sums. `groups` > 1: block b adds only to the rows
// of group b % groups (n / groups rows, gridDim / groups contributors a
// row: an O projection split by attention head), else to all n (a down
// projection split by neuron: every block a contributor). `stride`: u64
// words between two rows (1: packed; 4: a 32-byte sector each; 16: a
// 128-byte line each). `rotate`: each block starts at another row, so the
// blocks' adds do not all reach the same addresses at once. `kind`: 0 u64
// fixed point (`red.add.u64`, order-free: the same bits in any order), 1
// f32 (`red.add.f32`, order-dependent), 2 f32 four at a time
// (`red.add.v4.f32`; stride 1 only). Three buffers in turn: in round r a
// block zeroes its own rows of the buffer of round r + 1, which every block
// finished reading before it counted itself into round r - 1. Thread
// HANDOFF_CONSUMERS streams `depth` copies in flight meanwhile.
constexpr int REDUCE_N = 1024;
constexpr int REDUCE_MAX_STRIDE = 16;
__global__ void reductions(unsigned long long* sums, unsigned long long* count, int n, int groups, int stride,
                           int rotate, int kind, int rounds, const unsigned char* weights, int depth, int slot_bytes,
                           float* sink) {
    __shared__ volatile int stop;
    if (!consumer_or_stream(weights, depth, slot_bytes, &stop)) return;
    const size_t buffer_words = (size_t)REDUCE_N * REDUCE_MAX_STRIDE;
    const int rows = n / groups, group = blockIdx.x % groups;
    const int first_row = group * rows;
    const int shift = rotate ? (int)(blockIdx.x / groups) * 8 % rows : 0;
    const int own_begin = n * blockIdx.x / gridDim.x, own_end = n * (blockIdx.x + 1) / gridDim.x;
    float total = 0.f;
    for (int r = 0; r < rounds; ++r) {
        unsigned long long* buf = sums + (r % 3) * buffer_words;
        unsigned long long* next = sums + ((r + 1) % 3) * buffer_words;
        for (int i = own_begin + (int)threadIdx.x; i < own_end; i += HANDOFF_CONSUMERS) next[(size_t)i * stride] = 0;
        const float part = 0.25f + (float)(blockIdx.x % 7);
        if (kind == 2) {
            for (int j = 4 * threadIdx.x; j < rows; j += 4 * HANDOFF_CONSUMERS) {
                const int row = first_row + (j + shift) % rows;
                float* at = reinterpret_cast<float*>(buf) + row;
                asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(at), "f"(part),
                             "f"(part), "f"(part), "f"(part)
                             : "memory");
            }
        } else {
            for (int j = threadIdx.x; j < rows; j += HANDOFF_CONSUMERS) {
                const int row = first_row + (j + shift) % rows;
                unsigned long long* at = buf + (size_t)row * stride;
                if (kind == 0) {
                    const unsigned long long fixed = (unsigned long long)__float2ll_rn(part * 4294967296.f);
                    asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(at), "l"(fixed) : "memory");
                } else {
                    asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;" ::"l"(at), "f"(part) : "memory");
                }
            }
        }
        asm volatile("bar.sync 1, %0;" ::"n"(HANDOFF_CONSUMERS) : "memory");
        if (threadIdx.x == 0) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
            const unsigned long long target = (unsigned long long)(r + 1) * gridDim.x;
            unsigned long long seen;
            do asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(count) : "memory");
            while (seen < target);
        }
        asm volatile("bar.sync 1, %0;" ::"n"(HANDOFF_CONSUMERS) : "memory");
        for (int i = threadIdx.x; i < n; i += HANDOFF_CONSUMERS) {
            unsigned long long word;
            if (kind == 2) {
                unsigned int w32;
                asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];"
                             : "=r"(w32)
                             : "l"(reinterpret_cast<unsigned int*>(buf) + i)
                             : "memory");
                total += __uint_as_float(w32);
                continue;
            }
            asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(buf + (size_t)i * stride) : "memory");
            total += kind == 0 ? (float)(long long)word * (1.f / 4294967296.f) : __uint_as_float((unsigned int)word);
        }
    }
    if (threadIdx.x == 0) {
        sink[blockIdx.x] = total;
        stop = 1;
    }
}

// Part 7: thread 0 of every block reads each of LINE_COUNT lines (128 B
// apart) in a chain of CHAIN reads, each read's address depending on the
// word the one before returned (through `mask`, zero at run time), and
// keeps the fewest cycles per read of three chains: cycles[block][line].
constexpr int LINE_COUNT = 2048;
constexpr int LINE_WORDS = 128 / sizeof(unsigned long long);
constexpr int CHAIN = 16;
__global__ void line_latency(const unsigned long long* lines, unsigned long long mask, unsigned int* cycles,
                             unsigned long long* sink) {
    if (threadIdx.x != 0) return;
    unsigned long long sum = 0;
    for (int i = 0; i < LINE_COUNT; ++i) {
        const unsigned long long* line = lines + (size_t)i * LINE_WORDS;
        unsigned int best = ~0u;
        for (int rep = 0; rep < 3; ++rep) {
            unsigned long long word = 0;
            const long long t0 = clock64();
            for (int k = 0; k < CHAIN; ++k)
                asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(line + (word & mask)) : "memory");
            sum += word;
            const long long t1 = clock64();
            best = min(best, (unsigned int)((t1 - t0) / CHAIN));
        }
        cycles[blockIdx.x * LINE_COUNT + i] = best;
    }
    sink[blockIdx.x] = sum;
}

// Times `launch` (a function returning the launch's cudaError_t) three
// times with CUDA events; the best of the last two, in ms (the first warms
// up). Negative after printing the error, if any call fails.
template <typename Launch>
float best_of_runs(cudaEvent_t start, cudaEvent_t stop, Launch launch) {
    float best = 1e9f;
    for (int rep = 0; rep < 3; ++rep) {
        cudaError_t err = cudaEventRecord(start);
        if (err == cudaSuccess) err = launch();
        if (err == cudaSuccess) err = cudaEventRecord(stop);
        if (err == cudaSuccess) err = cudaEventSynchronize(stop);
        if (err == cudaSuccess) err = cudaGetLastError();
        float ms = 0;
        if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, stop);
        if (err != cudaSuccess) {
            std::fprintf(stderr, "%s\n", cudaGetErrorString(err));
            return -1.f;
        }
        if (rep > 0) best = std::min(best, ms);
    }
    return best;
}

// Part 7's report: SM 0's latencies by line; then each line as SM 0 sees
// it, near (under the midpoint of its 10th and 90th percentiles) or far,
// and for every SM the mean cycles over SM 0's near lines and over its far
// ones: if the lines group by partition, about half of the SMs see SM 0's
// near lines near, and the other half see them far.
int line_latencies(int sms) {
    unsigned long long* lines;
    CHECK(cudaMalloc(&lines, (size_t)LINE_COUNT * 128));
    CHECK(cudaMemset(lines, 0, (size_t)LINE_COUNT * 128));
    unsigned int* cycles;
    CHECK(cudaMalloc(&cycles, (size_t)sms * LINE_COUNT * sizeof(unsigned int)));
    unsigned long long* sink;
    CHECK(cudaMalloc(&sink, sms * sizeof(unsigned long long)));
    for (int rep = 0; rep < 2; ++rep) {  // the first brings the lines into L2
        line_latency<<<sms, 32>>>(lines, 0ull, cycles, sink);
        CHECK(cudaDeviceSynchronize());
        CHECK(cudaGetLastError());
    }
    std::vector<unsigned int> host((size_t)sms * LINE_COUNT);
    CHECK(cudaMemcpy(host.data(), cycles, host.size() * sizeof(unsigned int), cudaMemcpyDeviceToHost));
    auto percentile = [](std::vector<unsigned int> v, double q) {
        std::sort(v.begin(), v.end());
        return v[(size_t)(q * (v.size() - 1))];
    };
    std::printf("\n7. L2 read latency by line and SM (cycles a read in a chain of %d dependent reads of the line,\n"
                "   fewest of 3 chains; L2 hits)\n", CHAIN);
    const std::vector<unsigned int> sm0(host.begin(), host.begin() + LINE_COUNT);
    const unsigned int p10 = percentile(sm0, 0.1), p90 = percentile(sm0, 0.9), split = (p10 + p90) / 2;
    std::printf("SM 0: min %u p10 %u p50 %u p90 %u max %u; near under %u cycles\n", percentile(sm0, 0),
                p10, percentile(sm0, 0.5), p90, percentile(sm0, 1), split);
    const unsigned int lo = percentile(sm0, 0);
    std::printf("SM 0 histogram (32-cycle bins from %u):", lo);
    std::vector<int> bins(16, 0);
    for (unsigned int c : sm0) ++bins[std::min<size_t>((c - lo) / 32, bins.size() - 1)];
    for (int b : bins) std::printf(" %d", b);
    std::printf("\n");
    std::vector<bool> near(LINE_COUNT);
    int near_count = 0;
    for (int i = 0; i < LINE_COUNT; ++i) near_count += near[i] = sm0[i] < split;
    std::printf("SM 0 near lines: %d of %d\n", near_count, LINE_COUNT);
    std::printf("%4s %10s %10s %10s %10s\n", "SM", "p10", "p90", "SM0-near", "SM0-far");
    int same = 0, opposite = 0;
    for (int sm = 0; sm < sms; ++sm) {
        const std::vector<unsigned int> row(host.begin() + (size_t)sm * LINE_COUNT,
                                            host.begin() + (size_t)(sm + 1) * LINE_COUNT);
        double a = 0, b = 0;
        for (int i = 0; i < LINE_COUNT; ++i) (near[i] ? a : b) += row[i];
        a /= std::max(near_count, 1);
        b /= std::max(LINE_COUNT - near_count, 1);
        same += a + 20 < b;
        opposite += b + 20 < a;
        std::printf("%4d %10u %10u %10.0f %10.0f\n", sm, percentile(row, 0.1), percentile(row, 0.9), a, b);
    }
    std::printf("SMs that see SM 0's near lines nearer by 20+ cycles: %d; farther: %d; of %d\n", same, opposite, sms);
    return 0;
}

int main(int argc, char** argv) {
    // `memory_probe barriers` runs parts 3-6 only, `memory_probe lines` part 7 only.
    const std::string only = argc > 1 ? argv[1] : "";
    const bool stream_parts = only.empty();
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);

    if (only == "lines") return line_latencies(sms);

    unsigned char* weights;
    CHECK(cudaMalloc(&weights, (size_t)sms * REGION_BYTES));
    CHECK(cudaMemset(weights, 1, (size_t)sms * REGION_BYTES));
    // One random cycle through the table (Sattolo), so every hop misses L1
    // and no prefetcher can guess the next line.
    std::vector<unsigned int> order(CHASE_ENTRIES), next(CHASE_ENTRIES);
    std::iota(order.begin(), order.end(), 0u);
    std::mt19937 rng(1);
    for (int i = CHASE_ENTRIES - 1; i > 0; --i) std::swap(order[i], order[std::uniform_int_distribution<int>(0, i - 1)(rng)]);
    for (int i = 0; i < CHASE_ENTRIES; ++i) next[order[i]] = order[(i + 1) % CHASE_ENTRIES];
    unsigned int* chase;
    CHECK(cudaMalloc(&chase, CHASE_ENTRIES * sizeof(unsigned int)));
    CHECK(cudaMemcpy(chase, next.data(), CHASE_ENTRIES * sizeof(unsigned int), cudaMemcpyHostToDevice));
    ProbeResult* results;
    CHECK(cudaMalloc(&results, sms * sizeof(ProbeResult)));
    unsigned int* sink;
    CHECK(cudaMalloc(&sink, sms * sizeof(unsigned int)));
    std::vector<ProbeResult> host(sms);
    CHECK(cudaFuncSetAttribute(stream_and_chase, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));

    std::printf("\n1-2. L2 round trip (pointer chase, thread 0 of every SM) while each SM streams weights\n");
    std::printf("%8s %10s %12s %14s %12s\n", "slot KB", "in flight", "stream GB/s", "hop ns (mean)", "hops/SM");
    const int slot_kbs[] = {12, 48};
    const int depths[] = {0, 1, 2, 3, 4, 8, 16};
    for (int slot_kb : slot_kbs) {
        if (!stream_parts) break;
        for (int depth : depths) {
            const int slot_bytes = slot_kb * 1024;
            if (depth * slot_bytes > 200 * 1024) continue;
            const int copies = (int)(REGION_BYTES / slot_bytes) * 2;  // about 12 MB per SM
            for (int rep = 0; rep < 2; ++rep) {  // the first run warms up
                CHECK(cudaEventRecord(start));
                stream_and_chase<<<sms, 64, depth * slot_bytes>>>(weights, chase, depth, slot_bytes, copies, 20000,
                                                                  results, sink);
                CHECK(cudaEventRecord(stop));
                CHECK(cudaEventSynchronize(stop));
                CHECK(cudaGetLastError());
            }
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, start, stop));
            CHECK(cudaMemcpy(host.data(), results, sms * sizeof(ProbeResult), cudaMemcpyDeviceToHost));
            unsigned long long hops = 0, ns = 0;
            for (const auto& r : host) hops += r.hops, ns += r.ns;
            const double gbs = depth ? (double)sms * copies * slot_bytes / (ms * 1e-3) / 1e9 : 0.0;
            std::printf("%8d %9dK %12.0f %14.0f %12.0f\n", slot_kb, depth * slot_kb, gbs, (double)ns / hops,
                        (double)hops / sms);
        }
    }

    std::printf("\n3. Grid barrier alone (one block per SM, release add + acquire spin)\n");
    unsigned long long* count;
    CHECK(cudaMalloc(&count, sizeof(unsigned long long)));
    CHECK(cudaMemset(count, 0, sizeof(unsigned long long)));
    struct Variant {
        const char* name;
        int relaxed, sleep_ns;
    };
    const Variant variants[] = {{"acquire spin", 0, 0},  {"relaxed spin + fence", 1, 0},
                                {"acquire, sleep 32 ns", 0, 32}, {"acquire, sleep 100 ns", 0, 100},
                                {"relaxed, sleep 32 ns", 1, 32}, {"relaxed, sleep 100 ns", 1, 100},
                                {"relaxed, sleep 250 ns", 1, 250}};
    for (const Variant& v : variants) {
        int rounds = 1000, relaxed = v.relaxed, sleep_ns = v.sleep_ns;
        void* args[] = {&count, &rounds, &relaxed, &sleep_ns};
        const float best = best_of_runs(
            start, stop, [&] { return cudaLaunchCooperativeKernel((void*)barriers, sms, 512, args, 0, 0); });
        if (best < 0) return 1;
        std::printf("%-24s %.3f us per barrier (512 threads per block, best of 2)\n", v.name, best * 1e3 / rounds);
    }

    std::printf("\n4. Tagged handoff, every block to every block: us per handoff (best of 2), by vector length,\n"
                "   replicas of the vector (block b reads replica b %% replicas) and copies in flight per SM\n");
    std::printf("%8s %9s %8s %8s %8s %8s\n", "elements", "replicas", "0 KB", "12 KB", "24 KB", "36 KB");
    unsigned long long* words;
    const size_t words_bytes = 2 * HANDOFF_MAX_COPIES * HANDOFF_N * sizeof(unsigned long long);
    CHECK(cudaMalloc(&words, words_bytes));
    CHECK(cudaMemset(words, 0, words_bytes));
    float* handoff_sink;
    CHECK(cudaMalloc(&handoff_sink, sms * sizeof(float)));
    CHECK(cudaFuncSetAttribute(handoffs, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    unsigned int tag0 = 1;
    // One row of parts 4-4c: us per handoff at 0, 12, 24 and 36 KB in flight per SM.
    auto handoff_row = [&](int n, int copies, int reads, int stagger, int blocks) {
        for (int depth : {0, 1, 2, 3}) {
            int rounds = 2000, slot_bytes = 12 * 1024;
            void* args[] = {&words,  &n,          &copies,       &rounds, &tag0,   &weights,
                            &depth,  &slot_bytes, &handoff_sink, &reads,  &stagger};
            // 120 KB of shared memory at least: one block per SM, as the decode kernel.
            const size_t smem = std::max(depth * slot_bytes, 120 * 1024);
            const float best = best_of_runs(start, stop, [&] {
                const cudaError_t err =
                    cudaLaunchCooperativeKernel((void*)handoffs, blocks, HANDOFF_CONSUMERS + 32, args, smem, 0);
                tag0 += rounds;  // the launch has its arguments: the next one's tags are new
                return err;
            });
            if (best < 0) return false;
            std::printf(" %8.3f", best * 1e3 / rounds);
        }
        std::printf("\n");
        return true;
    };
    struct Shape {
        int n, copies;
    };
    for (const Shape shape : {Shape{1024, 1}, Shape{1024, 2}, Shape{1024, 4}, Shape{1024, 8}, Shape{256, 1}}) {
        std::printf("%8d %9d", shape.n, shape.copies);
        if (!handoff_row(shape.n, shape.copies, 1, 0, sms)) return 1;
    }

    std::printf("\n4b. The same handoff (1,024 elements, one replica) with G reads of each element in flight,\n"
                "    each issued S cycles after the one before and issued again as soon as it finds the element late\n");
    std::printf("    (replicas G: writers store G replicas and read g reads replica g, so no two reads of an SM\n"
                "    are to the same line)\n");
    std::printf("%8s %9s %9s %8s %8s %8s %8s\n", "reads G", "stagger S", "replicas", "0 KB", "12 KB", "24 KB",
                "36 KB");
    struct Staggered {
        int reads, stagger, copies;
    };
    for (const Staggered v : {Staggered{1, 0, 1}, Staggered{2, 0, 1}, Staggered{2, 400, 1}, Staggered{2, 700, 1},
                              Staggered{3, 400, 1}, Staggered{1, 0, 2}, Staggered{2, 0, 2}, Staggered{2, 200, 2},
                              Staggered{2, 400, 2}, Staggered{2, 700, 2}, Staggered{3, 300, 3},
                              Staggered{3, 500, 3}}) {
        std::printf("%8d %9d %9d", v.reads, v.stagger, v.copies);
        if (!handoff_row(HANDOFF_N, v.copies, v.reads, v.stagger, sms)) return 1;
    }

    std::printf("\n4c. The same handoff (1,024 elements, one replica, one read in flight) among fewer blocks:\n"
                "    each L2 line of the vector has as many readers as there are blocks\n");
    std::printf("%8s %8s %8s %8s %8s\n", "blocks", "0 KB", "12 KB", "24 KB", "36 KB");
    for (int blocks : {sms, sms / 2, sms / 4, sms / 8, 8}) {
        std::printf("%8d", blocks);
        if (!handoff_row(HANDOFF_N, 1, 1, 0, blocks)) return 1;
    }

    std::printf("\n5. Handoff of a %d-element vector within each cluster, through distributed shared memory:\n"
                "   us per handoff (best of 2); every SM of the clusters that fit at once\n",
                CLUSTER_N);
    std::printf("%8s %9s %24s %26s %26s\n", "cluster", "clusters", "cluster barrier, 0 KB", "tagged polling, 0 KB",
                "tagged polling, 12 KB");
    CHECK(cudaFuncSetAttribute(cluster_handoffs, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CHECK(cudaFuncSetAttribute(cluster_handoffs, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    for (int cluster_size : {2, 3, 4, 6, 8, 12, 16}) {
        const size_t smem = 120 * 1024;  // one block per SM
        cudaLaunchConfig_t config = {};
        cudaLaunchAttribute attribute[1];
        attribute[0].id = cudaLaunchAttributeClusterDimension;
        attribute[0].val.clusterDim.x = cluster_size;
        attribute[0].val.clusterDim.y = 1;
        attribute[0].val.clusterDim.z = 1;
        config.attrs = attribute;
        config.numAttrs = 1;
        config.blockDim = dim3(HANDOFF_CONSUMERS + 32);
        config.dynamicSmemBytes = smem;
        config.gridDim = dim3(cluster_size);
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, (void*)cluster_handoffs, &config) != cudaSuccess || clusters == 0) {
            (void)cudaGetLastError();
            std::printf("%8d: not launchable here\n", cluster_size);
            continue;
        }
        config.gridDim = dim3(clusters * cluster_size);
        std::printf("%8d %9d", cluster_size, clusters);
        for (int variant = 0; variant < 3; ++variant) {
            const int rounds = 2000, tagged = variant > 0, depth = variant == 2 ? 1 : 0, slot_bytes = 12 * 1024;
            const float best = best_of_runs(start, stop, [&] {
                const cudaError_t err = cudaLaunchKernelEx(&config, cluster_handoffs, rounds, tag0, tagged,
                                                           (const unsigned char*)weights, depth, slot_bytes,
                                                           handoff_sink);
                tag0 += rounds;
                return err;
            });
            if (best < 0) return 1;
            std::printf(" %24.3f", best * 1e3 / rounds);
        }
        std::printf("\n");
    }
    std::printf("\n6. Reduction of a %d-element vector by atomic adds into L2, then a count and a read of all of it:\n"
                "   us per reduction (best of 2), by contributors a row, layout, order and copies in flight per SM\n",
                REDUCE_N);
    std::printf("%-34s %8s %8s %8s\n", "variant", "0 KB", "12 KB", "24 KB");
    unsigned long long* sums;
    const size_t sums_bytes = 3 * (size_t)REDUCE_N * REDUCE_MAX_STRIDE * sizeof(unsigned long long);
    CHECK(cudaMalloc(&sums, sums_bytes));
    CHECK(cudaFuncSetAttribute(reductions, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    struct Reduction {
        const char* name;
        int groups, stride, rotate, kind;
    };
    const Reduction reduction_variants[] = {
        {"all blocks, u64, packed", 1, 1, 0, 0},           {"all blocks, u64, packed, rotated", 1, 1, 1, 0},
        {"all blocks, u64, 32 B apart, rotated", 1, 4, 1, 0}, {"all blocks, u64, 128 B apart, rotated", 1, 16, 1, 0},
        {"all blocks, f32, packed, rotated", 1, 1, 1, 1},   {"all blocks, f32 x4, packed, rotated", 1, 1, 1, 2},
        {"8 groups, u64, packed", 8, 1, 0, 0},             {"8 groups, u64, packed, rotated", 8, 1, 1, 0},
        {"8 groups, u64, 32 B apart, rotated", 8, 4, 1, 0}, {"16 groups, u64, packed, rotated", 16, 1, 1, 0},
    };
    for (const Reduction& v : reduction_variants) {
        std::printf("%-34s", v.name);
        for (int depth : {0, 1, 2}) {
            int n = REDUCE_N, groups = v.groups, stride = v.stride, rotate = v.rotate, kind = v.kind;
            int rounds = 1000, slot_bytes = 12 * 1024;
            void* args[] = {&sums, &count, &n, &groups, &stride, &rotate, &kind, &rounds,
                            &weights, &depth, &slot_bytes, &handoff_sink};
            const size_t smem = std::max(depth * slot_bytes, 120 * 1024);
            const float best = best_of_runs(start, stop, [&] {
                cudaError_t err = cudaMemsetAsync(sums, 0, sums_bytes);
                if (err == cudaSuccess) err = cudaMemsetAsync(count, 0, sizeof(unsigned long long));
                if (err == cudaSuccess)
                    err = cudaLaunchCooperativeKernel((void*)reductions, sms, HANDOFF_CONSUMERS + 32, args, smem, 0);
                return err;
            });
            if (best < 0) return 1;
            std::printf(" %8.3f", best * 1e3 / rounds);
        }
        std::printf("\n");
    }
    return 0;
}
