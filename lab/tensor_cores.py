"""LAB (not in the product; lab/README.md): the fast mode's stride-1 transposed conv on the tensor cores, an
implicit GEMM in TF32 (CuPy RawKernel). Plugged into a run by lab.variants.TensorCores.

Why. GPU run 7 (bench/GPU_NOTES.md) left the fast mode at 0.80x (allcnn-mnist) and 0.42x (vgg16-fcn) of
plain torch with TF32 convolutions: its GEMMs ran on the tensor cores, but its columns cost as much memory
traffic as the GEMMs saved, and the sparse kernel (sparse_kernels.py) is float32 FMA on the CUDA cores.
Numba cannot emit tensor-core instructions, so this kernel is CUDA C, compiled by CuPy (NVRTC), with the
one instruction written as inline PTX: ``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32``.

What it computes: the transposed conv of sparse_kernels.py, without skipping zeros and in TF32,

    out[i, t, y, x] = sum over o, ky, kx of weight[o, i, ky, kx] * U[o, t, y + ph - ky, x + pw - kx]

as the GEMM out (I x P) = A (I x K) @ B (K x P), P = n*H*W pixels, K = kh*kw*O ordered (tap, o): A is the
weight rounded to TF32 once and stored in mma fragment order (weight_layout; the plan's "tensor"), and B is never
stored: each block gathers its (BK x BN) slice into shared memory from the source, a dense plane
(C, n, Hs, Ws) or a pool's unpooled plane read through its switches' window offsets (non-overlapping pools
only: kernel <= stride), rectified as read when ``rect``, rounded to TF32 (cvt.rna) as it is staged. A step
of K is BK channels of one tap, so a thread's source pixel and its bounds test serve the whole step; sums
are float32 on the tensor cores.

How the work is laid out. A block of 4 warps owns BM output channels x BN pixels (TILES: 64 x 64; 32 x 128
when I <= 32, so that a 32-channel layer wastes no half of its M; 128 x 64 for wide layers with ``wide``);
each warp a (16 MI) x 32 piece as MI x 4 mma tiles of 16 x 8, 16 MI float accumulators per thread. Per step
of BK = 32 along K, the next step's A and B slices are loaded into registers while the tensor cores work on
the current one from shared memory. A is stored in fragment order (weight_layout), so its staging is a copy
of 16-byte pieces and each A fragment one 16-byte shared load into the registers the mma reads; B is staged
as (b0, b1) pairs, swizzled against bank conflicts, one 8-byte shared load per B fragment. Accumulators go
straight to global memory: a quad of lanes writes 8 consecutive pixels of one channel. The sm_90 SASS of the
loop (NVRTC 13.5 + ptxas, 3x3 conv; `python -m bench.kernel_report --only tc_`) has ~10-12 instructions per
mma on 64 x 64 tiles (~314 dense, ~382 behind a pool, per 32 mma), ~14-17 on 32 x 128 tiles, ~5.5-6.7 on
128 x 64 tiles (~352-426 per 64 mma), at 128-168 registers (MIN_BLOCKS). No spills.

The halo kernel (``halo``; PATCHES, patch()): the same GEMM, but a block's BN pixels are a
TH x TW patch of one signal's output, and per chunk of BK source channels the patch's (TH + kh - 1) x
(TW + kw - 1) source pixels are staged once, unpooled, rectified and rounded, as (b0, b1) channel pairs; every
tap then reads its B fragments from them with a constant shift, and A, one tap at a time, is double-buffered
in shared memory. For a 3x3 conv on 8 x 8 patches that is 100 gathers per channel instead of 576. Where each
halo pixel reads (its source cell and switch offset) is worked out once per block, so staging a value costs
~25 instructions (~31 behind a pool). Its sm_90 loop: ~3.7 instructions per mma per tap on 64 x 64 tiles
(~2.9 on 128 x 64), plus the staging, ~5.9 (~4.0) in all against the flat kernel's ~9.8 (~5.5); behind a
pool ~6.4 against ~11.9.

Without a GPU (Numba's CUDA simulator: the tests), the same source is compiled by the host C++ compiler
with tc_host.hpp in front of it, which runs each block as threads and emulates the mma instruction with
the PTX ISA's fragment layouts, so the CI tests run this kernel's own indexing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np



def _dv():
    # the backend's device module, imported on first use: bench/kernel_report.py reads the sources here on a
    # machine with neither a GPU nor CuPy
    from clearmaps.kernels.cuda import device

    return device

BK = 32
THREADS = 128
# A source of fewer channels fills a fraction of each step of BK (the rest are zeros multiplied): the input
# layer's 1 or 3 channels stay on the direct kernel / columns + GEMM.
MIN_CHANNELS = 16

# What both kernels share: the tile's macros, TF32 rounding and the mma.
_PRELUDE = r"""
#define BK 32
#define THREADS 128
#define WARPS_N (4 / WARPS_M)
#define WROWS (MI * 16)  // a warp's rows: MI mma tiles of 16; its columns: 4 tiles of 8
#define TAPS (KH * KW)
#define A_VECS (BM * BK / 4 / THREADS)  // 128-bit pieces of A per thread and step
// MIN_BLOCKS (tensor_cores.MIN_BLOCKS) is for sm_90; before it, 128-row tiles spill at 168 registers
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900 && BM == 128
#define BLOCKS_PER_SM 2
#else
#define BLOCKS_PER_SM MIN_BLOCKS
#endif
static_assert(THREADS == BK / 8 * 32, "a step's A of one 16-row group is one piece per thread");

