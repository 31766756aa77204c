"""Forward-pass kernels: convolution as column gathering + one GEMM, and max pooling with switches.

Activations are kept channel-major, (C, B, H, W), so that a convolution over the whole batch is ONE
GEMM: out (O, B*oh*ow) = [W | bias] (O, I*kh*kw + 1) @ columns (I*kh*kw + 1, B*oh*ow). The last row of
the columns is all ones, so the bias rides in the GEMM. A ReLU is never a pass of its own: the layer that
reads a ReLU's output (the next convolution's gather, or the max pool) rectifies as it reads.

Kernels (each launched over a 1-D or 2-D grid of ``THREADS``-thread blocks, one thread per output element
or column; launch with :func:`clearmaps.kernels.cuda.device.launch`):

    forward_columns  grid (ceil(ncols / THREADS), I): thread (j, i) writes the kh*kw rows of input channel i
                     for column j (one output pixel of one image); block 0 of the second axis adds the
                     ones row. Columns may be a block [j0, j0 + ncols) of all B*oh*ow.
    max_pool         grid ceil(C*B*oh*ow / THREADS): one thread per pooled value, scanning its window in
                     row-major order with a strict '>' so the FIRST maximum is the switch (torch's rule).

Kernels are built by small cached factories whose names give the geometry they are specialised for:
Numba treats the closed-over ints as constants, so divisions by strides become shifts and the loops over
the window unroll.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda


@lru_cache(maxsize=None)
def forward_columns(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Kernel writing conv columns: cols[(i*kh + ky)*kw + kx, j] = x[i, b, oy*sh - ph + ky, ox*sw - pw + kx]
    (zero outside the image; max(., 0) when ``rect``) for column j = (b - b0)*oh*ow + oy*ow + ox counted
    from global column ``j0``; plus the ones row ``cols[I*kh*kw, j] = 1`` when ``bias_row``."""

    @cuda.jit
    def kernel(x, cols, j0, oh, ow, rect, bias_row):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        ncols = cols.shape[1]
        if j >= ncols:
            return
        i = cuda.blockIdx.y
        H = x.shape[2]
        W = x.shape[3]
        g = j0 + j
        ox = g % ow
        t = g // ow
        oy = t % oh
        b = t // oh
        y0 = oy * sh - ph
        x0 = ox * sw - pw
        row = i * kh * kw
        zero = np.float32(0.0)
        for ky in range(kh):
            y = y0 + ky
            for kx in range(kw):
                xx = x0 + kx
                v = zero
                if y >= 0 and y < H and xx >= 0 and xx < W:
                    v = x[i, b, y, xx]
                    if rect and v < zero:
                        v = zero
                cols[row + ky * kw + kx, j] = v
        if bias_row and i == 0:
            cols[cols.shape[0] - 1, j] = np.float32(1.0)

    kernel.__name__ = f"forward_columns_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}"
    return kernel


@lru_cache(maxsize=None)
def max_pool(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Kernel: pooled[c, b, p, q] = max over the window of x (rectified first when ``rect``), and
    switches[b0 + b, c, p, q] = row*W + col of the first maximum in row-major window order.
    x (C, Bc, H, W) channel-major; pooled (C, Bc, oh, ow); switches (B, C, oh, ow) int64 (the Trace's
    layout), written for images b0 .. b0 + Bc."""

    @cuda.jit
    def kernel(x, pooled, switches, b0, rect):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        C = pooled.shape[0]
        Bc = pooled.shape[1]
        oh = pooled.shape[2]
        ow = pooled.shape[3]
        if idx >= C * Bc * oh * ow:
            return
        H = x.shape[2]
        W = x.shape[3]
        q = idx % ow
        t = idx // ow
        p = t % oh
        t = t // oh
        b = t % Bc
        c = t // Bc
        y0 = p * sh - ph
        x0 = q * sw - pw
        best = np.float32(-math.inf)
        arg = 0
        zero = np.float32(0.0)
        for ky in range(kh):
            y = y0 + ky
            if y >= 0 and y < H:
                for kx in range(kw):
                    xx = x0 + kx
                    if xx >= 0 and xx < W:
                        v = x[c, b, y, xx]
                        if rect and v < zero:
                            v = zero
                        if v > best:
                            best = v
                            arg = y * W + xx
        pooled[c, b, p, q] = best
        switches[b0 + b, c, p, q] = arg

    kernel.__name__ = f"max_pool_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}"
    return kernel
