"""Numba kernels of the CPU backend (float32, images channel-last inside).

What they compute
-----------------
_im2col_nhwc        the patches of a convolution, one row per output pixel (the forward conv is then one
                    BLAS GEMM per block of rows, done by NumPy in ``cpu.py``)
_max_pool_nhwc      max pooling with switches: flat index row*W+col into the input plane of each window's
                    first maximum in row-major window order (strict '>': torch's tie rule)
_unpool_nchw        switch unpooling, values *added* at the switches
_conv_t_batch       transposed convolution of a batch, as a scatter that skips zero inputs
_backproject_pairs  the whole back-projection of a set of (image, class) signals: for every pair, the head's
                    kernel c transposes z_L[b, c], then the planned steps run (rectify, unpool, transposed
                    conv; unpool + rectify + transposed conv FUSED: each pooled value is scattered from its
                    switch straight into the transposed conv's output, so the mostly-zero unpooled plane is
                    never built nor convolved), and the result is written channel-reduced or whole
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

# the steps of the back-projection plan (one row of int64 fields each; see cpu._plan)
HEAD, CONV_T, CONV_T_POOLED, UNPOOL, RECTIFY, CONV_T_GATHER = 0, 1, 2, 3, 4, 5
(F_KIND, F_RECT, F_WOFF, F_O, F_I, F_KH, F_KW, F_SH, F_SW, F_PH, F_PW, F_IN_H, F_IN_W, F_OUT_H, F_OUT_W,
 F_SWOFF, F_SWCOUNT, F_UH, F_UW, F_SIZE, F_WOFF_GATHER) = range(21)
NFIELDS = 21
REDUCE_NONE, REDUCE_SUM, REDUCE_MAX, REDUCE_NORM = 0, 1, 2, 3


@njit(cache=True)
def _im2col_nhwc(x, r0, r1, kh, kw, sh, sw, ph, pw, oh, ow, cols):
    """cols[r - r0, (ky*kw + kx)*C + c] = x[b, oy*sh - ph + ky, ox*sw - pw + kx, c] (0 outside), for the
    output pixels r = (b*oh + oy)*ow + ox in [r0, r1)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    for r in range(r0, r1):  # serial: it alternates with BLAS GEMMs, and two thread pools spinning fight
        b = r // (oh * ow)
        oy = (r // ow) % oh
        ox = r % ow
        row = r - r0
        for ky in range(kh):
            iy = oy * sh - ph + ky
            for kx in range(kw):
                ix = ox * sw - pw + kx
                base = (ky * kw + kx) * C
                if iy < 0 or iy >= H or ix < 0 or ix >= W:
                    for c in range(C):
                        cols[row, base + c] = 0.0
                else:
                    for c in range(C):
                        cols[row, base + c] = x[b, iy, ix, c]


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


# 'contract' lets LLVM fuse multiply-adds (FMA): one rounding instead of two, never less accurate
_FM = {"contract"}


@njit(cache=True, fastmath=_FM)
def _scatter_group(nzv, nzo, lo, hi, uy, ux, wt2, O, kh, kw, sh, sw, ph, pw, I, dst2, H, W):
    """Scatter the non-zero inputs nzv[lo:hi] (channels nzo[lo:hi]), all at input pixel (uy, ux), through
    every tap: output row (uy*sh - ph + ky, ux*sw - pw + kx) += Σ_t v_t · weight row (ky, kx, o_t).
    Four inputs per pass over the output row: one load and store of it per four multiply-adds."""
    n_i = np.uint64(I)  # an unsigned index: Numba then adds no negative-index check and the loop vectorises
    for ky in range(kh):
        oy = uy * sh - ph + ky
        if oy < 0 or oy >= H:
            continue
        for kx in range(kw):
            ox = ux * sw - pw + kx
            if ox < 0 or ox >= W:
                continue
            dr = dst2[oy * W + ox]
            tap = (ky * kw + kx) * O
            t = lo
            while t + 3 < hi:
                va, vb, vc, vd = nzv[t], nzv[t + 1], nzv[t + 2], nzv[t + 3]
                wa, wb = wt2[tap + nzo[t]], wt2[tap + nzo[t + 1]]
                wc, wd = wt2[tap + nzo[t + 2]], wt2[tap + nzo[t + 3]]
                for i in range(n_i):
                    dr[i] += va * wa[i] + vb * wb[i] + vc * wc[i] + vd * wd[i]
                t += 4
            while t < hi:
                va = nzv[t]
                wa = wt2[tap + nzo[t]]
                for i in range(n_i):
                    dr[i] += va * wa[i]
                t += 1


@njit(cache=True, fastmath=_FM)
def _scatter_conv_t(src, h, w, O, rect, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W, nzv, nzo):
    """dst[(H, W, I)] = conv_transpose(src[(h, w, O)]) with wt[woff:] laid out (kh, kw, O, I).

    Scatter form: each non-zero input value v at (y, x, o) adds v * weight[o, :, ky, kx] to output pixel
    (y*sh - ph + ky, x*sw - pw + kx). After a ReLU about half the inputs are zero: each pixel's non-zero
    channels are gathered first (nzv, nzo) and only they are multiplied. ``rect`` rectifies on the fly."""
    wt2 = wt[woff:woff + kh * kw * O * I].reshape(kh * kw * O, I)
    dst2 = dst[:H * W * I].reshape(H * W, I)
    dst2[:, :] = 0.0
    for y in range(h):
        for x in range(w):
            sbase = (y * w + x) * O
            n = 0
            for o in range(O):
                v = src[sbase + o]
                if v == 0.0 or (rect and v < 0.0):
                    continue
                nzv[n] = v
                nzo[n] = o
                n += 1
            if n:
                _scatter_group(nzv, nzo, 0, n, y, x, wt2, O, kh, kw, sh, sw, ph, pw, I, dst2, H, W)


@njit(cache=True, fastmath=_FM)
def _scatter_unpool_conv_t(src, h, w, O, rect, sws, swoff, Wu, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W,
                           nzv, nzo, nzp):
    """Unpool + rectify + transposed conv in one pass: each pooled value v at (y, x, o) sits, in the
    unpooled plane (of width Wu), at its switch; the transposed conv scatters it from there, so the
    unpooled plane is never built. A window's non-zero channels are grouped by switch (at most one group
    per window position) and each group goes through the taps together. Exact when no two windows share
    a switch, or when ``rect`` is off (both steps are then linear); the planner materialises the unpooled
    plane for overlapping pools followed by a rectification."""
    wt2 = wt[woff:woff + kh * kw * O * I].reshape(kh * kw * O, I)
    dst2 = dst[:H * W * I].reshape(H * W, I)
    dst2[:, :] = 0.0
    for y in range(h):
        for x in range(w):
            sbase = (y * w + x) * O
            n = 0
            for o in range(O):
                v = src[sbase + o]
                if v == 0.0 or (rect and v < 0.0):
                    continue
                nzv[n] = v
                nzo[n] = o
                nzp[n] = sws[swoff + sbase + o]
                n += 1
            lo = 0
            while lo < n:  # partition: the entries at nzp[lo]'s switch move to lo .. hi-1
                pos = nzp[lo]
                hi = lo + 1
                for t in range(lo + 1, n):
                    if nzp[t] == pos:
                        nzv[hi], nzv[t] = nzv[t], nzv[hi]
                        nzo[hi], nzo[t] = nzo[t], nzo[hi]
                        nzp[hi], nzp[t] = nzp[t], nzp[hi]
                        hi += 1
                uy = pos // Wu
                _scatter_group(nzv, nzo, lo, hi, uy, pos - uy * Wu, wt2, O, kh, kw, sh, sw, ph, pw, I, dst2, H, W)
                lo = hi


@njit(cache=True, fastmath={"contract", "reassoc"})
def _gather_conv_t(src, h, w, O, rect, wt, woff, kh, kw, sh, sw, ph, pw, I, dst, H, W):
    """The same transposed conv in gather form, for few output channels (the first layer: 1–3 image
    channels), where a length-I scatter row cannot vectorise: each output value is a dot product over the
    O input channels, contiguous in src and in wt[woff:] laid out (I, kh, kw, O). 'reassoc' lets LLVM
    vectorise those sums."""
    wt2 = wt[woff:woff + I * kh * kw * O].reshape(I * kh * kw, O)
    src2 = src[:h * w * O].reshape(h * w, O)
    for oy in range(H):
        for ox in range(W):
            for i in range(I):
                acc = np.float32(0.0)
                for ky in range(kh):
                    ty = oy + ph - ky
                    if ty < 0 or ty % sh != 0 or ty // sh >= h:
                        continue
                    for kx in range(kw):
                        tx = ox + pw - kx
                        if tx < 0 or tx % sw != 0 or tx // sw >= w:
                            continue
                        sr = src2[(ty // sh) * w + tx // sw]
                        wr = wt2[(i * kh + ky) * kw + kx]
                        if rect:
                            for o in range(O):
                                acc += max(sr[o], np.float32(0.0)) * wr[o]
                        else:
                            for o in range(O):
                                acc += sr[o] * wr[o]
                dst[(oy * W + ox) * I + i] = acc


@njit(cache=True)
def _unpool_plane(src, h, w, C, rect, sws, swoff, Hu, Wu, dst):
    """dst[(Hu, Wu, C)] = unpool of src[(h, w, C)] (values rectified first when ``rect``)."""
    for j in range(Hu * Wu * C):
        dst[j] = 0.0
    for t in range(h * w):
        for c in range(C):
            v = src[t * C + c]
            if rect and v < 0.0:
                v = 0.0
            dst[sws[swoff + t * C + c] * C + c] += v


@njit(cache=True)
def _run_pair(steps, wt, sws, z, b, cls, buf0, buf1, nzv, nzo, nzp):
    """The back-projection of one (image b, class cls) signal; returns which buffer holds the result."""
    cur = 0
    for s in range(steps.shape[0]):
        st = steps[s]
        kind = st[F_KIND]
        src = buf0 if cur == 0 else buf1
        dst = buf1 if cur == 0 else buf0
        if kind == HEAD:
            # G_L^c z_L: z_L[b, c] as a one-channel plane through kernel c of the head
            kk = st[F_KH] * st[F_KW] * st[F_I]
            _scatter_conv_t(z[b * st[F_O] + cls], st[F_IN_H], st[F_IN_W], 1, False, wt, st[F_WOFF] + cls * kk,
                            st[F_KH], st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I],
                            buf0, st[F_OUT_H], st[F_OUT_W], nzv, nzo)
            cur = 0
            continue
        if kind == RECTIFY:
            for j in range(st[F_SIZE]):
                if src[j] < 0.0:
                    src[j] = 0.0
            continue
        if kind == CONV_T:
            _scatter_conv_t(src, st[F_IN_H], st[F_IN_W], st[F_O], st[F_RECT] != 0, wt, st[F_WOFF],
                            st[F_KH], st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I],
                            dst, st[F_OUT_H], st[F_OUT_W], nzv, nzo)
        elif kind == CONV_T_GATHER:
            _gather_conv_t(src, st[F_IN_H], st[F_IN_W], st[F_O], st[F_RECT] != 0, wt, st[F_WOFF_GATHER],
                           st[F_KH], st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I],
                           dst, st[F_OUT_H], st[F_OUT_W])
        elif kind == CONV_T_POOLED:
            _scatter_unpool_conv_t(src, st[F_IN_H], st[F_IN_W], st[F_O], st[F_RECT] != 0, sws,
                                   st[F_SWOFF] + b * st[F_SWCOUNT], st[F_UW], wt, st[F_WOFF], st[F_KH],
                                   st[F_KW], st[F_SH], st[F_SW], st[F_PH], st[F_PW], st[F_I], dst,
                                   st[F_OUT_H], st[F_OUT_W], nzv, nzo, nzp)
        else:  # UNPOOL
            _unpool_plane(src, st[F_IN_H], st[F_IN_W], st[F_O], st[F_RECT] != 0, sws,
                          st[F_SWOFF] + b * st[F_SWCOUNT], st[F_UH], st[F_UW], dst)
        cur = 1 - cur
    return cur


