"""Numba kernels for the operations graphs add (float32, images channel-first), used by kernels/cpu_graph.py.

What they compute (each equals the reference function named, in float32)
--------------------------------------------------------------------------
_max_pool_switches  reference.ops.max_pool_with_switches with dilation and ceil_mode: first maximum in
                    row-major window order (strict '>'), switch = flat index row*W + col of the input plane
_window_mean        reference.ops.avg_pool2d / adaptive_avg_pool2d: each output cell the sum of its window
                    (rows rs..re-1, columns cs..ce-1) divided by div[u, v]
_window_mean_t      their transposes: each value / div[u, v] added to every cell of its window

How they are launched: ``@njit(cache=True, parallel=True)``, ``prange`` over (image, channel) planes; the
caller allocates every output.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, vectorize

_FM = {"contract"}


@njit(cache=True, parallel=True)
def _max_pool_switches(x, kh, kw, sh, sw, ph, pw, dh, dw, out, switches):
    B, C, H, W = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for t in prange(B * C):
        n = t // C
        c = t % C
        for oy in range(oh):
            for ox in range(ow):
                best = -np.inf
                where = 0
                for ky in range(kh):  # row-major window order and a strict '>': the first maximum wins
                    iy = oy * sh - ph + ky * dh
                    if iy < 0 or iy >= H:
                        continue
                    for kx in range(kw):
                        ix = ox * sw - pw + kx * dw
                        if ix < 0 or ix >= W:
                            continue
                        v = x[n, c, iy, ix]
                        if v > best:
                            best = v
                            where = iy * W + ix
                out[n, c, oy, ox] = best
                switches[n, c, oy, ox] = where


@njit(cache=True, parallel=True, fastmath=_FM)
def _window_mean(x, rs, re, cs, ce, div, out):
    B, C = x.shape[0], x.shape[1]
    oh, ow = out.shape[2], out.shape[3]
    for t in prange(B * C):
        n = t // C
        c = t % C
        for u in range(oh):
            for v in range(ow):
                acc = 0.0
                for iy in range(rs[u], re[u]):
                    for ix in range(cs[v], ce[v]):
                        acc += x[n, c, iy, ix]
                out[n, c, u, v] = acc / div[u, v]


@njit(cache=True, parallel=True, fastmath=_FM)
def _window_mean_t(y, rs, re, cs, ce, div, out):
    B, C = y.shape[0], y.shape[1]
    oh, ow = y.shape[2], y.shape[3]
    for t in prange(B * C):
        n = t // C
        c = t % C
        for iy in range(out.shape[2]):
            for ix in range(out.shape[3]):
                out[n, c, iy, ix] = 0.0
        for u in range(oh):
            for v in range(ow):
                share = y[n, c, u, v] / div[u, v]
                for iy in range(rs[u], re[u]):
                    for ix in range(cs[v], ce[v]):
                        out[n, c, iy, ix] += share


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def erf(x):
    return math.erf(x)
