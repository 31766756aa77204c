"""The fused epilogue: channel reduction + dominant class (argmax over classes) + its response + HSV.

``epilogue`` reads the back-projected signals R (C, n, H, W) of a chunk (n = images x classes) once:
per pixel it reduces each class's C channels to r(x|c) (Eq. 3's pixel map, "sum", "max" or "norm"),
keeps the running maximum over the classes with the FIRST class winning ties (Eqs. 4-5), and writes only
the dominant class and response; the K maps r(x|c) are written only when asked for (``keep``). When the
classes of an image are split over several chunks, the running maximum is carried in best_r / best_i
(later chunks hold later classes, so a strict '>' still keeps the first on ties).

When V's normaliser is known before the pass (a fixed ``vmax``) the same kernel also converts to RGB
(Eq. 6) in float64, so nothing but the composite and D, C(x) leaves it. With a per-image normaliser (the
default: each image's max of D), the kernel folds each pixel's D into a per-image maximum with an atomic
max, and ``compose_rgb`` finishes in a second, small pass over (B, H, W).

Launch: grid ceil(bc*H*W / THREADS), one thread per pixel of an image of the chunk.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda

from ...reference import resolve_vmax
from . import device as dv

SUM, MAX, NORM = 0, 1, 2
REDUCE_CODES = {"sum": SUM, "max": MAX, "norm": NORM}


@cuda.jit(device=True)
def _hsv_pixel(rgb, b, y, x, hue, d, level):
    # colorsys.hsv_to_rgb with S = 1 and the reference's float64 arithmetic, then round half up
    v = 0.0
    if level > 0.0:
        dd = np.float64(d)
        if dd < 0.0:
            dd = 0.0
        if dd > level:
            dd = level
        v = dd / level
    h6 = hue * 6.0
    i = math.floor(h6)
    f = h6 - i
    p = v * 0.0
    q = v * (1.0 - f)
    t = v * (1.0 - (1.0 - f))
    sector = int(i) % 6
    if sector == 0:
        r, g, bl = v, t, p
    elif sector == 1:
        r, g, bl = q, v, p
    elif sector == 2:
        r, g, bl = p, v, t
    elif sector == 3:
        r, g, bl = p, q, v
    elif sector == 4:
        r, g, bl = t, p, v
    else:
        r, g, bl = v, p, q
    rgb[b, y, x, 0] = np.uint8(math.floor(min(max(r, 0.0), 1.0) * 255.0 + 0.5))
    rgb[b, y, x, 1] = np.uint8(math.floor(min(max(g, 0.0), 1.0) * 255.0 + 0.5))
    rgb[b, y, x, 2] = np.uint8(math.floor(min(max(bl, 0.0), 1.0) * 255.0 + 0.5))


@lru_cache(maxsize=None)
def epilogue(reduce: int, keep: bool, hsv: bool, track_level: bool):
    """Kernel over the pixels of a chunk's images. Arguments:
    R (C, n, H, W) float32 signals, pair t = (b - b0)*kc + (k - k0); responses (B, K, H, W) or a dummy;
    best_r (B, H, W) float32, best_i (B, H, W) int64; level_max (B,) float32 (atomic max of D, starts at 0);
    level (B,) float64 and palette (K,) float64 (used when ``hsv``); rgb (B, H, W, 3) uint8;
    b0, k0, kc ints; first, final, rect flags."""

    @cuda.jit
    def kernel(R, responses, best_r, best_i, level_max, level, palette, rgb, b0, k0, kc, first, final, rect):
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        C = R.shape[0]
        H = R.shape[2]
        W = R.shape[3]
        bc = R.shape[1] // kc
        if idx >= bc * H * W:
            return
        x = idx % W
        r_ = idx // W
        y = r_ % H
        bl = r_ // H
        b = b0 + bl
        zero = np.float32(0.0)
        if first:
            best = np.float32(-math.inf)
            arg = 0
        else:
            best = best_r[b, y, x]
            arg = best_i[b, y, x]
        for kl in range(kc):
            t = bl * kc + kl
            if reduce == MAX:
                acc = np.float32(-math.inf)
            else:
                acc = zero
            for c in range(C):
                val = R[c, t, y, x]
                if rect and val < zero:
                    val = zero
                if reduce == SUM:
                    acc += val
                elif reduce == MAX:
                    if val > acc:
                        acc = val
                else:
                    acc += val * val
            if reduce == NORM:
                acc = np.float32(math.sqrt(acc))
            if keep:
                responses[b, k0 + kl, y, x] = acc
            if acc > best:
                best = acc
                arg = k0 + kl
        best_r[b, y, x] = best
        best_i[b, y, x] = arg
        if final:
            if track_level:
                cuda.atomic.max(level_max, b, best)
            if hsv:
                _hsv_pixel(rgb, b, y, x, palette[arg], best, level[b])

    names = {SUM: "sum", MAX: "max", NORM: "norm"}
    kernel.__name__ = (f"epilogue_{names[reduce]}{'_keep' if keep else ''}{'_hsv' if hsv else ''}"
                       f"{'_level' if track_level else ''}")
    return kernel


@cuda.jit
def compose_rgb(best_i, best_r, level, palette, rgb):
    """rgb[b, y, x] = HSV(palette[best_i], 1, clip(best_r, 0, level[b]) / level[b]) as bytes; one thread
    per pixel of (B, H, W)."""
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    B = best_i.shape[0]
    H = best_i.shape[1]
    W = best_i.shape[2]
    if idx >= B * H * W:
        return
    x = idx % W
    r = idx // W
    y = r % H
    b = r // H
    _hsv_pixel(rgb, b, y, x, palette[best_i[b, y, x]], best_r[b, y, x], level[b])


def levels(vmax, best_r, level_max):
    """V's normaliser per image, float64 (B,), on the device (see reference.resolve_vmax): ``level_max`` (the
    epilogue's running maximum of D, from 0) for the default, its maximum for "batch", NumPy's percentile of
    ``best_r`` on the host for "pNN" (the reference's own code)."""
    B = best_r.shape[0]
    if vmax is None:
        return level_max.astype(np.float64)
    if isinstance(vmax, str) and vmax == "batch":
        return dv.xp.full(B, float(level_max.max()), dtype=np.float64)
    return dv.asdevice(resolve_vmax(dv.tohost(best_r), vmax), np.float64)


class Results:
    """The device buffers the epilogue fills for a (B, K) explanation of (H, W) images: the K maps (a dummy
    when not kept), the running max / argmax, the RGB composite and the normalising levels (``vmax`` fixed:
    its value; else filled from each image's maximum as the epilogue tracks it)."""

    def __init__(self, B, K, H, W, keep_responses, vmax, hues):
        xp = dv.xp
        self.responses = xp.empty((B, K, H, W), np.float32) if keep_responses else xp.empty((1, 1, 1, 1), np.float32)
        self.best_r = xp.empty((B, H, W), dtype=np.float32)
        self.best_i = xp.empty((B, H, W), dtype=np.int64)
        self.rgb = xp.empty((B, H, W, 3), dtype=np.uint8)
        self.level_max = xp.zeros(B, dtype=np.float32)
        self.fixed = vmax is not None and not isinstance(vmax, str)
        self.level = xp.full(B, float(vmax) if self.fixed else 0.0, dtype=np.float64)
        self.palette = dv.asdevice(hues, np.float64)

    @property
    def nbytes(self) -> int:
        return self.responses.nbytes + self.best_r.nbytes + self.best_i.nbytes + self.rgb.nbytes

    def merge(self, kernel, R, b0, bc, k0, kc, K, H, W, rect):
        """One chunk's maps R (images b0.., classes k0..) through the fused epilogue ``kernel``."""
        dv.launch(kernel, dv.ceil_div(bc * H * W, dv.THREADS), dv.THREADS, R, self.responses, self.best_r,
                  self.best_i, self.level_max, self.level, self.palette, self.rgb, b0, k0, kc, k0 == 0, k0 + kc == K,
                  rect)

    def finish(self, vmax, keep_responses, on_device):
        """The composite once every chunk is in (levels from the tracked maxima unless vmax is fixed), as a
        Clear, on the host when the trace was."""
        from ...reference import Clear

        if not self.fixed:
            self.level = levels(vmax, self.best_r, self.level_max)
            dv.launch(compose_rgb, dv.ceil_div(self.best_i.size, dv.THREADS), dv.THREADS, self.best_i, self.best_r,
                      self.level, self.palette, self.rgb)
        out = Clear(self.responses if keep_responses else None, self.best_i, self.best_r, self.rgb)
        return out if on_device else Clear(*(dv.tohost(a) for a in out))
