"""numba.cuda kernels of the graph path (graph.py): the operations graphs add, channel-first (N, C, H, W) float32.

Each kernel computes one function of :mod:`clearmaps.reference.ops` (or, for the columns, one half of it), in
float32, with a fixed order of summation and no atomics: a result never depends on how threads are scheduled
or on how many signals share a launch. They are written to be clearly correct, not fast (docs/design.md,
"Backends and their contract"; bench/GPU_NOTES.md says what a GPU run must time).

    conv_columns           the columns of a conv (groups 1, any stride, padding, dilation): the GEMM
                           W (O, C*kh*kw) @ columns gives the conv (graph.py adds the bias)
    columns_to_image       the adjoint of conv_columns: the GEMM W^T @ signal, then this, gives the transposed
                           conv (groups 1)
    conv_direct            reference.ops.conv2d with groups (depthwise included), straight from the input
    conv_transpose_direct  reference.ops.conv_transpose2d with groups: each input channel c = g*Ig + i gathers
                           from the O/G kernels of its group g
    max_pool_switches      reference.ops.max_pool_with_switches with dilation and ceil_mode (the caller sizes
                           the output): the first maximum in row-major window order (strict '>'), switch =
                           row*W + col of the input plane
    unpool_planes          reference.ops.unpool: one thread per (signal, channel) plane adds the plane's pooled
                           values at their switches in row-major order (np.add.at's order; windows that share a
                           switch need no atomics)
    window_mean            reference.ops.avg_pool2d / adaptive_avg_pool2d: each output cell the sum of its
                           window (rows rs..re-1, columns cs..ce-1) divided by div[u, v]
    window_mean_transpose  their transposes: each input pixel sums y[u, v] / div[u, v] over the windows that
                           hold it (u in first_row[iy] .. last_row[iy], likewise v, each checked)
    erf_flat               math.erf of each element (GELU's exact form)

Launch (:func:`clearmaps.kernels.cuda.device.launch`, ``THREADS`` threads per block): one thread per pixel
(axis x of the grid) and per group of ``CHANNELS`` channels (axis y), except unpool_planes (one thread per
plane) and erf_flat (one per element). Geometry is passed at run time: one compiled kernel serves every layer.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

# channels per thread (the grid's y axis counts groups of them): a pixel's index arithmetic is paid once for
# up to this many channels, and wide layers still launch several threads per pixel
CHANNELS = 16


@cuda.jit(device=True)
def _unflatten(p, h, w):
    """(n, y, x) of the flat index p = (n*h + y)*w + x."""
    t = p // w
    return t // h, t % h, p % w


@cuda.jit(device=True)
def _tap_output(i, pad, k, dil, stride, out_len):
    """The output position o with o*stride - pad + k*dil == i, or -1 where no output reads input i through
    tap k (a transposed conv's gather: the adjoint of the forward conv's index)."""
    t = i + pad - k * dil
    if t < 0 or t % stride != 0 or t // stride >= out_len:
        return -1
    return t // stride


@cuda.jit
def conv_columns(x, cols, j0, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw):
    """cols[(c*kh + ky)*kw + kx, j - j0] = x[n, c, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw] (0 outside the
    image) for the columns j = j0 .. j0 + cols.shape[1] - 1, j = (n*oh + oy)*ow + ox."""
    jl = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if jl >= cols.shape[1]:
        return
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    j = j0 + jl
    n, oy, ox = _unflatten(j, oh, ow)
    c0 = cuda.blockIdx.y * CHANNELS
    zero = np.float32(0.0)
    for c in range(c0, min(c0 + CHANNELS, C)):
        for ky in range(kh):
            iy = oy * sh - ph + ky * dh
            for kx in range(kw):
                ix = ox * sw - pw + kx * dw
                v = zero
                if iy >= 0 and iy < H and ix >= 0 and ix < W:
                    v = x[n, c, iy, ix]
                cols[(c * kh + ky) * kw + kx, jl] = v


@cuda.jit
def columns_to_image(cols, out, n0, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw):
    """out[n0 + m, c, iy, ix] = the sum of cols[(c*kh + ky)*kw + kx, (m*oh + oy)*ow + ox] over every tap
    (ky, kx) and conv output (oy, ox) that read input pixel (iy, ix) through it (iy = oy*sh - ph + ky*dh,
    likewise ix): the adjoint of conv_columns, for the cols.shape[1] // (oh*ow) signals m whose columns cols
    holds."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    C, H, W = out.shape[1], out.shape[2], out.shape[3]
    nb = cols.shape[1] // (oh * ow)
    if p >= nb * H * W:
        return
    m, iy, ix = _unflatten(p, H, W)
    c0 = cuda.blockIdx.y * CHANNELS
    for c in range(c0, min(c0 + CHANNELS, C)):
        acc = np.float32(0.0)
        for ky in range(kh):
            oy = _tap_output(iy, ph, ky, dh, sh, oh)
            if oy < 0:
                continue
            for kx in range(kw):
                ox = _tap_output(ix, pw, kx, dw, sw, ow)
                if ox >= 0:
                    acc += cols[(c * kh + ky) * kw + kx, (m * oh + oy) * ow + ox]
        out[n0 + m, c, iy, ix] = acc


