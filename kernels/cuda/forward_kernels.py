"""Forward-pass kernels: convolution as column gathering + one GEMM, and max pooling with switches.

Activations are kept channel-major, (C, B, H, W), so that a convolution over the whole batch is ONE
GEMM: out (O, B*oh*ow) = [W | bias] (O, I*kh*kw + 1) @ columns (I*kh*kw + 1, B*oh*ow). The last row of
the columns is all ones, so the bias rides in the GEMM. A ReLU is never a pass of its own: the layer that
reads a ReLU's output (the next convolution's gather, or the max pool) rectifies as it reads.

Kernels (each launched over a 1-D or 2-D grid of ``THREADS``-thread blocks, one thread per output element
or column; launch with :func:`clearmaps.kernels.cuda.device.launch`):

    forward_columns  grid (ceil(ncols / THREADS), ceil(I / FORWARD_CHANNELS)): thread (j, g) writes the kh*kw
                     rows of input channels g*FORWARD_CHANNELS ... for column j (one output pixel of one
                     image); group 0 adds the ones row. Columns may be a block [j0, j0 + ncols) of all
                     B*oh*ow. Arrays are passed flat with their dimensions.
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


# channels per thread of forward_columns (see backproject_kernels.GATHER_CHANNELS)
FORWARD_CHANNELS = 16
_ix = np.uint64  # unsigned flat indices: no negative-index wrap-around code


@lru_cache(maxsize=None)
def forward_columns(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Kernel writing conv columns: cols[(i*kh + ky)*kw + kx, j] = x[i, b, oy*sh - ph + ky, ox*sw - pw + kx]
    (zero outside the image; max(., 0) when ``rect``) for column j = (b - b0)*oh*ow + oy*ow + ox counted
    from global column ``j0``; plus the ones row ``cols[I*kh*kw, j] = 1`` when ``bias_row``.

    Arguments: x (I*Bc*H*W,) float32 flat, cols (rows*ncols,) float32 flat; ncols, j0, I, Bc, H, W, oh,
    ow, rect, bias_row. Thread (j, g): column j, input channels g*FORWARD_CHANNELS ...; the pixel's kh*kw
    input offsets (-1 outside the image) are worked out once, then per channel all kh*kw loads are issued
    before the kh*kw stores (as backproject_kernels.gather_columns)."""
    taps = kh * kw
    group = FORWARD_CHANNELS

    @cuda.jit
    def kernel(x, cols, ncols, j0, I, Bc, H, W, oh, ow, rect, bias_row):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j >= ncols:
            return
        g = j0 + j
        ox = g % ow
        t = g // ow
        oy = t % oh
        b = t // oh
        off = cuda.local.array(taps, np.int32)
        for ky in range(kh):
            y = oy * sh - ph + ky
            for kx in range(kw):
                xx = ox * sw - pw + kx
                off[ky * kw + kx] = y * W + xx if y >= 0 and y < H and xx >= 0 and xx < W else -1
        zero = np.float32(0.0)
        vals = cuda.local.array(taps, np.float32)
        plane = H * W
        i0 = cuda.blockIdx.y * group
        i1 = min(i0 + group, I)
        for i in range(i0, i1):
            base = (i * Bc + b) * plane
            for k in range(taps):  # all loads first: they are in flight together
                o_ = off[k]
                v = x[_ix(base + (o_ if o_ >= 0 else 0))]
                if rect and v < zero:
                    v = zero
                vals[k] = v if o_ >= 0 else zero
            row = i * taps
            for k in range(taps):
                cols[_ix((row + k) * ncols + j)] = vals[k]
        if bias_row and i0 == 0:
            cols[_ix(I * taps * ncols + j)] = np.float32(1.0)

    kernel.__name__ = f"forward_columns_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}"
    return kernel


@lru_cache(maxsize=None)
def max_pool(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Kernel: pooled[c, b, p, q] = max over the window of x (rectified first when ``rect``), and
    switches[b0 + b, c, p, q] = row*W + col of the first maximum in row-major window order; index32 gets the
    same as int32 and offsets its place in the window, ky*kw + kx (what the back-projection reads:
    sparse_kernels.window_offsets computes the same from a trace that forward() did not make).
    x (C, Bc, H, W) channel-major; pooled (C, Bc, oh, ow); switches (B, C, oh, ow) int64 (the Trace's
    layout), index32 and offsets (B, C, oh, ow) int32, written for images b0 .. b0 + Bc."""

    @cuda.jit
    def kernel(x, pooled, switches, index32, offsets, b0, rect):
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
        # a window where no value compares larger than -inf (all -inf or NaN: its pooled value is not finite,
        # and neither is anything the back-projection makes of it) keeps switch 0, as the reference does
        arg = 0
        d = 0
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
                            d = ky * kw + kx
        pooled[c, b, p, q] = best
        switches[b0 + b, c, p, q] = arg
        index32[b0 + b, c, p, q] = arg
        offsets[b0 + b, c, p, q] = d

    kernel.__name__ = f"max_pool_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}"
    return kernel
