"""Back-projection kernels: G_L^c z_L, the fused unpool + rectify + transposed convolution, and the rest.

Signals are channel-major, (C, n, H, W), n = images x classes of the chunk being processed, signal
t = (image - b0) * kc + (class position - k0): all classes of a batch go through as ONE batch. Every kernel
takes its arrays FLAT (1-D views) with the dimensions as arguments: one index per access instead of four
strided ones, so the address arithmetic is a few integer multiply-adds.

A signal is read from a **source**, so that nothing is materialised that need not be:

    DENSE             a plane src (C, n, Hs, Ws); rectified as it is read when a ReLU lies between (``pre``).
    UNPOOLED          the switch-unpooled plane (Hu, Wu) of a max pool whose windows do not overlap (kernel
                      <= stride: 2x2/2 and the like), read THROUGH THE SWITCHES from the pooled signal
                      (C, n, Hs, Ws): pixel (u, v) lies in at most one window (p, q) = ((u + pad) // stride,
                      ...), and its value is that window's pooled value if the window's switch is u*Wu + v,
                      else 0 (rectified first when ``pre``, after when ``post``: a ReLU below the pool).
    UNPOOLED_OVERLAP  the same for overlapping windows (3x3/2...): a pixel sums the values of every window
                      whose switch it is (a small loop over the windows whose span holds it).
The zero plane of the pool's input size (about 3/4 zeros for a 2x2 pool) is never written. Switches are
int32 on the device (B, C, Hs, Ws), flat: an index into one (Hu, Wu) plane always fits.

How a gather is laid out (the memory-bound part of every transposed conv). A thread owns ONE output pixel
(y, x) of one signal t and works out, once, for each of the kh*kw taps where the tap reads: an offset into
the source plane and, for UNPOOLED, the switch value that makes the read nonzero (-1: never). These per-tap
integers live in registers (local arrays with constant indices after the tap loops unroll). Then it loops
over channels: per channel it issues all kh*kw loads (plus the kh*kw switch loads) before any use, so they
are in flight together, and writes the kh*kw results. Consecutive threads own consecutive pixels: every
load and store of a warp is contiguous (coalesced), and the index arithmetic (divisions by the runtime
plane sizes) is paid once per thread, not once per channel and tap.

Kernels (launch with :func:`clearmaps.kernels.cuda.device.launch`; ``THREADS`` threads per block):

    head_signal      grid ceil(n*H*W / THREADS): thread = output pixel (t, y, x); out[i, t, y, x] =
                     sum over taps of z[b, c, u, v] * weight[c, i, ky, kx], c = classes[b, k], for all i:
                     the transposed head conv of each (image, class) pair's own channel.
    gather_columns   grid (ceil(ncols / THREADS), ceil(O / GATHER_CHANNELS)): thread (j, g) writes, for column
                     j = (t, y, x) of the transposed conv's output and channels o of group g, the kh*kw rows
                     G[(o*kh + ky)*kw + kx, j] = source(o, t, (y + ph - ky)/sh, (x + pw - kx)/sw) (0 where the
                     division is not exact or out of range); a GEMM with the weight as (I, O*kh*kw) then gives
                     the transposed convolution. Reading an UNPOOLED source here is the fused unpool +
                     rectify + transposed convolution.
    direct_transpose grid ceil(n*H*W / THREADS): thread = output pixel, all I output channels (I small, e.g. the
                     grey or RGB input layer; a compile-time constant: the accumulators stay in registers)
                     straight from the source, channel by channel.
    materialise      grid ceil(C*n*Hu*Wu / THREADS): a source written out as a dense plane (two pools in a
                     row; a pool as the network's first layer).
    scatter_unpool   the ``unpool`` op (any switches, atomic adds).

Factories are cached and specialised (their names say on what) on the conv and pool geometry, so the
divisions by strides compile to shifts and the tap loops unroll.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import config, cuda

DENSE = 0
UNPOOLED = 1
UNPOOLED_OVERLAP = 2

# channels per thread of gather_columns: enough to pay for the per-pixel index arithmetic many times over,
# few enough that layers with 32-64 channels still launch several threads per column
GATHER_CHANNELS = 16

# Flat indices are cast to uint64 where they index: Numba then emits no negative-index wrap-around code (it
# does for signed indices), which halves the instructions per load or store (checked on the sm_90 SASS).
_ix = np.uint64

# device functions are inlined into the kernels (their local-array arguments then live in registers); the
# simulator's jit knows no forceinline
_inline = cuda.jit(device=True) if int(getattr(config, "ENABLE_CUDASIM", 0) or 0) else cuda.jit(device=True, forceinline=True)


def source_kind(pool: tuple | None) -> int:
    """The source kind of a pool's unpooled plane: UNPOOLED when its windows cannot overlap."""
    pkh, pkw, psh, psw = pool[:4]
    return UNPOOLED if pkh <= psh and pkw <= psw else UNPOOLED_OVERLAP


