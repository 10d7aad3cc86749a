// What the decode kernel's design depends on, measured on its own (issue 4):
//
//  1. How the latency of one L2 round trip (the kind every decode phase has
//     on its critical path: reading the input vector, the grid barrier)
//     grows while each SM keeps D bulk copies of weights in flight.
//  2. What bandwidth those bulk copies reach, per depth D.
//  3. What one grid barrier costs (release add + acquire spin), alone, and
//     with relaxed polling or a back-off between polls.
//
// Standalone (no qwen-mk code): on the device machine,
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/memory_probe benches/memory_probe.cu
//   /tmp/memory_probe            (or `/tmp/memory_probe barriers`: part 3 only)
// One block per SM. In part 1 each block's thread 32 streams its own 6 MB
// region of a 1 GB buffer through D shared-memory slots (a slot is refilled
// as soon as its copy lands), while thread 0 chases pointers through a
// 256 KB table that stays in L2 (ld.global.cg) for as long as the stream
// runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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
        for (int i = 0; i < MAX_SLOTS; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(full + i)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        stream_done = depth == 0;
    }
    __syncthreads();
    const unsigned char* region = weights + (size_t)blockIdx.x * REGION_BYTES;

    if (threadIdx.x == 32 && depth > 0) {
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
        for (int i = depth; i < copies + depth; ++i) {
            const int done = i - depth;  // the copy to retire before reusing its slot
            wait_parity(full + done % depth, (done / depth) & 1);
            if (i < copies) issue(i);
        }
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

int main(int argc, char** argv) {
    // `memory_probe barriers` runs part 3 only.
    const bool stream_parts = !(argc > 1 && std::string(argv[1]) == "barriers");
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);

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
        float best = 1e9f;
        for (int rep = 0; rep < 3; ++rep) {
            void* args[] = {&count, &rounds, &relaxed, &sleep_ns};
            CHECK(cudaEventRecord(start));
            CHECK(cudaLaunchCooperativeKernel((void*)barriers, sms, 512, args, 0, 0));
            CHECK(cudaEventRecord(stop));
            CHECK(cudaEventSynchronize(stop));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (rep > 0) best = std::min(best, ms);
        }
        std::printf("%-24s %.3f us per barrier (512 threads per block, best of 2)\n", v.name, best * 1e3 / rounds);
    }
    return 0;
}
