"""Numba kernels of the CPU backend (float32, images channel-last inside).

What they compute
-----------------
_conv_sparse_nhwc   a forward convolution skipping zero inputs: each image row's non-zero entries listed,
                    then each output row sums value × weight row (_gather_rows) — convs with few outputs
_conv_dense_nhwc    a dense forward convolution, register-blocked: 3 output pixels × 32 channels in vectors
_max_pool_nhwc      max pooling with switches: flat index row*W+col into the input plane of each window's
                    first maximum in row-major window order (strict '>': torch's tie rule)
_unpool_nchw        switch unpooling, values *added* at the switches
_csr_dense          a plane's non-zero (rectified) entries as compressed sparse rows, pixel by pixel
_csr_signs          z_L[b, c] as a two-channel sparse plane (z⁺, z⁻): the folded head step (cpu._Prepared)
_csr_pooled         the same for an UNPOOLED plane, built through the switches: each pooled value goes to its
                    switch's row, so the mostly-zero unpooled plane is never built
_gather_csr_conv_t  transposed convolution of sparse rows: each output pixel sums value × weight row over the
                    non-zero inputs that reach it (zeros cost nothing); _csr_pooled + this = the fused
                    unpool + rectify + transposed conv
_few_channels_conv_t  the transposed conv into 1–7 channels (the image's), as dot products over the inputs
_conv_t_batch       transposed convolution of a batch (the public conv_transpose2d)
_backproject_pairs  the whole back-projection of a set of (image, class) signals: for every pair, the head's
                    kernel c transposes z_L[b, c], then the planned steps run (rectify, unpool, transposed
                    conv, fused unpool + rectify + transposed conv), and the result is written
                    channel-reduced or whole
_merge_dominant     running argmax / max over classes of a chunk of channel-reduced maps
_compose_rgb        Eq. 6: hue of the dominant class, V = normalised D, HSV → RGB bytes (float64, the same
                    operations in the same order as ``colorsys``/``clearmaps.reference.hsv_to_rgb``)

How they are launched
---------------------
All are ``@njit(cache=True)``; the batch-level ones use ``prange`` over images, rows or workers (Numba's
thread pool, ``numba.get_num_threads()`` threads). Every buffer is allocated by the caller in Python, so
the kernels allocate nothing and tracemalloc sees the backend's whole footprint. ``_backproject_pairs`` runs
``nworkers`` workers; worker w handles pairs w, w + nworkers, ... with its own two ping-pong planes
``scratch[w, 0/1]`` sized to the largest activation of the network.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._vec import vfma, vload, vstore, vsum, vzero

# the steps of the back-projection plan (one row of int64 fields each; see cpu._Plan)
HEAD, CONV_T, CONV_T_POOLED, UNPOOL, RECTIFY, CONV_T_FEW, HEAD_FOLDED = range(7)
(F_KIND, F_RECT, F_WOFF, F_O, F_I, F_KH, F_KW, F_SH, F_SW, F_PH, F_PW, F_IN_H, F_IN_W, F_OUT_H, F_OUT_W,
 F_SWOFF, F_SWCOUNT, F_UH, F_UW, F_SIZE, F_WOFF_FEW, F_MOFF, F_MCOUNT) = range(23)
NFIELDS = 23
# F_RECT holds the ReLU rule a step applies to its values (docs/design.md, "Response methods"): none,
# rectify (the deconvnet), guided (rectify, and keep only where the forward ReLU's input was > 0) or
# gradient (that mask alone). The masks of every ReLU, per image channel-last uint8, sit one layer after
# another in one flat array; F_MOFF / F_MCOUNT are a step's layer offset and per-image count (as the switches)
RULE_NONE, RULE_RECTIFY, RULE_GUIDED, RULE_GRADIENT = 0, 1, 2, 3
REDUCE_NONE, REDUCE_SUM, REDUCE_MAX, REDUCE_NORM = 0, 1, 2, 3

# 'contract' lets LLVM fuse multiply-adds (FMA): one rounding instead of two, never less accurate
_FM = {"contract"}
# input channels per pass of the gather over sorted rows: one tap's weights for a 32-channel output block,
# SPAN rows of 128 bytes, then fit in a 32 KB L1 (a 512-channel VGG layer's would take 64 KB)
SPAN = 256


@njit(cache=True, parallel=True, fastmath=_FM)
def _conv_dense_nhwc(x, wt, bias, kh, kw, sh, sw, ph, pw, out):
    """A dense convolution of channel-last x (B, H, W, C) into out (B, oh, ow, O), bias added; wt flat
    (kh, kw, C, O). One task per output row (prange). Register-blocked like a GEMM microkernel: three
    output pixels × 32 output channels are held in twelve 8-float vectors (_vec) while every tap and input
    channel adds broadcast(value) × weight row, so each weight load serves three pixels and each value
    four vectors. Pixels whose taps would leave the image (the borders), and the last O mod 32 channels,
    go one pixel at a time (_dense_pixel), the borders with bounds checks."""
    B, H, W, C = x.shape
    oh, ow, O = out.shape[1], out.shape[2], out.shape[3]
    xf = x.reshape(B * H * W * C)
    of = out.reshape(B * oh * ow * O)
    # the output columns whose every tap is inside the image: ox*sw - pw >= 0 and ox*sw - pw + kw - 1 < W
    lo = min(ow, (pw + sw - 1) // sw)
    hi = max(lo, min(ow, (W - kw + pw) // sw + 1))
    for t in prange(B * oh):
        b = t // oh
        oy = t % oh
        row = (b * oh + oy) * ow
        ox = 0
        while ox < ow:
            if lo <= ox and ox + 3 <= hi:
                _dense_block3(xf, wt, bias, b, oy, ox, H, W, C, O, kh, kw, sh, sw, ph, pw, of, (row + ox) * O)
                ox += 3
            else:
                _dense_pixel(xf, wt, bias, b, oy, ox, H, W, C, O, kh, kw, sh, sw, ph, pw, of, (row + ox) * O, 0)
                ox += 1


@njit(cache=True, fastmath=_FM, inline="always")
def _dense_block3(xf, wt, bias, b, oy, ox, H, W, C, O, kh, kw, sh, sw, ph, pw, of, d):
    """Output pixels ox, ox+1, ox+2 of row oy, all of whose taps are inside the image columns: every block
    of 32 output channels in twelve vectors, the last O mod 32 channels pixel by pixel (_dense_pixel)."""
    step = sw * C  # from one pixel's input to the next one's
    i = 0
    while i + 32 <= O:
        a0, a1, a2, a3 = vload(bias, i), vload(bias, i + 8), vload(bias, i + 16), vload(bias, i + 24)
        b0, b1, b2, b3 = a0, a1, a2, a3
        c0, c1, c2, c3 = a0, a1, a2, a3
        for ky in range(kh):
            iy = oy * sh - ph + ky
            if iy < 0 or iy >= H:
                continue
            for kx in range(kw):
                p = ((b * H + iy) * W + ox * sw - pw + kx) * C
                wb = (ky * kw + kx) * C * O + i
                for c in range(C):
                    u, v, z = xf[p + c], xf[p + step + c], xf[p + 2 * step + c]
                    q = wb + c * O
                    w0, w1, w2, w3 = vload(wt, q), vload(wt, q + 8), vload(wt, q + 16), vload(wt, q + 24)
                    a0, a1, a2, a3 = vfma(a0, w0, u), vfma(a1, w1, u), vfma(a2, w2, u), vfma(a3, w3, u)
                    b0, b1, b2, b3 = vfma(b0, w0, v), vfma(b1, w1, v), vfma(b2, w2, v), vfma(b3, w3, v)
                    c0, c1, c2, c3 = vfma(c0, w0, z), vfma(c1, w1, z), vfma(c2, w2, z), vfma(c3, w3, z)
        vstore(of, d + i, a0), vstore(of, d + i + 8, a1), vstore(of, d + i + 16, a2), vstore(of, d + i + 24, a3)
        e = d + O + i
        vstore(of, e, b0), vstore(of, e + 8, b1), vstore(of, e + 16, b2), vstore(of, e + 24, b3)
        e += O
        vstore(of, e, c0), vstore(of, e + 8, c1), vstore(of, e + 16, c2), vstore(of, e + 24, c3)
        i += 32
    if i < O:
        for j in range(3):
            _dense_pixel(xf, wt, bias, b, oy, ox + j, H, W, C, O, kh, kw, sh, sw, ph, pw, of, d + j * O, i)


@njit(cache=True, fastmath=_FM, inline="always")
def _dense_pixel(xf, wt, bias, b, oy, ox, H, W, C, O, kh, kw, sh, sw, ph, pw, of, d, i0):
    """Output channels i0 .. O-1 of one output pixel (32, then 8, then 1 at a time), taps outside the image
    skipped."""
    i = i0
    while i < O:
        lanes = 32 if i + 32 <= O else (8 if i + 8 <= O else 1)
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        if lanes == 32:
            a0, a1, a2, a3 = vload(bias, i), vload(bias, i + 8), vload(bias, i + 16), vload(bias, i + 24)
        elif lanes == 8:
            a0 = vload(bias, i)
        acc = bias[i]
        for ky in range(kh):
            iy = oy * sh - ph + ky
            if iy < 0 or iy >= H:
                continue
            for kx in range(kw):
                ix = ox * sw - pw + kx
                if ix < 0 or ix >= W:
                    continue
                p = ((b * H + iy) * W + ix) * C
                wb = (ky * kw + kx) * C * O + i
                for c in range(C):
                    u = xf[p + c]
                    q = wb + c * O
                    if lanes == 32:
                        a0, a1 = vfma(a0, vload(wt, q), u), vfma(a1, vload(wt, q + 8), u)
                        a2, a3 = vfma(a2, vload(wt, q + 16), u), vfma(a3, vload(wt, q + 24), u)
                    elif lanes == 8:
                        a0 = vfma(a0, vload(wt, q), u)
                    else:
                        acc += u * wt[q]
        if lanes == 32:
            vstore(of, d + i, a0), vstore(of, d + i + 8, a1), vstore(of, d + i + 16, a2), vstore(of, d + i + 24, a3)
        elif lanes == 8:
            vstore(of, d + i, a0)
        else:
            of[d + i] = acc
        i += lanes


@njit(cache=True, parallel=True)
def _conv_sparse_nhwc(x, wt, kh, kw, sh, sw, ph, pw, out, vals, chans, start, stop, T):
    """A convolution of channel-last x (B, H, W, C) into out (B, oh, ow, O) (no bias), skipping zero
    inputs (after a ReLU about half): first each input pixel's non-zero entries are listed in its own slice
    of vals / chans (start / stop per pixel), then each output row gathers them (_gather_rows). Work is
    split into (image, row) tasks that T workers take round-robin."""
    B, H, W, C = x.shape
    oh, ow, O = out.shape[1], out.shape[2], out.shape[3]
    x2 = x.reshape(B * H * W * C)
    out2 = out.reshape(B, oh * ow * O)
    for wk in prange(T):
        for t in range(wk, B * H, T):
            for p in range(t * W, (t + 1) * W):
                k = p * C
                start[p] = k
                for c in range(C):
                    v = x2[p * C + c]
                    if v != 0.0:
                        vals[k] = v
                        chans[k] = c
                        k += 1
                stop[p] = k
    for wk in prange(T):
        for t in range(wk, B * oh, T):
            b = t // oh
            oy = t % oh
            _gather_rows(vals, chans, start, stop, b * H * W, H, W, C, wt, 0, kh, kw, sh, sw, ph, pw, O, out2[b],
                         oh, ow, oy, oy + 1, True, min(C, SPAN))


@njit(cache=True, parallel=True)
def _max_pool_nhwc(x, kh, kw, sh, sw, ph, pw, out, switches):
    """out/switches (B, oh, ow, C) from x (B, H, W, C); switches index the (H, W) plane row-major."""
    B, H, W, C = x.shape
    oh, ow = out.shape[1], out.shape[2]
    for t in prange(B * oh):
        b = t // oh
        oy = t % oh
        for ox in range(ow):
            for c in range(C):
                out[b, oy, ox, c] = -np.inf
                switches[b, oy, ox, c] = 0
            for ky in range(kh):  # row-major window order and a strict '>': the first maximum wins
                iy = oy * sh - ph + ky
                if iy < 0 or iy >= H:
                    continue
                for kx in range(kw):
                    ix = ox * sw - pw + kx
                    if ix < 0 or ix >= W:
                        continue
                    for c in range(C):
                        v = x[b, iy, ix, c]
                        if v > out[b, oy, ox, c]:
                            out[b, oy, ox, c] = v
                            switches[b, oy, ox, c] = iy * W + ix


@njit(cache=True, parallel=True)
def _unpool_nchw(y, switches, out):
    """out (N, C, H*W) zeroed here, += y (N, C, h*w) at switches (N, C, h*w)."""
    N, C, n = y.shape
    for t in prange(N * C):
        b = t // C
        c = t % C
        for j in range(out.shape[2]):
            out[b, c, j] = 0.0
        for j in range(n):
            out[b, c, switches[b, c, j]] += y[b, c, j]




@njit(cache=True, inline="always")
def _dropped(v, rule, masks, m):
    """Whether value v (at mask index m) is zero after the ReLU rule: zero already, rectified away, or where
    the forward ReLU was closed."""
    if v == 0.0:
        return True
    if (rule == RULE_RECTIFY or rule == RULE_GUIDED) and v < 0.0:
        return True
    return (rule == RULE_GUIDED or rule == RULE_GRADIENT) and masks[m] == 0


@njit(cache=True, fastmath=_FM)
def _few_channels_conv_t(src, h, w, O, rule, masks, moff, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W):
    """The transposed conv for few output channels (the first layer: 1–3 image channels), where a length-I
    output row is too short to vectorise: each output value is a dot product over the O input channels,
    contiguous in the dense src (h, w, O) and in wt[woff:] laid out (I, kh, kw, O), summed eight channels
    at a time in a vector (_vec) and the last O mod 8 one by one. ``rule`` is applied to src in place first
    (the plane is this step's input only). Taps step as in _gather_rows (no division per tap)."""
    if rule != RULE_NONE:
        for j in range(h * w * O):
            if _dropped(src[j], rule, masks, moff + j):
                src[j] = 0.0
    O8 = O - O % 8
    for oy in range(H):
        ky_first = (oy + ph) % sh
        iy_first = (oy + ph - ky_first) // sh
        for ox in range(W):
            kx_first = (ox + pw) % sw
            ix_first = (ox + pw - kx_first) // sw
            for i in range(I):
                acc = vzero()
                tail = np.float32(0.0)
                ky, iy = ky_first, iy_first
                while ky < kh:
                    if 0 <= iy < h:
                        kx, ix = kx_first, ix_first
                        while kx < kw:
                            if 0 <= ix < w:
                                sb = (iy * w + ix) * O
                                wb = woff + ((i * kh + ky) * kw + kx) * O
                                for o in range(0, O8, 8):
                                    acc = vfma(acc, vload(src, sb + o), vload(wt, wb + o))
                                for o in range(O8, O):
                                    tail += src[sb + o] * wt[wb + o]
                            kx += sw
                            ix -= 1
                    ky += sh
                    iy -= 1
                dst[(oy * W + ox) * I + i] = vsum(acc) + tail


@njit(cache=True)
def _unpool_plane(src, h, w, C, rule, masks, moff, sws, swoff, Hu, Wu, dst):
    """dst[(Hu, Wu, C)] = unpool of src[(h, w, C)], the ReLU rule of the unpooled plane applied to each value
    first (windows that share a switch are unpooled with no rule, then a step of their own applies it)."""
    for j in range(Hu * Wu * C):
        dst[j] = 0.0
    for t in range(h * w):
        for c in range(C):
            v = src[t * C + c]
            d = sws[swoff + t * C + c] * C + c
            if rule != RULE_NONE and _dropped(v, rule, masks, moff + d):
                v = 0.0
            dst[d] += v


@njit(cache=True)
def _csr_dense(src, h, w, O, rule, masks, moff, vals, chans, start):
    """The entries of a dense (h, w, O) plane that are non-zero after the ReLU ``rule``, pixel by pixel:
    pixel p's values are vals[start[p]:start[p+1]], their channels chans[...] (compressed sparse rows)."""
    n = 0
    for p in range(h * w):
        start[p] = n
        base = p * O
        for o in range(O):
            v = src[base + o]
            if _dropped(v, rule, masks, moff + base + o):
                continue
            vals[n] = v
            chans[n] = o
            n += 1
    start[h * w] = n


@njit(cache=True)
def _csr_signs(z, n, vals, chans, start):
    """z's n values as a two-channel sparse plane: positive ones in channel 0, negative in channel 1."""
    k = 0
    for p in range(n):
        start[p] = k
        v = z[p]
        if v != 0.0:
            vals[k] = v
            chans[k] = 0 if v > 0.0 else 1
            k += 1
    start[n] = k


@njit(cache=True)
def _csr_pooled(src, h, w, O, rule, masks, moff, sws, swoff, Hu, Wu, vals, chans, start, cursor):
    """The unpooled plane (Hu, Wu, O) in compressed sparse rows, built through the switches: each pooled value
    that the unpooled plane's ReLU ``rule`` keeps goes to its switch's row. The dense unpooled plane (mostly
    zeros) is never built."""
    npix = Hu * Wu
    for p in range(npix + 1):
        start[p] = 0
    for t in range(h * w * O):
        v = src[t]
        if _dropped(v, rule, masks, moff + sws[swoff + t] * O + t % O):
            continue
        start[sws[swoff + t] + 1] += 1
    for p in range(npix):
        start[p + 1] += start[p]
        cursor[p] = start[p]
    for t in range(h * w * O):
        v = src[t]
        if _dropped(v, rule, masks, moff + sws[swoff + t] * O + t % O):
            continue
        p = sws[swoff + t]
        k = cursor[p]
        vals[k] = v
        chans[k] = t % O
        cursor[p] = k + 1


@njit(cache=True, fastmath=_FM)
def _gather_csr_conv_t(vals, chans, start, h, w, O, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W, span):
    """dst[(H, W, I)] = conv_transpose of the sparse input (vals, chans, start) of size (h, w, O), with
    wt[woff:] laid out (kh, kw, O, I), input channels in passes of ``span`` (see _gather_rows)."""
    _gather_rows(vals, chans, start, start[1:], 0, h, w, O, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W, 0, H,
                 False, span)


@njit(cache=True, fastmath=_FM)
def _gather_rows(vals, chans, start, stop, p0, h, w, O, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W, oy0, oy1,
                 forward, span):
    """Output rows oy0 .. oy1-1 of a convolution (``forward``) or a transposed convolution of the sparse
    input of size (h, w, O) whose pixel p has entries vals / chans[start[p0 + p]:stop[p0 + p]]; weights
    wt[woff:] laid out (kh, kw, O, I); dst (H, W, I).

    Gather form, tap by tap: for tap (ky, kx), every output pixel that the tap connects to an existing input
    pixel adds value × weight row over that pixel's non-zero entries (zeros cost nothing). A block of 32
    output channels is summed in four 8-float vectors held in registers over the pixel's entries (_vec),
    then stored once; then blocks of 8, then single channels. Tap by tap, one tap's weights (O rows of a
    32-channel block) stay in L1 across all pixels; the output rows go in tiles of at most 512 pixels, so
    a tile's block of dst stays in L2 across the taps. ``span`` < O splits the input channels into passes of
    ``span`` (rows sorted by channel only: see SPAN), so that a wide layer's weight block fits in L1 too.

    A convolution's tap (ky, kx) reads input pixel (oy*sh - ph + ky, ...); its transpose reaches output
    rows oy ≡ ky - ph (mod sh), from input row (oy + ph - ky) / sh (no division per pixel)."""
    for j in range(oy0 * W * I, oy1 * W * I):
        dst[j] = 0.0
    rows = max(1, 512 // W)
    for t0 in range(oy0, oy1, rows):
        t1 = min(oy1, t0 + rows)
        i = 0
        while i < I:
            lanes = 32 if i + 32 <= I else (8 if i + 8 <= I else 1)
            for c0 in range(0, O, span):
                _gather_taps(vals, chans, start, stop, p0, h, w, O, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, W,
                             t0, t1, forward, i, lanes, c0, c0 + span, span < O)
            i += lanes


@njit(cache=True, fastmath=_FM, inline="always")
def _gather_taps(vals, chans, start, stop, p0, h, w, O, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, W, t0, t1,
                 forward, i, lanes, c0, c1, split):
    """One pass of _gather_rows: output rows t0 .. t1-1, output channels i .. i+lanes-1, the entries of input
    channels c0 .. c1-1 (found by bisection in each sorted row when ``split``, else the whole row)."""
    for ky in range(kh):
        if forward:
            oy_s, soy, iy_s, siy = t0, 1, t0 * sh - ph + ky, sh
        else:
            oy_s = t0 + (ky - ph - t0) % sh
            soy, iy_s, siy = sh, (oy_s + ph - ky) // sh, 1
        for kx in range(kw):
            if forward:
                ox_s, sox, ix_s, six = 0, 1, kx - pw, sw
            else:
                ox_s = (kx - pw) % sw
                sox, ix_s, six = sw, (ox_s + pw - kx) // sw, 1
            base = woff + (ky * kw + kx) * O * I + i
            oy, iy = oy_s, iy_s
            while oy < t1:
                if 0 <= iy < h:
                    ox, ix = ox_s, ix_s
                    while ox < W:
                        if 0 <= ix < w:
                            p = p0 + iy * w + ix
                            k0, k1 = start[p], stop[p]
                            if split:
                                k0 = _first_at_least(chans, k0, k1, c0)
                                k1 = _first_at_least(chans, k0, k1, c1)
                            if k0 < k1:
                                _add_terms(vals, chans, k0, k1, wt, base, I, lanes, dst, (oy * W + ox) * I + i)
                        ox += sox
                        ix += six
                oy += soy
                iy += siy


@njit(cache=True, inline="always")
def _first_at_least(chans, lo, hi, c):
    """The first k in [lo, hi) with chans[k] >= c (hi if none), chans ascending there."""
    while lo < hi:
        mid = (lo + hi) // 2
        if chans[mid] < c:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, fastmath=_FM, inline="always")
def _add_terms(vals, chans, k0, k1, wt, base, I, lanes, dst, d):
    """dst[d:d+lanes] += sum over k in [k0, k1) of vals[k] × wt[base + chans[k]*I:...+lanes] (lanes 32, 8
    or 1), the 32 or 8 lanes in registers (_vec) across the terms."""
    if lanes == 32:
        a0, a1, a2, a3 = vload(dst, d), vload(dst, d + 8), vload(dst, d + 16), vload(dst, d + 24)
        for k in range(k0, k1):
            v = vals[k]
            a = base + chans[k] * I
            a0 = vfma(a0, vload(wt, a), v)
            a1 = vfma(a1, vload(wt, a + 8), v)
            a2 = vfma(a2, vload(wt, a + 16), v)
            a3 = vfma(a3, vload(wt, a + 24), v)
        vstore(dst, d, a0)
        vstore(dst, d + 8, a1)
        vstore(dst, d + 16, a2)
        vstore(dst, d + 24, a3)
    elif lanes == 8:
        a0 = vload(dst, d)
        for k in range(k0, k1):
            a0 = vfma(a0, vload(wt, base + chans[k] * I), vals[k])
        vstore(dst, d, a0)
    else:
        acc = dst[d]
        for k in range(k0, k1):
            acc += vals[k] * wt[base + chans[k] * I]
        dst[d] = acc


@njit(cache=True)
def _run_pair(steps, wt, sws, masks, z, b, cls, buf0, buf1, wsf, wsi):
    """The back-projection of one (image b, class cls) signal; returns which buffer holds the result.
    wsf (1, L) float32 and wsi (3, L) int32 are the worker's sparse-row buffers (values; channels, row
    starts, fill cursors)."""
    vals = wsf[0]
    chans, start, cursor = wsi[0], wsi[1], wsi[2]
    cur = 0
    for s in range(steps.shape[0]):
        st = steps[s]
        kind = st[F_KIND]
        src = buf0 if cur == 0 else buf1
        dst = buf1 if cur == 0 else buf0
        if kind == HEAD:
            # G_L^c z_L: z_L[b, c] as a one-channel plane through kernel c of the head
            kk = st[F_KH] * st[F_KW] * st[F_I]
            _csr_dense(z[b * st[F_O] + cls], st[F_IN_H], st[F_IN_W], 1, RULE_NONE, masks, 0, vals, chans, start)
            _gather_csr_conv_t(vals, chans, start, st[F_IN_H], st[F_IN_W], 1, wt, st[F_WOFF] + cls * kk, st[F_KH],
                               st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I], buf0, st[F_OUT_H],
                               st[F_OUT_W], 1)
            cur = 0
            continue
        if kind == HEAD_FOLDED:
            # a 1×1 head, its ReLUs and the conv below: z⁺ and z⁻ through class cls's folded kernels
            kk = st[F_KH] * st[F_KW] * 2 * st[F_I]
            _csr_signs(z[b * st[F_O] + cls], st[F_IN_H] * st[F_IN_W], vals, chans, start)
            _gather_csr_conv_t(vals, chans, start, st[F_IN_H], st[F_IN_W], 2, wt, st[F_WOFF] + cls * kk, st[F_KH],
                               st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I], buf0, st[F_OUT_H],
                               st[F_OUT_W], 2)
            cur = 0
            continue
        rule = st[F_RECT]
        moff = st[F_MOFF] + b * st[F_MCOUNT]
        if kind == RECTIFY:
            for j in range(st[F_SIZE]):
                if _dropped(src[j], rule, masks, moff + j):
                    src[j] = 0.0
            continue
        if kind == CONV_T:
            _csr_dense(src, st[F_IN_H], st[F_IN_W], st[F_O], rule, masks, moff, vals, chans, start)
            _gather_csr_conv_t(vals, chans, start, st[F_IN_H], st[F_IN_W], st[F_O], wt, st[F_WOFF], st[F_KH],
                               st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I], dst, st[F_OUT_H],
                               st[F_OUT_W], min(st[F_O], SPAN))
        elif kind == CONV_T_FEW:
            _few_channels_conv_t(src, st[F_IN_H], st[F_IN_W], st[F_O], rule, masks, moff, wt, st[F_WOFF_FEW],
                           st[F_KH], st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I],
                           dst, st[F_OUT_H], st[F_OUT_W])
        elif kind == CONV_T_POOLED:
            _csr_pooled(src, st[F_IN_H], st[F_IN_W], st[F_O], rule, masks, moff, sws, st[F_SWOFF] + b * st[F_SWCOUNT],
                        st[F_UH], st[F_UW], vals, chans, start, cursor)
            # one pass: rows built through overlapping windows need not be sorted by channel
            _gather_csr_conv_t(vals, chans, start, st[F_UH], st[F_UW], st[F_O], wt, st[F_WOFF], st[F_KH],
                               st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I], dst, st[F_OUT_H],
                               st[F_OUT_W], st[F_O])
        else:  # UNPOOL
            _unpool_plane(src, st[F_IN_H], st[F_IN_W], st[F_O], rule, masks, moff, sws,
                          st[F_SWOFF] + b * st[F_SWCOUNT], st[F_UH], st[F_UW], dst)
        cur = 1 - cur
    return cur