__device__ __forceinline__ unsigned to_tf32(float x) {
#ifdef __CUDA_ARCH__
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    return tc_host_tf32(x);
#endif
}

// The source cell that unpooled pixel (u, w) of the (Hu, Wu) plane reads: behind a pool (POOLED) the index of
// its window in the pooled (Hs, Ws) plane, with d its offset in that window, which the window's switch must
// equal; on a dense source its own index. ``inside`` (in: whether the pixel is wanted at all) comes out false,
// and the cell 0 (a valid address, read and then selected away), off the plane or in a gap between windows.
__device__ __forceinline__ int source_cell(int u, int w, int Hu, int Wu, int Hs, int Ws, bool& inside, int& d) {
    inside = inside && u >= 0 && u < Hu && w >= 0 && w < Wu;
#if POOLED
    const int pp = (u + PPH) / PSH, qq = (w + PPW) / PSW;
    const int dy = u + PPH - pp * PSH, dx = w + PPW - qq * PSW;
    inside = inside && dy < PKH && dx < PKW && pp < Hs && qq < Ws;
    d = dy * PKW + dx;
    return inside ? pp * Ws + qq : 0;
#else
    d = 0;
    return inside ? u * Ws + w : 0;
#endif
}

__device__ __forceinline__ void mma_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef __CUDA_ARCH__
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    tc_host_mma(d, a, b);
#endif
}
"""

# The flat kernel: a block's BN pixels are consecutive in (signal, row, column); B is gathered per tap.
_SOURCE = r"""
#define B_LOADS (BK * BN / THREADS)
#define B_ROW_STEP (THREADS / BN)
static_assert(4 % B_ROW_STEP == 0, "a thread stages both rows k and k + 4 of its column");

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM) tc_transpose(
        const float* __restrict__ src, const int* __restrict__ offs, const uint4* __restrict__ weight,
        const float* __restrict__ bias, float* __restrict__ out, int O, int I, int n, int Hs, int Ws, int Hu,
        int Wu, int H, int W, int b0, int kc, int rect) {
    // A comes in fragment order (weight_layout): per 16 rows and 8 columns, lane l's four registers a0..a3
    // are 16 consecutive bytes, so a step's A tile is a plain copy (one 128-bit load and store per piece) and
    // each fragment one 128-bit shared load straight into the four registers the mma reads (a warp reads
    // 512 consecutive bytes: no bank conflicts).
    __shared__ uint4 As[BM / 16][BK / 8 * 32];
    // B in pairs: per 8 rows (k8) and column n, rows t and t + 4 (a fragment's b0, b1) are adjacent words, pair
    // t stored at t ^ ((n / 4) % 4): a 64-bit store per pair when staging, a 64-bit load per fragment, and no
    // bank conflicts for either (a half-warp's 16 columns, or 4 columns x 4 pairs, cover the 32 banks).
    __shared__ uint2 Bs[BK / 8][BN][4];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int g = lane >> 2, t4 = lane & 3;
    const int HW = H * W, P = n * HW;
    const int i0 = blockIdx.y * BM;
    const int p0 = blockIdx.x * BN;

    // this thread's B column: one pixel (signal t, row y, column x) for the whole K loop
    const int bn = tid % BN, bk0 = tid / BN;
    const int p = p0 + bn;
    const bool pixel = p < P;
    const int ts = pixel ? p / HW : 0;
    const int rem = pixel ? p - ts * HW : 0;
    const int y = rem / W, x = rem - (rem / W) * W;
#if POOLED
    const int obase = (b0 + ts / kc) * O;  // the image's switches (classes share them)
#endif
    uint4 ra[A_VECS];  // this thread's pieces of A: piece tid of each of the tile's BM / 16 row groups
    float rb[B_LOADS];
    float acc[MI][4][4];
    for (int mi = 0; mi < MI; ++mi)
        for (int ni = 0; ni < 4; ++ni)
            for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

    // K runs over (tap, o) in steps of BK channels of one tap: the tap, and with it this thread's source
    // pixel and its bounds, are the same for a whole step. The weight is padded with zeros (launch()):
    // OP = O rounded up to BK channels, rows up to a multiple of 128; so A needs no masks, and B's channels
    // past O (read clamped, then zeroed) meet zero weights anyway.
    const int OB = (O + BK - 1) / BK, OP = OB * BK, steps = TAPS * OB;
    const int plane = Hs * Ws, nplane = n * plane;
    const float lowest = rect ? 0.0f : __int_as_float(0xff800000);  // -inf; rectify as read: v < lowest -> lowest
    // A's 16-row groups are TAPS * OP / 8 fragments of 32 pieces long; a step reads BK / 8 fragments of each
    // of its BM / 16 groups: 4 * 32 = THREADS consecutive pieces per group, piece tid for this thread
    const int K8 = TAPS * OP / 8;
    const uint4* wrow = weight + (i0 / 16) * K8 * 32 + tid;
    auto load = [&](int tap, int c0) {
        // every load below reads a valid address and what must be zero is selected away after it: no
        // branches around loads. 32-bit indices: launch() refuses arrays of 2^31 elements or more.
        const uint4* wq = wrow + (tap * OP + c0) / 8 * 32;
#pragma unroll
        for (int j = 0; j < A_VECS; ++j) ra[j] = wq[j * K8 * 32];
        const int ky = tap / KW, kx = tap - (tap / KW) * KW;
        const int u = y + PH - ky, w = x + PW - kx;
        bool inside = pixel;
        int d;
        const int cell = source_cell(u, w, Hu, Wu, Hs, Ws, inside, d);
        const float* vq = src + ((c0 + bk0) * n + ts) * plane + cell;  // channel c0 + bk0 + r at vq[r * nplane]
#if POOLED
        const int* oq = offs + (obase + c0 + bk0) * plane + cell;  // ... its switch's offset at oq[r * plane]
#endif
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            const int r = j * B_ROW_STEP, o = c0 + bk0 + r;
            const int rc = FULL_CHUNKS ? r : min(o, O - 1) - c0 - bk0;
            float v = vq[rc * nplane];
            // rectified when rect, as the reference does it: a NaN stays NaN (fmaxf would make it 0, silently;
            // it was ~15% fewer instructions behind a pool)
            v = v < lowest ? lowest : v;
#if POOLED
            v = oq[rc * plane] == d ? v : 0.0f;
#endif
            rb[j] = (inside && (FULL_CHUNKS || o < O)) ? v : 0.0f;
        }
    };
    auto stage = [&]() {  // A is TF32 already (launch()); B is rounded here
#pragma unroll
        for (int j = 0; j < A_VECS; ++j) As[j][tid] = ra[j];
        // rb[j] is row k = bk0 + j B_ROW_STEP (bk0 < B_ROW_STEP, which divides 4): k % 8 < 4 for the j with
        // (j B_ROW_STEP) % 8 < 4, and row k + 4 is rb[j + 4 / B_ROW_STEP]
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            const int k = bk0 + j * B_ROW_STEP;
            if ((j * B_ROW_STEP) % 8 < 4)
                Bs[k / 8][bn][(k % 4) ^ ((bn / 4) % 4)] = make_uint2(to_tf32(rb[j]), to_tf32(rb[j + 4 / B_ROW_STEP]));
        }
    };

    int tap = 0, c0 = 0;  // the step being computed
    load(0, 0);
    stage();
    __syncthreads();
    for (int s = 0; s < steps; ++s) {
        const bool more = s + 1 < steps;
        const int ntap = c0 + BK < OP ? tap : tap + 1, nc0 = c0 + BK < OP ? c0 + BK : 0;
        if (more) load(ntap, nc0);  // in flight while the tensor cores work on this step
#pragma unroll
        for (int ks = 0; ks < BK; ks += 8) {
            unsigned a[MI][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const uint4 f = As[wm * MI + mi][ks / 8 * 32 + lane];  // (g, t4), (g + 8, t4), (g, t4 + 4), (g + 8, t4 + 4)
                a[mi][0] = f.x;
                a[mi][1] = f.y;
                a[mi][2] = f.z;
                a[mi][3] = f.w;
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = wn * 32 + ni * 8 + g;
                const uint2 f = Bs[ks / 8][col][t4 ^ ((col / 4) % 4)];  // (t4, g), (t4 + 4, g)
                b[ni][0] = f.x;
                b[ni][1] = f.y;
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
        }
        __syncthreads();
        if (more) {
            stage();
            __syncthreads();
        }
        tap = ntap;
        c0 = nc0;
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int i = i0 + wm * WROWS + mi * 16 + g + (q >> 1) * 8;
                const int pc = p0 + wn * 32 + ni * 8 + 2 * t4 + (q & 1);
#if BIAS
                if (i < I && pc < P) out[i * P + pc] = acc[mi][ni][q] + bias[i];
#else
                if (i < I && pc < P) out[i * P + pc] = acc[mi][ni][q];
#endif
            }
}
"""

# The halo kernel (``halo``): a block's BN pixels are a TH x TW patch of one signal's output. Per chunk of BK source
# channels it stages the patch's (TH + KH - 1) x (TW + KW - 1) source pixels once (unpooled, rectified,
# rounded), then runs every tap from shared memory, a tap being a constant shift of each lane's pixel: for
# 3x3 on 8 x 8 patches, 100 gathers per channel where the flat kernel makes 576.
_HALO_SOURCE = r"""
#define HH (TH + KH - 1)
#define HW2 (TW + KW - 1)
#define HP (HH * HW2)                 // halo pixels
#define PAIRS (BK / 2 * HP)           // (8-channel group, halo pixel, channel pair) items of a chunk
#define PAIR_ITERS ((PAIRS + THREADS - 1) / THREADS)
static_assert(THREADS % 4 == 0 && PAIRS % 4 == 0, "a thread stages the same channel pair at every step");
#ifndef STAGE_UNROLL
#define STAGE_UNROLL 2
#endif

extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM) tc_transpose(
        const float* __restrict__ src, const int* __restrict__ offs, const uint4* __restrict__ weight,
        const float* __restrict__ bias, float* __restrict__ out, int O, int I, int n, int Hs, int Ws, int Hu,
        int Wu, int H, int W, int b0, int kc, int rect) {
    // A in fragment order (weight_layout), one tap's BK columns at a time, double-buffered: a fragment is one
    // 128-bit load. B: per 8 channels and halo pixel, pair p holds channels p and p + 4 (a fragment's b0, b1)
    // as one 64-bit word; a half-warp's fragment loads read 4 consecutive pixels x 4 pairs: 128 consecutive
    // bytes, no bank conflicts, and the staging stores go to consecutive words.
    __shared__ uint4 As[2][BM / 16][BK / 8 * 32];
    __shared__ uint2 Bs[BK / 8][HP][4];
    __shared__ int2 Hc[HP];  // per halo pixel: its source cell (-1: reads nothing) and switch offset
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int g = lane >> 2, t4 = lane & 3;
    const int tiles_x = (W + TW - 1) / TW, tiles_y = (H + TH - 1) / TH;
    const int txi = blockIdx.x % tiles_x, rr = blockIdx.x / tiles_x;
    const int tyi = rr % tiles_y, ts = rr / tiles_y;  // the patch's column, row, and its signal
    const int y0 = tyi * TH, x0 = txi * TW;
    const int u0 = y0 + PH - (KH - 1), v0 = x0 + PW - (KW - 1);  // the halo's origin in the source plane
    const int i0 = blockIdx.y * BM;
    const int HWo = H * W;
#if POOLED
    const int obase = (b0 + ts / kc) * O;  // the image's switches (classes share them)
#endif
    const int plane = Hs * Ws;
    const float lowest = rect ? 0.0f : __int_as_float(0xff800000);  // -inf; rectify as read: v < lowest -> lowest
    const int OB = (O + BK - 1) / BK, OP = OB * BK, K8 = TAPS * OP / 8;

    // the halo pixel of each of this lane's B columns (patch pixel wn*32 + ni*8 + g), before the tap's shift
    int pb[4];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        const int col = wn * 32 + ni * 8 + g;
        pb[ni] = (col / TW) * HW2 + col % TW;
    }
    float acc[MI][4][4];
    for (int mi = 0; mi < MI; ++mi)
        for (int ni = 0; ni < 4; ++ni)
            for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

    uint4 ra[A_VECS];
    const uint4* wrow = weight + (i0 / 16) * K8 * 32 + tid;
    auto load_a = [&](int kb) {  // the BK columns from column 8 kb: 4 fragments x 32 pieces per 16 rows
#pragma unroll
        for (int j = 0; j < A_VECS; ++j) ra[j] = wrow[j * K8 * 32 + kb * 32];
    };
    auto store_a = [&](int buf) {
#pragma unroll
        for (int j = 0; j < A_VECS; ++j) As[buf][j][tid] = ra[j];
    };
    // Where each halo pixel reads (bounds, pooled window, switch offset) is the same for every chunk of
    // channels: worked out once here (made visible by the chunk loop's first barrier), so that staging a value
    // is a shared load, two global loads and a select, with no division by the halo's width or the pool's.
    for (int p = tid; p < HP; p += THREADS) {
        bool inside = true;
        int d;
        const int cell = source_cell(u0 + p / HW2, v0 + p % HW2, Hu, Wu, Hs, Ws, inside, d);
        Hc[p] = make_int2(inside ? cell : -1, d);
    }
    auto stage_b = [&](int c0) {
        // every load reads a valid address; what must be zero is selected away after it (as the flat kernel).
        // Unrolled by STAGE_UNROLL only: fully unrolled, the compiler put all the loads in flight and spilled.
        const int pr = tid % 4;  // item q = 4 j + pr: THREADS % 4 == 0, so a thread's pair is fixed
#pragma unroll STAGE_UNROLL
        for (int it = 0; it < PAIR_ITERS; ++it) {
            const int j = tid / 4 + it * (THREADS / 4);  // the item's (8-channel group, halo pixel)
            if (PAIRS % THREADS == 0 || j < PAIRS / 4) {
                const int pix = j % HP, grp = j / HP;
                const int2 hc = Hc[pix];
                const bool inside = hc.x >= 0;
                const int cell = inside ? hc.x : 0, d = hc.y;
                unsigned r[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int o = c0 + grp * 8 + pr + 4 * h;
                    const int oc = FULL_CHUNKS ? o : min(o, O - 1);
                    float v = src[(oc * n + ts) * plane + cell];
                    v = v < lowest ? lowest : v;  // a NaN stays NaN, as in the reference
#if POOLED
                    v = offs[(obase + oc) * plane + cell] == d ? v : 0.0f;
#endif
                    r[h] = to_tf32((inside && (FULL_CHUNKS || o < O)) ? v : 0.0f);
                }
                Bs[grp][pix][pr] = make_uint2(r[0], r[1]);
            }
        }
    };

    int buf = 0;
    load_a(0);
    for (int c0 = 0; c0 < OP; c0 += BK) {
        __syncthreads();  // the previous chunk's readers are done
        stage_b(c0);
        store_a(buf);
        __syncthreads();
#pragma unroll 1
        for (int tap = 0; tap < TAPS; ++tap) {
            const bool next_tap = tap + 1 < TAPS;
            if (next_tap || c0 + BK < OP)  // in flight while the tensor cores work on this tap
                load_a(next_tap ? ((tap + 1) * OP + c0) / 8 : (c0 + BK) / 8);
            const int shift = (KH - 1 - tap / KW) * HW2 + (KW - 1 - tap % KW);
#pragma unroll
            for (int kk = 0; kk < BK / 8; ++kk) {
                unsigned a[MI][4], b[4][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const uint4 f = As[buf][wm * MI + mi][kk * 32 + lane];
                    a[mi][0] = f.x;
                    a[mi][1] = f.y;
                    a[mi][2] = f.z;
                    a[mi][3] = f.w;
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const uint2 f = Bs[kk][pb[ni] + shift][t4];  // channels (t4, t4 + 4) at the shifted pixel
                    b[ni][0] = f.x;
                    b[ni][1] = f.y;
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
            }
            if (next_tap) {  // the next tap's A into the other buffer, read by nobody since the last barrier
                store_a(buf ^ 1);
                __syncthreads();
                buf ^= 1;
            }
        }
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int i = i0 + wm * WROWS + mi * 16 + g + (q >> 1) * 8;
                const int col = wn * 32 + ni * 8 + 2 * t4 + (q & 1);
                const int y = y0 + col / TW, x = x0 + col % TW;
                if (i < I && y < H && x < W) {
#if BIAS
                    out[(i * n + ts) * HWo + y * W + x] = acc[mi][ni][q] + bias[i];
#else
                    out[(i * n + ts) * HWo + y * W + x] = acc[mi][ni][q];
#endif
                }
            }
}
"""

_HOST_ENTRY = r"""
extern "C" void tc_launch(unsigned gx, unsigned gy, const float* src, const int* offs, const float* weight,
                          const float* bias, float* out, int O, int I, int n, int Hs, int Ws, int Hu, int Wu,
                          int H, int W, int b0, int kc, int rect) {
    tc_host_launch(gx, gy, THREADS, [=] {
        tc_transpose(src, offs, reinterpret_cast<const uint4*>(weight), bias, out, O, I, n, Hs, Ws, Hu, Wu, H, W,
                     b0, kc, rect);
    });
}
"""

_NO_POOL = (1, 1, 1, 1, 0, 0)


# Block tiles: BM output channels x BN pixels, by 4 warps (WARPS_M along M) of MI x 4 mma tiles each.
TILES = {32: dict(BN=128, WARPS_M=1, MI=2), 64: dict(BN=64, WARPS_M=2, MI=2), 128: dict(BN=64, WARPS_M=2, MI=4)}
# Blocks an SM must hold (dense source, behind a pool), which caps the registers at 65536 / (128 x blocks): left
# free, ptxas gave the 128 x 64 tile behind a pool 246 registers (2 blocks, 8 warps per SM) to keep more
# loads in flight. One block less for the 32 x 128 tile behind a pool, which spills at 128 registers.
MIN_BLOCKS = {32: (4, 3), 64: (4, 4), 128: (3, 3)}
# ``wide``: 128-channel tiles for layers of at least 128 output channels: each gathered B element then feeds
# twice the mma, at 64 accumulators per thread (fewer warps per SM) (bench method cuda-fast-tc-wide).
ROW_PAD = 128  # weight_layout pads the rows to a multiple of the largest BM


def tile_m(I: int, wide: bool = False) -> int:
    """Output channels per block: 32 when the layer has at most 32 (each block then covers 128 pixels), 128
    for 128 or more when ``wide``, else 64."""
    return 32 if I <= 32 else 128 if wide and I >= 128 else 64


def supports(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, pool: tuple | None) -> bool:
    """Whether this kernel can do the transposed conv: stride 1, padding inside the kernel, and a dense
    source or a pool whose windows do not overlap (kernel <= stride: each unpooled pixel has one window)."""
    if (sh, sw) != (1, 1) or not (0 <= ph < kh and 0 <= pw < kw):
        return False
    if pool is not None:
        pkh, pkw, psh, psw, pph, ppw = pool
        if pkh > psh or pkw > psw or pph < 0 or ppw < 0:
            return False
    return True


def fits(src_size: int, out_size: int) -> bool:
    """Whether the kernel's 32-bit indices reach every element of the source and of the output."""
    return max(int(src_size), int(out_size)) < 2**31


