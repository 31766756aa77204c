// Runs lab/tensor_cores.py's CUDA C kernel on the CPU, for the lab's tests on machines without a GPU.
//
// The kernel's own source is compiled by the host C++ compiler with this header in front of it. Each block
// runs as blockDim.x std::threads (blocks one after another), so that __shared__ arrays (statics here) are
// shared by the block's threads and __syncthreads() is a real barrier. The tensor-core instruction
// (mma.sync.m16n8k8 .tf32) is emulated as a warp-collective operation with the fragment layouts of the PTX
// ISA: every lane publishes its registers, then computes the elements of D it owns from the whole warp's
// A and B. Its barriers are the warp's own (as mma.sync synchronises one warp, not the block), so a
// missing __syncthreads() between warps stays a race here too. A kernel that put an element in the wrong
// register, lane or row would get wrong numbers here, as on the GPU. What is not emulated: the tensor
// cores' own summation order inside one mma (it adds in float, k in order), timing, uninitialised shared
// memory (statics start at zero), alignment faults, and memory races other than those the barriers order.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct tc_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local tc_dim3 threadIdx, blockIdx;
static tc_dim3 blockDim, gridDim;
static std::barrier<>* tc_block_barrier = nullptr;
static std::vector<std::barrier<>*> tc_warp_barriers;
static const int TC_MAX_THREADS = 1024;
// per thread of the running block: the __syncthreads() it has arrived at (TC_DONE once its kernel returned)
static std::atomic<long> tc_arrivals[TC_MAX_THREADS];
static const long TC_DONE = 1L << 62;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct alignas(8) uint2 {
    unsigned x, y;
};

inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct alignas(8) int2 {
    int x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline void __syncthreads() {
    tc_arrivals[threadIdx.x].fetch_add(1);
    tc_block_barrier->arrive_and_wait();
}

inline unsigned tc_float_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float tc_bits_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline unsigned __float_as_uint(float f) { return tc_float_bits(f); }
inline float __int_as_float(int i) { return tc_bits_float(static_cast<unsigned>(i)); }
using std::min;

// cvt.rna.tf32.f32: round the mantissa to 10 bits, to nearest, ties away from zero (on the magnitude)
inline unsigned tc_host_tf32(float x) { return (tc_float_bits(x) + 0x1000u) & 0xFFFFE000u; }

static const int TC_MAX_WARPS = 32;
static unsigned tc_a_regs[TC_MAX_WARPS][32][4];
static unsigned tc_b_regs[TC_MAX_WARPS][32][2];

// d += A (16x8) * B (8x8) for the warp; a, b, d as mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
// holds them: groupID g = lane >> 2, t = lane % 4;
//   a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)   [row, column of A]
//   b0 (t, g), b1 (t + 4, g)                                     [row, column of B]
//   d0 (g, 2t), d1 (g, 2t + 1), d2 (g + 8, 2t), d3 (g + 8, 2t + 1)
inline void tc_host_mma(float d[4], const unsigned a[4], const unsigned b[2]) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int r = 0; r < 4; ++r) tc_a_regs[warp][lane][r] = a[r];
    for (int r = 0; r < 2; ++r) tc_b_regs[warp][lane][r] = b[r];
    tc_warp_barriers[warp]->arrive_and_wait();
    const unsigned g = lane >> 2, t = lane & 3;
    for (int q = 0; q < 4; ++q) {
        const unsigned row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
        float sum = 0.0f;
        for (unsigned k = 0; k < 8; ++k) {
            const unsigned a_lane = (row % 8) * 4 + (k % 4), a_reg = (row >= 8) + 2 * (k >= 4);
            const unsigned b_lane = col * 4 + (k % 4), b_reg = (k >= 4);
            sum += tc_bits_float(tc_a_regs[warp][a_lane][a_reg]) * tc_bits_float(tc_b_regs[warp][b_lane][b_reg]);
        }
        d[q] += sum;
    }
    tc_warp_barriers[warp]->arrive_and_wait();  // no lane republishes before every lane of its warp has read
}

// For the tests' negative controls: warp 0 falls a barrier behind the rest of its block. Each of its threads
// waits here until every thread of the other warps has arrived at its next __syncthreads() (or returned). With
// the barriers the kernel needs, the others are then held at that barrier and the delay is harmless; with one
// missing, they have run on into the work it should have held back, and warp 0 goes on only after that. An
// order, not a timing: the verdict is the same on a loaded machine (no sleeps).
inline void tc_host_skew(int warp) {
    if (warp != 0) return;
    const long mine = tc_arrivals[threadIdx.x].load();
    for (unsigned t = 32; t < blockDim.x; ++t)
        while (tc_arrivals[t].load() <= mine) std::this_thread::yield();
}

// Launch: blocks in order, each as blockDim.x threads.
template <typename Kernel>
void tc_host_launch(unsigned gx, unsigned gy, unsigned threads, Kernel body) {
    gridDim = {gx, gy, 1};
    blockDim = {threads, 1, 1};
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
    tc_block_barrier = &barrier;
    for (unsigned w = 0; w < threads / 32; ++w) tc_warp_barriers.push_back(new std::barrier<>(32));
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::vector<std::thread> team;
            team.reserve(threads);
            for (unsigned t = 0; t < threads; ++t) tc_arrivals[t] = 0;
            for (unsigned t = 0; t < threads; ++t) {
                team.emplace_back([=] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    body();
                    tc_arrivals[t] = TC_DONE;
                });
            }
            for (auto& th : team) th.join();
        }
    }
    tc_block_barrier = nullptr;
    for (auto* b : tc_warp_barriers) delete b;
    tc_warp_barriers.clear();
}