def _suffix(kind, pool):
    if kind == DENSE:
        return "dense"
    return ("unpooled" if kind == UNPOOLED else "unpooled_overlap") + "_k{}x{}_s{}x{}_p{}x{}".format(*pool)


@lru_cache(maxsize=None)
def _tap_code(kind: int, pool: tuple | None):
    """Device function code(u, v, ok, Hs, Ws, Wu) -> (offset, target) of a read of the source at (u, v):
    DENSE: (u*Ws + v, 0), or (-1, 0) when not ``ok``; UNPOOLED: (offset of the window holding (u, v) in the
    pooled plane, u*Wu + v: the switch that window must have for the read to be nonzero), or (0, -1);
    UNPOOLED_OVERLAP: (u*Wu + v, 0) or (-1, 0): the value function searches the windows."""
    if kind == UNPOOLED:
        pkh, pkw, psh, psw, pph, ppw = pool

        @_inline
        def code_unpooled(u, v, ok, Hs, Ws, Wu):
            p = (u + pph) // psh
            q = (v + ppw) // psw
            if ok and p < Hs and q < Ws and u + pph - p * psh < pkh and v + ppw - q * psw < pkw:
                return p * Ws + q, u * Wu + v
            return 0, -1

        return code_unpooled

    @_inline
    def code_plain(u, v, ok, Hs, Ws, Wu):
        if ok:
            return u * (Ws if kind == DENSE else Wu) + v, 0
        return -1, 0

    return code_plain