@njit(cache=True)
def _write_result(res, H, W, C, reduce, out, p, images, b):
    """R (H, W, C) channel-last → out[p] as (C, H, W) (reduce NONE) or reduced over C to (H, W); times image
    b (H, W, C) of ``images`` first unless ``images`` is empty (input × gradient)."""
    n = H * W
    if images.shape[0]:
        for j in range(n * C):
            res[j] *= images[b, j]
    if reduce == REDUCE_NONE:
        for j in range(n):
            for c in range(C):
                out[p, c * n + j] = res[j * C + c]
        return
    for j in range(n):
        acc = res[j * C]
        if reduce == REDUCE_NORM:
            acc = acc * acc
        for c in range(1, C):
            v = res[j * C + c]
            if reduce == REDUCE_SUM:
                acc += v
            elif reduce == REDUCE_MAX:
                if v > acc:
                    acc = v
            else:
                acc += v * v
        if reduce == REDUCE_NORM:
            acc = np.sqrt(acc)
        out[p, j] = acc


@njit(cache=True, parallel=True)
def _backproject_pairs(steps, wt, sws, masks, z, pairs, H, W, C, reduce, scratch, wsf, wsi, out, images):
    """out[p] = R(x_b | c) (reduced over channels unless reduce == REDUCE_NONE) for each pair p = (b, c).

    z is z_L as (B*N, h*w); the HEAD step's F_O field holds N. A plan without a HEAD step starts from
    whatever the caller put in scratch[w, 0] (then worker w must handle exactly pair w). scratch
    (nworkers, 2, plane) holds each worker's ping-pong planes; wsf (nworkers, 1, L) float32 and
    wsi (nworkers, 3, L) int32 its sparse-row buffers. masks: the ReLU masks (uint8, see F_MOFF; may be
    empty when no step's rule reads them); images (B, H*W*C) channel-last multiply each result (input ×
    gradient) unless empty."""
    nworkers = scratch.shape[0]
    P = pairs.shape[0]
    for wk in prange(nworkers):
        buf0 = scratch[wk, 0]
        buf1 = scratch[wk, 1]
        for p in range(wk, P, nworkers):
            cur = _run_pair(steps, wt, sws, masks, z, pairs[p, 0], pairs[p, 1], buf0, buf1, wsf[wk], wsi[wk])
            _write_result(buf0 if cur == 0 else buf1, H, W, C, reduce, out, p, images, pairs[p, 0])