@njit(cache=True)
def _write_result(res, H, W, C, reduce, out, p):
    """R (H, W, C) channel-last → out[p] as (C, H, W) (reduce NONE) or reduced over C to (H, W)."""
    n = H * W
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
def _backproject_pairs(steps, wt, sws, z, pairs, H, W, C, reduce, scratch, nzf, nzi, out):
    """out[p] = R(x_b | c) (reduced over channels unless reduce == REDUCE_NONE) for each pair p = (b, c).

    z is z_L as (B*N, h*w); the HEAD step's F_O field holds N. A plan without a HEAD step starts from
    whatever the caller put in scratch[w, 0] (then worker w must handle exactly pair w)."""
    nworkers = scratch.shape[0]
    P = pairs.shape[0]
    for wk in prange(nworkers):
        buf0 = scratch[wk, 0]
        buf1 = scratch[wk, 1]
        for p in range(wk, P, nworkers):
            cur = _run_pair(steps, wt, sws, z, pairs[p, 0], pairs[p, 1], buf0, buf1, nzf[wk], nzi[wk, 0],
                            nzi[wk, 1])
            _write_result(buf0 if cur == 0 else buf1, H, W, C, reduce, out, p)


@njit(cache=True, parallel=True)
def _merge_dominant(r, image, position, best, index):
    """Running Eqs. 4–5: for the chunk's maps r (P, n) in order, best[image[p]] = max, index = argmax
    (strict '>': among equal responses the earlier class keeps the pixel)."""
    P, n = r.shape
    for j in prange(n):
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
def _conv_t_batch(y, wt, kh, kw, sh, sw, ph, pw, I, out, nzf, nzi):
    """Transposed conv of a batch: y (N, h, w, O) channel-last, wt (kh, kw, O, I) flat, out (N, H, W, I);
    nzf (N, O) / nzi (N, O) are the non-zero lists of each image's task."""
    N, h, w, O = y.shape
    H, W = out.shape[1], out.shape[2]
    y2 = y.reshape(N, h * w * O)
    out2 = out.reshape(N, H * W * I)
    for n in prange(N):
        _scatter_conv_t(y2[n], h, w, O, False, wt, 0, kh, kw, sh, sw, ph, pw, I, out2[n], H, W, nzf[n], nzi[n])