@lru_cache(maxsize=None)
def _tap_value(kind: int, pool: tuple | None):
    """Device function value(src, sw, base, sbase, off, tgt, Hs, Ws, Wu, pre, post) of one tap: ``base``
    = (o*n + t)*Hs*Ws (the signal's plane in src), ``sbase`` = (b*C + o)*Hs*Ws (its image's switches)."""
    zero = np.float32(0.0)
    if kind == DENSE:
        @_inline
        def value_dense(src, sw, base, sbase, off, tgt, Hs, Ws, Wu, pre, post):
            s = src[_ix(base + (off if off >= 0 else 0))]
            if pre and s < zero:
                s = zero
            return s if off >= 0 else zero

        return value_dense

    if kind == UNPOOLED:
        @_inline
        def value_unpooled(src, sw, base, sbase, off, tgt, Hs, Ws, Wu, pre, post):
            s = src[_ix(base + off)]
            if pre and s < zero:
                s = zero
            if sw[_ix(sbase + off)] != tgt:
                s = zero
            if post and s < zero:
                s = zero
            return s

        return value_unpooled

    pkh, pkw, psh, psw, pph, ppw = pool

    @_inline
    def value_overlap(src, sw, base, sbase, off, tgt, Hs, Ws, Wu, pre, post):
        if off < 0:
            return zero
        u = off // Wu
        v = off - u * Wu
        # the windows (p, q) whose span holds (u, v): p*psh - pph <= u < p*psh - pph + pkh
        a = u + pph - pkh + 1
        plo = 0 if a <= 0 else (a + psh - 1) // psh
        phi = min((u + pph) // psh, Hs - 1)
        a = v + ppw - pkw + 1
        qlo = 0 if a <= 0 else (a + psw - 1) // psw
        qhi = min((v + ppw) // psw, Ws - 1)
        acc = zero
        for p in range(plo, phi + 1):
            for q in range(qlo, qhi + 1):
                if sw[_ix(sbase + p * Ws + q)] == off:
                    s = src[_ix(base + p * Ws + q)]
                    if pre and s < zero:
                        s = zero
                    acc += s
        if post and acc < zero:
            acc = zero
        return acc

    return value_overlap


@lru_cache(maxsize=None)
def _transposed_taps(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, kind: int, pool: tuple | None):
    """Device function taps(y, x, off, tgt, Hu, Wu, Hs, Ws): fills the per-tap (offset, target) codes of
    output pixel (y, x) of a transposed conv reading a source plane (Hu, Wu): tap (ky, kx) reads
    (u, v) = ((y + ph - ky)/sh, (x + pw - kx)/sw) when both divisions are exact and in range."""
    code = _tap_code(kind, pool)

    @_inline
    def taps(y, x, off, tgt, Hu, Wu, Hs, Ws):
        for ky in range(kh):
            nu = y + ph - ky
            u = nu // sh
            ok_u = nu >= 0 and nu - u * sh == 0 and u < Hu
            for kx in range(kw):
                nv = x + pw - kx
                v = nv // sw
                ok = ok_u and nv >= 0 and nv - v * sw == 0 and v < Wu
                o_, t_ = code(u, v, ok, Hs, Ws, Wu)
                off[ky * kw + kx] = o_
                tgt[ky * kw + kx] = t_

    return taps


@lru_cache(maxsize=None)
def head_signal(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, folded: bool = False):
    """Kernel: G_L^c z_L for the (image, class) pairs of a chunk, or with ``folded`` the folded head
    (kernels/fold.py): the transposed conv j of (z⁺, z⁻) with class c's two folded kernels, which equals
    conv j's transpose of the rectified G_L^c z_L. The geometry is the head's, or conv j's when folded.

    z (B, N, h, w) float32 flat, classes (B, K) int64 flat, weight (N, I, kh, kw) flat — folded:
    (N, 2, I, kh, kw), the z⁺ kernels then the z⁻ ones — out (I, n, H, W) flat; pair t = (b - b0)*kc +
    (k - k0). One thread per output pixel (t, y, x), looping over the I output channels with the pixel's
    kh*kw z values in registers."""
    taps = kh * kw

    @cuda.jit
    def kernel(z, classes, weight, out, N, K, h, w, I, n, H, W, b0, k0, kc):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if idx >= n * H * W:
            return
        x = idx % W
        r = idx // W
        y = r % H
        t = r // H
        b = b0 + t // kc
        c = classes[_ix(b * K + k0 + t % kc)]
        zbase = (b * N + c) * h * w
        zero = np.float32(0.0)
        vals = cuda.local.array(taps, np.float32)
        for ky in range(kh):
            nu = y + ph - ky
            u = nu // sh
            ok_u = nu >= 0 and nu - u * sh == 0 and u < h
            for kx in range(kw):
                nv = x + pw - kx
                v = nv // sw
                ok = ok_u and nv >= 0 and nv - v * sw == 0 and v < w
                val = z[_ix(zbase + (u * w + v if ok else 0))]
                vals[ky * kw + kx] = val if ok else zero
        plane = H * W
        obase = t * plane + y * W + x
        wbase = c * (2 if folded else 1) * I * taps
        for i in range(I):
            acc = zero
            for k in range(taps):
                if folded:  # a constant of this specialisation: no branch in the compiled loop
                    acc += max(vals[k], zero) * weight[_ix(wbase + i * taps + k)]
                    acc += min(vals[k], zero) * weight[_ix(wbase + (I + i) * taps + k)]
                else:
                    acc += vals[k] * weight[_ix(wbase + i * taps + k)]
            out[_ix(obase + i * n * plane)] = acc

    kernel.__name__ = f"head_signal_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}" + ("_folded" if folded else "")
    return kernel


@lru_cache(maxsize=None)
def gather_columns(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, kind: int, pool: tuple | None):
    """Kernel writing the columns of a transposed conv read from a source (see the module docstring):
    G[(o*kh + ky)*kw + kx, j] for the columns j of a block starting at global column ``j0`` of the
    (n, H, W) output, channels o = g*GATHER_CHANNELS ... of thread group g = blockIdx.y.

    Arguments: src (O*n*Hs*Ws,) float32, sw (B*O*Hs*Ws,) int32 (unused for DENSE), G (rows, nb) float32;
    j0, O, n, Hs, Ws (the source array's plane), Hu, Wu (the plane it stands for), H, W (the output
    plane), b0, kc, pre, post."""
    taps = kh * kw
    fill = _transposed_taps(kh, kw, sh, sw, ph, pw, kind, pool)
    value = _tap_value(kind, pool)
    group = GATHER_CHANNELS

    @cuda.jit
    def kernel(src, swt, G, ncols, j0, O, n, Hs, Ws, Hu, Wu, H, W, b0, kc, pre, post):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j >= ncols:
            return
        g = j0 + j
        x = g % W
        r = g // W
        y = r % H
        t = r // H
        b = b0 + t // kc
        off = cuda.local.array(taps, np.int32)
        tgt = cuda.local.array(taps, np.int32)
        fill(y, x, off, tgt, Hu, Wu, Hs, Ws)
        vals = cuda.local.array(taps, np.float32)
        plane = Hs * Ws
        o0 = cuda.blockIdx.y * group
        o1 = min(o0 + group, O)
        for o in range(o0, o1):
            base = (o * n + t) * plane
            sbase = (b * O + o) * plane
            for k in range(taps):  # all loads first: they are in flight together
                vals[k] = value(src, swt, base, sbase, off[k], tgt[k], Hs, Ws, Wu, pre, post)
            row = o * taps
            for k in range(taps):
                G[_ix((row + k) * ncols + j)] = vals[k]

    kernel.__name__ = f"gather_columns_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_{_suffix(kind, pool)}"
    return kernel


@lru_cache(maxsize=None)
def direct_transpose(I: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, kind: int,
                     pool: tuple | None):
    """Kernel: out[i, t, y, x] = sum over o, ky, kx of weight[o, i, ky, kx] * source(o, t, u, v), all I output
    channels of one pixel per thread, channel o by channel o (the kh*kw loads of a channel issued together).

    Arguments: src, sw as for gather_columns; weight (O*I*kh*kw,) float32; out (I*n*H*W,) float32; O, n,
    Hs, Ws, Hu, Wu, H, W, b0, kc, pre, post."""
    taps = kh * kw
    fill = _transposed_taps(kh, kw, sh, sw, ph, pw, kind, pool)
    value = _tap_value(kind, pool)

    @cuda.jit
    def kernel(src, swt, weight, out, O, n, Hs, Ws, Hu, Wu, H, W, b0, kc, pre, post):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if idx >= n * H * W:
            return
        x = idx % W
        r = idx // W
        y = r % H
        t = r // H
        b = b0 + t // kc
        off = cuda.local.array(taps, np.int32)
        tgt = cuda.local.array(taps, np.int32)
        fill(y, x, off, tgt, Hu, Wu, Hs, Ws)
        vals = cuda.local.array(taps, np.float32)
        acc = cuda.local.array(I, np.float32)
        for i in range(I):
            acc[i] = np.float32(0.0)
        plane = Hs * Ws
        for o in range(O):
            base = (o * n + t) * plane
            sbase = (b * O + o) * plane
            for k in range(taps):
                vals[k] = value(src, swt, base, sbase, off[k], tgt[k], Hs, Ws, Wu, pre, post)
            wbase = o * I * taps
            for i in range(I):
                a = acc[i]
                for k in range(taps):
                    a += vals[k] * weight[_ix(wbase + i * taps + k)]
                acc[i] = a
        out_plane = H * W
        obase = t * out_plane + y * W + x
        for i in range(I):
            out[_ix(obase + i * n * out_plane)] = acc[i]

    kernel.__name__ = f"direct_transpose_I{I}_k{kh}x{kw}_s{sh}x{sw}_p{ph}x{pw}_{_suffix(kind, pool)}"
    return kernel


@lru_cache(maxsize=None)
def materialise(kind: int, pool: tuple | None):
    """Kernel: out[o, t, u, v] = source(o, t, u, v) over the whole (C, n, Hu, Wu) plane, out flat.
    Arguments: src, sw as for gather_columns; out; C, n, Hs, Ws, Hu, Wu, b0, kc, pre, post."""
    code = _tap_code(kind, pool)
    value = _tap_value(kind, pool)

    @cuda.jit
    def kernel(src, swt, out, C, n, Hs, Ws, Hu, Wu, b0, kc, pre, post):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if idx >= C * n * Hu * Wu:
            return
        v = idx % Wu
        r = idx // Wu
        u = r % Hu
        r = r // Hu
        t = r % n
        o = r // n
        off, tgt = code(u, v, True, Hs, Ws, Wu)
        plane = Hs * Ws
        out[_ix(idx)] = value(src, swt, (o * n + t) * plane, ((b0 + t // kc) * C + o) * plane, off, tgt, Hs, Ws, Wu,
                         pre, post)

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
