"""Back-projection kernels: G_L^c z_L, the fused unpool + rectify + transposed convolution, and the rest.

Signals are channel-major, (C, n, H, W), n = images x classes of the chunk being processed, signal
t = (image - b0) * kc + (class position - k0): all classes of a batch go through as ONE batch.

A signal is read from one of two kinds of source, so that nothing is materialised that need not be:

    dense     a plane src (C, n, Hs, Ws); rectified as it is read when a ReLU lies between (``pre``).
    unpooled  the switch-unpooled plane of a max pool, read THROUGH THE SWITCHES: the value at (u, v) is
              the sum of the pooled values of the windows whose switch is u*Ws + v (rectified first when
              ``pre``), rectified after when a ReLU lies below the pool (``post``). The zero plane of the
              pool's input size (about 3/4 zeros for a 2x2 pool) is never written.

Kernels (launch with :func:`clearmaps.kernels.cuda.device.launch`; ``THREADS`` threads per block):

    head_signal          grid ceil(I*n*H*W / THREADS): out[i, t, y, x] = sum over taps of
                         z[b, c, u, v] * weight[c, i, ky, kx], c = classes[b, k]: the transposed head conv
                         of each (image, class) pair's own channel.
    transposed_columns   grid (ceil(ncols / THREADS), O): thread (j, o) writes the kh*kw rows of signal
                         channel o for column j = (t, y, x) of the transposed conv's output; a GEMM with
                         the weight as (I, O*kh*kw) then gives the transposed convolution. Fusing the
                         source read here is the fused unpool + rectify + transposed convolution.
    direct_transpose     grid ceil(n*H*W / THREADS): one thread per output pixel computes all I output
                         channels (I small, e.g. the RGB or grey input layer) straight from the source.
    materialise          grid ceil(C*n*Hs*Ws / THREADS): a source written out as a dense plane (the
                         ``unpool`` op; two pools in a row).

Factories are cached and specialised (their names say on what) on the conv and pool geometry, so index
arithmetic by constants compiles to shifts and the tap loops unroll.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import cuda

DENSE = 0
UNPOOLED = 1


@lru_cache(maxsize=None)
def _reader(kind: int, pool: tuple | None):
    """Device function value(src, sw, o, t, b, u, v, Ws, pre, post) of a signal source at (o, t, u, v)."""
    if kind == DENSE:
        @cuda.jit(device=True)
        def read_dense(src, sw, o, t, b, u, v, Ws, pre, post):
            val = src[o, t, u, v]
            if pre and val < np.float32(0.0):
                val = np.float32(0.0)
            return val

        return read_dense

    pkh, pkw, psh, psw, pph, ppw = pool

    @cuda.jit(device=True)
    def read_unpooled(src, sw, o, t, b, u, v, Ws, pre, post):
        poh = src.shape[2]
        pow_ = src.shape[3]
        zero = np.float32(0.0)
        # the windows (p, q) whose span holds (u, v): p*psh - pph <= u < p*psh - pph + pkh
        a = u + pph - pkh + 1
        plo = 0 if a <= 0 else (a + psh - 1) // psh
        phi = (u + pph) // psh
        if phi > poh - 1:
            phi = poh - 1
        a = v + ppw - pkw + 1
        qlo = 0 if a <= 0 else (a + psw - 1) // psw
        qhi = (v + ppw) // psw
        if qhi > pow_ - 1:
            qhi = pow_ - 1
        target = u * Ws + v
        acc = zero
        for p in range(plo, phi + 1):
            for q in range(qlo, qhi + 1):
                if sw[b, o, p, q] == target:
                    val = src[o, t, p, q]
                    if pre and val < zero:
                        val = zero
                    acc += val
        if post and acc < zero:
            acc = zero
        return acc

    return read_unpooled


def _suffix(kind, pool):
    return "dense" if kind == DENSE else "unpooled_k{}x{}_s{}x{}_p{}x{}".format(*pool)


@lru_cache(maxsize=None)
def head_signal(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """Kernel: G_L^c z_L for the (image, class) pairs of a chunk.

    z (B, N, h, w) float32, classes (B, K) int64, weight (N, I, kh, kw), out (I, n, H, W); pair
    t = (b - b0)*kc + (k - k0)."""

    @cuda.jit
    def kernel(z, classes, weight, out, b0, k0, kc):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        I = out.shape[0]
        n = out.shape[1]
        H = out.shape[2]
        W = out.shape[3]
        if idx >= I * n * H * W:
            return
        x = idx % W
        r = idx // W
        y = r % H
        r = r // H
        t = r % n
        i = r // n
        b = b0 + t // kc
        c = classes[b, k0 + t % kc]
        h = z.shape[2]
        w = z.shape[3]
        acc = np.float32(0.0)
        for ky in range(kh):
            nu = y + ph - ky
            if nu >= 0 and nu % sh == 0 and nu // sh < h:
                u = nu // sh
                for kx in range(kw):
                    nv = x + pw - kx
                    if nv >= 0 and nv % sw == 0 and nv // sw < w:
                        acc += z[b, c, u, nv // sw] * weight[c, i, ky, kx]
        out[i, t, y, x] = acc

    kernel.__name__ = f"head_signal_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}"
    return kernel


@lru_cache(maxsize=None)
def transposed_columns(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, kind: int, pool: tuple | None):
    """Kernel writing the columns of a transposed conv read from a source:
    G[(o*kh + ky)*kw + kx, j] = source(o, t, (y + ph - ky)/sh, (x + pw - kx)/sw) where the division is
    exact and in range, else 0; column j counts from ``j0`` over (t, y, x) of the (H, W) output."""
    read = _reader(kind, pool)

    @cuda.jit
    def kernel(src, swt, G, j0, H, W, Hs, Ws, b0, kc, pre, post):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j >= G.shape[1]:
            return
        o = cuda.blockIdx.y
        g = j0 + j
        x = g % W
        r = g // W
        y = r % H
        t = r // H
        b = b0 + t // kc
        zero = np.float32(0.0)
        row = o * kh * kw
        for ky in range(kh):
            nu = y + ph - ky
            u = nu // sh
            ok_u = nu >= 0 and nu - u * sh == 0 and u < Hs
            for kx in range(kw):
                nv = x + pw - kx
                v = nv // sw
                val = zero
                if ok_u and nv >= 0 and nv - v * sw == 0 and v < Ws:
                    val = read(src, swt, o, t, b, u, v, Ws, pre, post)
                G[row + ky * kw + kx, j] = val

    kernel.__name__ = f"transposed_columns_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_{_suffix(kind, pool)}"
    return kernel


@lru_cache(maxsize=None)
def direct_transpose(I: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, kind: int,
                     pool: tuple | None):
    """Kernel: out[i, t, y, x] = sum over o, ky, kx of weight[o, i, ky, kx] * source(o, t, u, v), all I
    output channels of one pixel per thread (I is a compile-time constant: the accumulators stay in
    registers). Zero source values are skipped: after unpooling and rectifying most are."""
    read = _reader(kind, pool)

    @cuda.jit
    def kernel(src, swt, weight, out, Hs, Ws, b0, kc, pre, post):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        n = out.shape[1]
        H = out.shape[2]
        W = out.shape[3]
        if idx >= n * H * W:
            return
        x = idx % W
        r = idx // W
        y = r % H
        t = r // H
        b = b0 + t // kc
        O = weight.shape[0]
        zero = np.float32(0.0)
        acc = cuda.local.array(I, np.float32)
        for i in range(I):
            acc[i] = zero
        for ky in range(kh):
            nu = y + ph - ky
            u = nu // sh
            if nu >= 0 and nu - u * sh == 0 and u < Hs:
                for kx in range(kw):
                    nv = x + pw - kx
                    v = nv // sw
                    if nv >= 0 and nv - v * sw == 0 and v < Ws:
                        for o in range(O):
                            val = read(src, swt, o, t, b, u, v, Ws, pre, post)
                            if val != zero:
                                for i in range(I):
                                    acc[i] += val * weight[o, i, ky, kx]
        for i in range(I):
            out[i, t, y, x] = acc[i]

    kernel.__name__ = f"direct_transpose_I{I}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_{_suffix(kind, pool)}"
    return kernel


@lru_cache(maxsize=None)
def materialise(kind: int, pool: tuple | None):
    """Kernel: out[o, t, u, v] = source(o, t, u, v) over the whole (C, n, Hs, Ws) plane."""
    read = _reader(kind, pool)

    @cuda.jit
    def kernel(src, swt, out, b0, kc, pre, post):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        C = out.shape[0]
        n = out.shape[1]
        Hs = out.shape[2]
        Ws = out.shape[3]
        if idx >= C * n * Hs * Ws:
            return
        v = idx % Ws
        r = idx // Ws
        u = r % Hs
        r = r // Hs
        t = r % n
        o = r // n
        out[o, t, u, v] = read(src, swt, o, t, b0 + t // kc, u, v, Ws, pre, post)

    kernel.__name__ = f"materialise_{_suffix(kind, pool)}"
    return kernel


@cuda.jit
def scatter_unpool(y, switches, out):
    """The ``unpool`` op without a pool's geometry: out[b, c].flat[switches[b, c, p, q]] += y[b, c, p, q].
    y, switches (B, C, oh, ow); out (B, C, H*W), zeroed by the caller. One thread per pooled value; atomic
    adds because overlapping windows can share a switch."""
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    B = y.shape[0]
    C = y.shape[1]
    oh = y.shape[2]
    ow = y.shape[3]
    if idx >= B * C * oh * ow:
        return
    q = idx % ow
    r = idx // ow
    p = r % oh
    r = r // oh
    c = r % C
    b = r // C
    cuda.atomic.add(out, (b, c, switches[b, c, p, q]), y[b, c, p, q])
