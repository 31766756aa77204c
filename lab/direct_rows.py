"""LAB (not in the product; lab/README.md): the row-blocked direct transposed conv, ``direct_rows``.

What it computes: the product's direct kernel (clearmaps.kernels.cuda.backproject_kernels.direct_transpose,
which equals :func:`clearmaps.reference.conv_transpose2d` for a layer of few output channels: the input
layer), for a DENSE source and stride 1, PX pixels of a row per thread: per channel it loads the
kh x (PX + kw - 1) source values its taps share once, and the kh*kw weights, then does I*PX*kh*kw
multiply-adds from registers (direct_transpose loads kh*kw values and kh*kw weights per pixel). Same
summation order as direct_transpose: the lab's tests compare the two bit for bit.

Why. GPU run 7 put direct_transpose at 1.7 ms of allcnn-mnist's 15.7, ~6x its bandwidth floor (bench
method cuda-rows). Plugged into a run by lab.variants.RowsDirect for the transposed convs the product sends
to direct_transpose on a dense source with stride 1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import cuda

from clearmaps.kernels.cuda.backproject_kernels import _ix

# output pixels of a row per thread
DIRECT_ROW_PIXELS = 4


@lru_cache(maxsize=None)
def direct_rows(I: int, kh: int, kw: int, ph: int, pw: int, px: int = DIRECT_ROW_PIXELS):
    """Kernel: backproject_kernels.direct_transpose for a DENSE source and stride 1, ``px`` consecutive pixels
    of a row per thread (module docstring).

    Launch with ceil(n * H * ceil(W / px) / THREADS) blocks of THREADS. Arguments: src (O*n*Hs*Ws,) float32;
    weight (O*I*kh*kw,) float32; out (I*n*H*W,) float32; O, n, Hs, Ws, H, W, pre (rectify as read)."""
    taps = kh * kw
    span = px + kw - 1                      # source columns the px pixels' taps read in one source row
    reads = kh * span                       # (a closure constant: local array sizes must be literals)
    zero = np.float32(0.0)

    @cuda.jit
    def kernel(src, weight, out, O, n, Hs, Ws, H, W, pre):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        runs = (W + px - 1) // px
        if idx >= n * H * runs:
            return
        xr = idx % runs
        r = idx // runs
        y = r % H
        t = r // H
        x0 = xr * px
        # where the taps read, once per thread: source row u = y + ph - ky, column v = x0 + m - (kw - 1) + pw
        # for m < span (pixel j, tap kx reads m = j + kw - 1 - kx); out-of-plane reads are clamped and zeroed
        off = cuda.local.array(reads, np.int64)
        ok = cuda.local.array(reads, np.bool_)
        for ky in range(kh):
            u = y + ph - ky
            for m in range(span):
                v = x0 + m - (kw - 1) + pw
                inside = u >= 0 and u < Hs and v >= 0 and v < Ws
                ok[ky * span + m] = inside
                off[ky * span + m] = u * Ws + v if inside else 0
        acc = cuda.local.array((I, px), np.float32)
        for i in range(I):
            for j in range(px):
                acc[i, j] = zero
        w = cuda.local.array((I, taps), np.float32)
        s = cuda.local.array(span, np.float32)
        plane = Hs * Ws
        for o in range(O):
            base = (o * n + t) * plane
            for i in range(I):
                for k in range(taps):
                    w[i, k] = weight[_ix((o * I + i) * taps + k)]
            for ky in range(kh):
                for m in range(span):
                    val = src[_ix(base + off[ky * span + m])]
                    if pre and val < zero:
                        val = zero
                    s[m] = val if ok[ky * span + m] else zero
                for kx in range(kw):
                    for i in range(I):
                        for j in range(px):
                            acc[i, j] += s[j + kw - 1 - kx] * w[i, ky * kw + kx]
        out_plane = H * W
        obase = t * out_plane + y * W + x0
        for i in range(I):
            for j in range(px):
                if x0 + j < W:
                    out[_ix(obase + i * n * out_plane + j)] = acc[i, j]

    kernel.__name__ = f"direct_rows_I{I}_k{kh}x{kw}_p{ph}x{pw}_x{px}"
    return kernel