def padded_shape(O: int, I: int, kh: int, kw: int) -> tuple:
    """The shape weight_layout gives a transposed conv of O -> I channels, (I' / 16, kh * kw * O' / 8, 32, 4):
    rows I' = I rounded up to ROW_PAD, channels O' = O to BK, in mma fragments."""
    return -(-I // ROW_PAD) * ROW_PAD // 16, kh * kw * (-(-O // BK) * BK) // 8, 32, 4


def weight_layout(w) -> np.ndarray:
    """The A operand of the transposed conv whose weight is ``w`` (O, I, kh, kw) (out[i] gets w[o, i] times
    source channel o), rounded to TF32, in the order the kernel's mma fragments read it.

    As a matrix A (I' x K'), row i, column k = (ky * kw + kx) * O' + o, with I' = I rounded up to ROW_PAD rows
    and O' = O to BK channels, zeros in the padding. Stored as (I' / 16, K' / 8, 32, 4): per 16 rows and 8
    columns, lane l = 4 g + t of a warp holds A's (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4) (the PTX ISA's
    a0..a3 of mma.m16n8k8 .tf32), 16 consecutive bytes. A forward conv's is that of its flipped kernels,
    ``w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)``."""
    O, I, kh, kw = w.shape
    rows, K8 = padded_shape(O, I, kh, kw)[:2]
    a = np.zeros((rows * 16, kh, kw, K8 * 8 // (kh * kw)), np.float32)
    a[:I, :, :, :O] = np.asarray(w, np.float32).transpose(1, 2, 3, 0)
    # (m, r, g, kb, c, t) with row 16 m + 8 r + g and column 8 kb + 4 c + t -> (m, kb, g, t, c, r): register 2 c + r
    a = a.reshape(rows, 2, 8, K8, 2, 4).transpose(0, 3, 2, 5, 4, 1)
    return round_tf32(a.reshape(rows, K8, 32, 4))


def round_tf32(a) -> np.ndarray:
    """``a`` as C-contiguous float32 rounded to TF32 as cvt.rna does (10 mantissa bits, to nearest, ties away
    from zero): the weights are staged as they are, the source is rounded in the kernel."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def source(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, bm: int, full: bool, bias: bool = False,
           patch: tuple | None = None) -> str:
    """The CUDA C source of one specialisation (geometry and tile as macros; ``full``: the source has a
    multiple of BK channels, so no step has channels to mask; ``bias``: bias[i] is added to the output;
    ``patch`` (TH, TW): the halo kernel on TH x TW output patches, else the flat kernel)."""
    pkh, pkw, psh, psw, pph, ppw = pool or _NO_POOL
    defines = dict(KH=kh, KW=kw, PH=ph, PW=pw, POOLED=int(pool is not None), PKH=pkh, PKW=pkw, PSH=psh,
                   PSW=psw, PPH=pph, PPW=ppw, BM=bm, **TILES[bm], MIN_BLOCKS=MIN_BLOCKS[bm][pool is not None],
                   FULL_CHUNKS=int(bool(full)), BIAS=int(bool(bias)))
    if patch:
        defines.update(TH=patch[0], TW=patch[1])
    return ("".join(f"#define {k} {v}\n" for k, v in defines.items()) + _PRELUDE +
            (_HALO_SOURCE if patch else _SOURCE))


# The halo kernel's output patches (TH, TW) for each tile's BN pixels; patch() picks the one that covers a
# layer's plane with the least waste (28 x 28 on 8 x 8 patches computes 32 x 32: 31% more).
PATCHES = {64: ((8, 8), (4, 16), (2, 32)), 128: ((8, 16), (4, 32))}
SHARED_LIMIT = 48 << 10


def halo_shared_bytes(kh: int, kw: int, bm: int, patch: tuple) -> int:
    """The halo kernel's static shared memory: A double-buffered (2 x BM x BK floats), the staged halo
    (BK channels x (TH + kh - 1) x (TW + kw - 1) pixels) and each halo pixel's source cell (two ints)."""
    return 2 * bm * BK * 4 + (BK * 4 + 8) * (patch[0] + kh - 1) * (patch[1] + kw - 1)


def patch(kh: int, kw: int, bm: int, H: int, W: int) -> tuple | None:
    """The halo kernel's patch for a kh x kw conv with an H x W output on tiles of bm channels: of the
    PATCHES that fit in SHARED_LIMIT, the one computing the fewest pixels (then the smallest halo); None when
    none fits (the flat kernel runs)."""
    fitting = [p for p in PATCHES[TILES[bm]["BN"]] if halo_shared_bytes(kh, kw, bm, p) <= SHARED_LIMIT]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (-(-H // p[0]) * p[0] * -(-W // p[1]) * p[1],
                                       (p[0] + kh - 1) * (p[1] + kw - 1)))


def grid(I: int, pixels: int, wide: bool = False) -> tuple[int, int]:
    bm = tile_m(I, wide)
    return -(-pixels // TILES[bm]["BN"]), -(-I // bm)


def available() -> str | None:
    """None when the kernel can run here, else why not: the GPU must have tensor cores with TF32
    (compute capability 8.0 or later); without a GPU, a C++20 compiler must run the emulation. Asked for
    every conv the fast mode routes: the answer is kept per device."""
    dv = _dv()
    key = None if dv.cp is None else dv.cp.cuda.Device().id
    if key not in _AVAILABLE:
        if dv.cp is not None:
            cc = dv.cp.cuda.Device().compute_capability
            _AVAILABLE[key] = None if int(cc[:-1] or 0) >= 8 else f"compute capability {cc} < 8.0"
        else:
            _AVAILABLE[key] = None if _compiler() else "no C++ compiler (c++ / g++) for the host emulation"
    return _AVAILABLE[key]


_AVAILABLE: dict = {}


def launch(src, offs, weight, out, O, I, n, Hs, Ws, Hu, Wu, H, W, b0, kc, rect, kernel, padding, pool, bias=None,
           *, halo: bool = False, wide: bool = False):
    """out (I, n, H, W) = the stride-1 transposed conv (``kernel``, ``padding``) of src (O, n, Hs, Ws)
    ((Hs, Ws) the pooled size when ``pool``, whose window offsets ``offs`` (B, O, Hs, Ws) int32 are read),
    rectified as read when ``rect``; weight float32 as :func:`weight_layout` makes it (:func:`padded_shape`);
    ``bias`` (I,) float32 added to the output unless None; ``halo``: the halo kernel where a patch fits;
    ``wide``: 128-channel tiles for wide layers. TF32 inputs, float32 sums. A forward stride-1 conv is the
    transposed conv of its flipped kernels with padding kernel - 1 - padding (lab/variants.py)."""
    if not fits(src.size, out.size) or not fits(offs.size, weight.size):
        raise ValueError(f"tensor_cores.launch: arrays of {max(src.size, out.size, offs.size)} elements; the "
                         "kernel's 32-bit indices reach 2^31 - 1")
    kh, kw = kernel
    ph, pw = padding
    if not supports(kh, kw, 1, 1, ph, pw, pool):
        raise ValueError(f"tensor_cores.launch: a {kh}x{kw} kernel with padding {padding} behind pool {pool}; "
                         "supports() is False for it")
    for a, dtype in ((src, np.float32), (offs, np.int32), (weight, np.float32), (out, np.float32)) + (
            () if bias is None else ((bias, np.float32),)):
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"tensor_cores.launch: a {a.dtype} array (contiguous: {a.flags.c_contiguous}); "
                             f"expected C-contiguous {np.dtype(dtype)}")
    if weight.shape != padded_shape(O, I, kh, kw):
        raise ValueError(f"tensor_cores.launch: a weight of shape {tuple(weight.shape)}; weight_layout gives "
                         f"{padded_shape(O, I, kh, kw)} for {O} -> {I} channels")
    address = weight.data.ptr if hasattr(weight.data, "ptr") else weight.ctypes.data
    if address % 16:
        raise ValueError("tensor_cores.launch: a weight not aligned to 16 bytes; the kernel reads it 16 bytes at "
                         "a time (a fresh array of weight_layout is)")
    bm, full = tile_m(I, wide), O % BK == 0
    pt = patch(kh, kw, bm, H, W) if halo else None
    gx, gy = grid(I, n * H * W, wide) if pt is None else (n * -(-H // pt[0]) * -(-W // pt[1]), -(-I // bm))
    ints = (O, I, n, Hs, Ws, Hu, Wu, H, W, b0, kc, int(bool(rect)))
    has_bias = bias is not None
    if bias is None:
        bias = weight  # any float32 array: not read
    dv = _dv()
    if dv.cp is not None:  # pragma: no cover - needs a GPU
        fn = _gpu_kernel(kh, kw, ph, pw, pool, bm, full, has_bias, pt)
        fn((gx, gy), (THREADS,), (src, offs, weight, bias, out, *(np.int32(v) for v in ints)))
        if dv.CHECK_LAUNCHES:
            dv.synchronize()
        return out
    lib = _host_library(kh, kw, ph, pw, pool, bm, full, has_bias, pt)
    arrays = [a.ctypes.data_as(ctypes.c_void_p) for a in (src, offs, weight, bias, out)]
    lib.tc_launch(ctypes.c_uint(gx), ctypes.c_uint(gy), *arrays, *(ctypes.c_int(int(v)) for v in ints))
    return out


@lru_cache(maxsize=None)
def _gpu_kernel(kh, kw, ph, pw, pool, bm, full, bias, patch=None):  # pragma: no cover - needs a GPU
    return _dv().cp.RawKernel(source(kh, kw, ph, pw, pool, bm, full, bias, patch), "tc_transpose")


def nvrtc_ptx(code: str, cc: tuple = (9, 0)) -> str:
    """The PTX NVRTC makes of CUDA C ``code`` for compute capability ``cc``, as CuPy's RawKernel compiles it,
    without a GPU (the pip package nvidia-cuda-nvrtc's libnvrtc). Raises RuntimeError with NVRTC's log
    when it does not compile."""
    import nvidia  # the namespace package of NVIDIA's pip wheels

    libs = [p for root in nvidia.__path__ for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib")
            for p in sorted((Path(root) / sub).glob("libnvrtc.so*"))]
    if not libs:
        raise RuntimeError("libnvrtc not found: pip install 'nvidia-cuda-nvrtc==13.*'")
    lib = ctypes.CDLL(str(libs[0]))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"tc_transpose.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * 1)(f"-arch=compute_{cc[0]}{cc[1]}".encode())
        status = lib.nvrtcCompileProgram(prog, 1, opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status:
            raise RuntimeError(f"NVRTC could not compile the kernel:\n{log.value.decode()[-4000:]}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@lru_cache(maxsize=None)
def _host_library(kh, kw, ph, pw, pool, bm, full, bias, patch=None):
    """The specialisation compiled for the CPU with tc_host.hpp (cached by the source's hash)."""
    header = Path(__file__).with_name("tc_host.hpp")
    code = f'#include "{header}"\n' + source(kh, kw, ph, pw, pool, bm, full, bias, patch) + _HOST_ENTRY
    digest = hashlib.sha256((code + header.read_text()).encode()).hexdigest()[:16]
    from clearmaps.kernels.cuda.sparse_kernels import cache_root

    folder = cache_root() / "tc-host"
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"tc_{digest}.so"
    if not lib.exists():
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError("tensor_cores: no C++ compiler to build the host emulation (set CXX)")
        cpp = folder / f"tc_{digest}.{os.getpid()}.cpp"
        cpp.write_text(code)
        tmp = folder / f".tc_{digest}.{os.getpid()}.so"
        done = subprocess.run([cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC", "-o", str(tmp), str(cpp)],
                              capture_output=True, text=True)
        cpp.unlink(missing_ok=True)
        if done.returncode:
            raise RuntimeError(f"tensor_cores: the host emulation did not compile:\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))