@njit(cache=True)
def _merge_dominant(r, image, position, best, index):
    """Running Eqs. 4–5: for the chunk's maps r (P, n) in order, best[image[p]] = max, index = argmax
    (strict '>': among equal responses the earlier class keeps the pixel)."""
    P, n = r.shape
    for j in range(n):  # serial: a few µs of work, less than waking the thread pool
        for p in range(P):
            b = image[p]
            v = r[p, j]
            if position[p] == 0 or v > best[b, j]:
                best[b, j] = v
                index[b, j] = position[p]


@njit(cache=True, parallel=True)
def _compose_rgb(index, response, hues, level, rgb):
    """Eq. 6 per pixel, in float64 with colorsys's operations (S = 1): V = clip(D, 0, level) / level (0 where
    the image's level is 0), then the six-sector HSV formula and round-half-up bytes."""
    B, n = response.shape
    for t in prange(B * n):
        b = t // n
        j = t % n
        lv = level[b]
        if lv > 0.0:
            d = response[b, j]
            v = min(max(d, 0.0), lv) / lv
        else:
            v = 0.0
        h = hues[index[b, j]]
        i = np.floor(h * 6.0)
        f = h * 6.0 - i
        p = v * (1.0 - 1.0)
        q = v * (1.0 - 1.0 * f)
        tt = v * (1.0 - 1.0 * (1.0 - f))
        sector = np.int64(i) % 6
        if sector == 0:
            r, g, bl = v, tt, p
        elif sector == 1:
            r, g, bl = q, v, p
        elif sector == 2:
            r, g, bl = p, v, tt
        elif sector == 3:
            r, g, bl = p, q, v
        elif sector == 4:
            r, g, bl = tt, p, v
        else:
            r, g, bl = v, p, q
        rgb[b, j, 0] = np.uint8(np.floor(min(max(r, 0.0), 1.0) * 255.0 + 0.5))
        rgb[b, j, 1] = np.uint8(np.floor(min(max(g, 0.0), 1.0) * 255.0 + 0.5))
        rgb[b, j, 2] = np.uint8(np.floor(min(max(bl, 0.0), 1.0) * 255.0 + 0.5))


@njit(cache=True, parallel=True)
def _conv_t_batch(y, wt, kh, kw, sh, sw, ph, pw, I, out, wsf, wsi):
    """Transposed conv of a batch: y (N, h, w, O) channel-last, wt (kh, kw, O, I) flat, out (N, H, W, I);
    wsf (N, 1, L) / wsi (N, 3, L) int32 are each image's sparse-row buffers."""
    N, h, w, O = y.shape
    H, W = out.shape[1], out.shape[2]
    y2 = y.reshape(N, h * w * O)
    out2 = out.reshape(N, H * W * I)
    for n in prange(N):
        _csr_dense(y2[n], h, w, O, RULE_NONE, np.zeros(0, np.uint8), 0, wsf[n, 0], wsi[n, 0], wsi[n, 1])
        _gather_csr_conv_t(wsf[n, 0], wsi[n, 0], wsi[n, 1], h, w, O, wt, 0, kh, kw, sh, sw, ph, pw, I, out2[n], H, W,
                           min(O, SPAN))