@cuda.jit
def conv_direct(x, w, bias, out, groups, sh, sw, ph, pw, dh, dw):
    """out[n, o, oy, ox] = bias[o] + the sum over i < Ig, ky, kx of w[o, i, ky, kx] *
    x[n, g*Ig + i, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw] (0 outside the image), g = o // (O / groups)."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, O, oh, ow = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * oh * ow:
        return
    H, W = x.shape[2], x.shape[3]
    Ig, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    Og = O // groups
    n, oy, ox = _unflatten(p, oh, ow)
    o0 = cuda.blockIdx.y * CHANNELS
    for o in range(o0, min(o0 + CHANNELS, O)):
        c0 = (o // Og) * Ig
        acc = bias[o]
        for i in range(Ig):
            for ky in range(kh):
                iy = oy * sh - ph + ky * dh
                if iy < 0 or iy >= H:
                    continue
                for kx in range(kw):
                    ix = ox * sw - pw + kx * dw
                    if ix >= 0 and ix < W:
                        acc += w[o, i, ky, kx] * x[n, c0 + i, iy, ix]
        out[n, o, oy, ox] = acc


@cuda.jit
def conv_transpose_direct(y, w, out, groups, sh, sw, ph, pw, dh, dw):
    """out[n, c, iy, ix] = the sum over the kernels o = g*Og .. g*Og + Og - 1 of c's group g = c // Ig, and the
    taps (ky, kx) and conv outputs (oy, ox) that read (iy, ix), of w[o, c - g*Ig, ky, kx] * y[n, o, oy, ox]:
    the adjoint of conv_direct without its bias."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, I, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * H * W:
        return
    oh, ow = y.shape[2], y.shape[3]
    O, Ig, kh, kw = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    Og = O // groups
    n, iy, ix = _unflatten(p, H, W)
    c0 = cuda.blockIdx.y * CHANNELS
    for c in range(c0, min(c0 + CHANNELS, I)):
        g = c // Ig
        i = c - g * Ig
        acc = np.float32(0.0)
        for oo in range(Og):
            o = g * Og + oo
            for ky in range(kh):
                oy = _tap_output(iy, ph, ky, dh, sh, oh)
                if oy < 0:
                    continue
                for kx in range(kw):
                    ox = _tap_output(ix, pw, kx, dw, sw, ow)
                    if ox >= 0:
                        acc += w[o, i, ky, kx] * y[n, o, oy, ox]
        out[n, c, iy, ix] = acc


@cuda.jit
def max_pool_switches(x, out, switches, kh, kw, sh, sw, ph, pw, dh, dw):
    """out[n, c, oy, ox] = the maximum of x over the window (rows oy*sh - ph + ky*dh, columns likewise, those
    inside the image: the padding is -inf), switches[n, c, oy, ox] = row*W + col of its first maximum in
    row-major window order. A window where nothing compares larger than -inf keeps switch 0, as the reference
    does."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, oh, ow = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * oh * ow:
        return
    H, W = x.shape[2], x.shape[3]
    n, oy, ox = _unflatten(p, oh, ow)
    c0 = cuda.blockIdx.y * CHANNELS
    for c in range(c0, min(c0 + CHANNELS, C)):
        best = np.float32(-math.inf)
        where = 0
        for ky in range(kh):
            iy = oy * sh - ph + ky * dh
            if iy < 0 or iy >= H:
                continue
            for kx in range(kw):
                ix = ox * sw - pw + kx * dw
                if ix >= 0 and ix < W:
                    v = x[n, c, iy, ix]
                    if v > best:  # strict: the first maximum wins ties
                        best = v
                        where = iy * W + ix
        out[n, c, oy, ox] = best
        switches[n, c, oy, ox] = where


@cuda.jit
def unpool_planes(y, switches, out):
    """out[n, c, switches[n, c, u, v]] += y[n, c, u, v] for every (u, v) in row-major order; out (N, C, H*W)
    zeroed by the caller. One thread per (n, c) plane. A switch outside the plane (which the callers refuse
    before launching) is skipped rather than written out of bounds."""
    q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, oh, ow = y.shape[0], y.shape[1], y.shape[2], y.shape[3]
    if q >= N * C:
        return
    n = q // C
    c = q % C
    plane = out.shape[2]
    for u in range(oh):
        for v in range(ow):
            s = switches[n, c, u, v]
            if s >= 0 and s < plane:
                out[n, c, s] += y[n, c, u, v]


@cuda.jit
def window_mean(x, out, rs, re, cs, ce, div):
    """out[n, c, u, v] = (the sum of x[n, c, rs[u]:re[u], cs[v]:ce[v]]) / div[u, v]."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, oh, ow = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * oh * ow:
        return
    n, u, v = _unflatten(p, oh, ow)
    c0 = cuda.blockIdx.y * CHANNELS
    for c in range(c0, min(c0 + CHANNELS, C)):
        acc = np.float32(0.0)
        for iy in range(rs[u], re[u]):
            for ix in range(cs[v], ce[v]):
                acc += x[n, c, iy, ix]
        out[n, c, u, v] = acc / div[u, v]


@cuda.jit
def window_mean_transpose(y, out, rs, re, cs, ce, div, first_row, last_row, first_col, last_col):
    """out[n, c, iy, ix] = the sum of y[n, c, u, v] / div[u, v] over the windows (u, v) that hold (iy, ix):
    u from first_row[iy] to last_row[iy] with rs[u] <= iy < re[u], v likewise (an empty range: no window)."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * H * W:
        return
    n, iy, ix = _unflatten(p, H, W)
    c0 = cuda.blockIdx.y * CHANNELS
    for c in range(c0, min(c0 + CHANNELS, C)):
        acc = np.float32(0.0)
        for u in range(first_row[iy], last_row[iy] + 1):
            if rs[u] <= iy and iy < re[u]:
                for v in range(first_col[ix], last_col[ix] + 1):
                    if cs[v] <= ix and ix < ce[v]:
                        acc += y[n, c, u, v] / div[u, v]
        out[n, c, iy, ix] = acc


@cuda.jit
def erf_flat(x, out):
    """out[i] = erf(x[i]) for flat float32 arrays."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < x.shape[0]:
        out[i] = math.erf(x[i])
