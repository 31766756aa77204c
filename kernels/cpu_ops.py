"""The CPU backend's single operators (the reference's names and signatures, float32) and the forward
kernels' host side: each checks its arguments as the reference does, lays the data out channel-last for the
Numba kernels of ``_cpu_kernels`` and back. :mod:`clearmaps.kernels.cpu` re-exports them and runs the
pipeline (forward pass, back-projection plan, fused composite) on the same pieces.
"""

from __future__ import annotations

import numba
import numpy as np

from clearmaps.reference import REDUCTIONS, ClearmapsError, Conv, MaxPool, resolve_vmax
from clearmaps.reference.colour import check_compose
from clearmaps.reference.errors import check_array, check_pair
from clearmaps.reference.ops import check_conv_transpose, check_unpool, transposed_size

from . import _cpu_kernels as K

_DENSE_BELOW = 8               # forward convs with fewer input channels use the dense kernel


def _out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def _conv_nhwc(a, layer: Conv, wmat, bias):
    """Conv of channel-last a (B, H, W, C) → (B, oh, ow, O), in Numba only (no BLAS: its thread pool and
    Numba's spin against each other on a small machine — mixing them cost the forward pass ~40% on the
    2-core EPYC).

    Fewer than _DENSE_BELOW input channels (the image): the register-blocked dense kernel; from there on
    the sparse gather, which skips the zeros a ReLU leaves (about half). Per layer on the 2-core EPYC
    (allcnn-mnist batch 64, vgg16-fcn 64×64) the dense kernel won only on the image layer (1.2 vs 3.9 ms)."""
    B, H, W, C = a.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    oh, ow = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    O = wmat.shape[1]
    out4 = np.empty((B, oh, ow, O), dtype=np.float32)
    if C < _DENSE_BELOW:
        K._conv_dense_nhwc(a, wmat.reshape(-1), bias, kh, kw, sh, sw, ph, pw, out4)
        return out4
    n = a.size
    T = max(1, min(numba.get_num_threads(), B * max(H, oh)))
    K._conv_sparse_nhwc(a, wmat.reshape(-1), kh, kw, sh, sw, ph, pw, out4, np.empty(n, np.float32),
                        np.empty(n, np.int64), np.empty(B * H * W, np.int64), np.empty(B * H * W, np.int64), T)
    out4 += bias
    return out4


def _pool_nhwc(a, layer: MaxPool):
    B, H, W, C = a.shape
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    oh, ow = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    out = np.empty((B, oh, ow, C), dtype=np.float32)
    switches = np.empty((B, oh, ow, C), dtype=np.int64)
    K._max_pool_nhwc(a, kh, kw, sh, sw, ph, pw, out, switches)
    return out, switches


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """Cross-correlation as torch's ``conv2d`` in float32: x (B, I, H, W), weight (O, I, kh, kw),
    bias (O,) or None → (B, O, oh, ow)."""
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in, kh, kw)")
    (sh, sw), (ph, pw) = check_pair(stride, "stride", 1), check_pair(padding, "padding", 0)
    if weight.shape[1] != x.shape[1]:
        raise ClearmapsError(f"x has {x.shape[1]} channels but weight {weight.shape} takes {weight.shape[1]}.")
    O, _, kh, kw = weight.shape
    H, W = x.shape[2:]
    if _out_size(H, kh, sh, ph) < 1 or _out_size(W, kw, sw, pw) < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the {kh}x{kw} kernel with padding {padding}.")
    b = np.zeros(O, np.float32) if bias is None else check_array(bias, "bias", 1)
    if b.shape != (O,):
        raise ClearmapsError(f"bias has shape {b.shape}; expected ({O},) to match weight {weight.shape}.")
    layer = Conv(weight, b, (sh, sw), (ph, pw))
    w = np.asarray(weight, dtype=np.float32)
    wmat = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, O))
    a = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)
    out = _conv_nhwc(a, layer, wmat, np.ascontiguousarray(b, dtype=np.float32))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def conv_transpose2d(y, weight, stride=1, padding=0, output_size=None):
    """The transpose of :func:`conv2d` with the same weight, stride and padding (the paper's G_l), float32:
    y (B, O, oh, ow), weight (O, I, kh, kw) → (B, I, H, W), (H, W) = ``output_size`` (default the smallest)."""
    y, weight, (sh, sw), (ph, pw), (H, W), _, _ = check_conv_transpose(y, weight, stride, padding, output_size)
    B, O, oh, ow = y.shape
    _, I, kh, kw = weight.shape
    out = np.empty((B, H, W, I), dtype=np.float32)
    work = oh * ow * O + 1
    K._conv_t_batch(np.ascontiguousarray(y.transpose(0, 2, 3, 1), dtype=np.float32),
                    np.ascontiguousarray(np.asarray(weight, np.float32).transpose(2, 3, 0, 1)).ravel(),
                    kh, kw, sh, sw, ph, pw, I, out, np.empty((B, 1, work), np.float32),
                    np.empty((B, 3, work), np.int32))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def max_pool_with_switches(x, kernel, stride=None, padding=0):
    """Max pooling (-inf padding) with switches, float32: (pooled (B, C, oh, ow), switches int64) — flat
    index row*W + col into the input plane of each window's first maximum in row-major order."""
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    kh, kw = check_pair(kernel, "kernel", 1)
    sh, sw = (kh, kw) if stride is None else check_pair(stride, "stride", 1)
    ph, pw = check_pair(padding, "padding", 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ClearmapsError(f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}.")
    H, W = x.shape[2:]
    if _out_size(H, kh, sh, ph) < 1 or _out_size(W, kw, sw, pw) < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the pool's {kh}x{kw} window.")
    a = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)
    out, sw_ = _pool_nhwc(a, MaxPool((kh, kw), (sh, sw), (ph, pw)))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), np.ascontiguousarray(sw_.transpose(0, 3, 1, 2))


def unpool(y, switches, input_size):
    """Switch unpooling (U_l), float32: a zero plane of ``input_size`` with each value of ``y`` added at its
    switch. y and switches (B, C, oh, ow) → (B, C, H, W)."""
    y, switches, (H, W) = check_unpool(y, switches, input_size)
    B, C = y.shape[:2]
    out = np.empty((B, C, H * W), dtype=np.float32)
    K._unpool_nchw(np.ascontiguousarray(y, dtype=np.float32).reshape(B, C, -1),
                   np.ascontiguousarray(switches, dtype=np.int64).reshape(B, C, -1), out)
    return out.reshape(B, C, H, W)


def unpool_conv_transpose2d(y, switches, input_size, weight, stride=1, padding=0, output_size=None,
                            rectify=True):
    """Fused ``conv_transpose2d(max(unpool(y, switches, input_size), 0), weight, ...)`` (no max when
    ``rectify`` is False), float32 (B, I, H, W).

    The unpooled plane (``input_size``, the conv's output size) is never built: its non-zero entries are
    listed straight from the pooled values and their switches, and the transposed conv reads that list. Exact when no two windows share a
    switch or without rectification; when windows do share switches the sums must precede the ReLU, so
    the plane is then built first.
    """
    y, switches, (Hu, Wu) = check_unpool(y, switches, input_size)
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in, kh, kw)")
    (sh, sw), (ph, pw) = check_pair(stride, "stride", 1), check_pair(padding, "padding", 0)
    B, O, h, w = y.shape
    if weight.shape[0] != O:
        raise ClearmapsError(f"y has {O} channels but weight {weight.shape} has {weight.shape[0]} kernels.")
    _, I, kh, kw = weight.shape
    H, W = transposed_size(output_size, (Hu, Wu), (kh, kw), (sh, sw), (ph, pw))
    shared = bool(rectify) and switches.size and any(
        np.unique(s).size != s.size for s in np.asarray(switches).reshape(B * O, -1))
    if shared:
        return conv_transpose2d(np.maximum(unpool(y, switches, (Hu, Wu)), 0), weight, (sh, sw), (ph, pw), (H, W))
    steps = np.zeros((1, K.NFIELDS), dtype=np.int64)
    f = steps[0]
    f[K.F_KIND], f[K.F_RECT], f[K.F_O], f[K.F_I] = K.CONV_T_POOLED, int(bool(rectify)), O, I
    f[K.F_KH], f[K.F_KW], f[K.F_SH], f[K.F_SW], f[K.F_PH], f[K.F_PW] = kh, kw, sh, sw, ph, pw
    f[K.F_IN_H], f[K.F_IN_W], f[K.F_OUT_H], f[K.F_OUT_W] = h, w, H, W
    f[K.F_SWCOUNT], f[K.F_UH], f[K.F_UW] = h * w * O, Hu, Wu
    # each image is a "pair" with its own worker and scratch, whose plan is this one step starting from y
    plane = max(h * w * O, H * W * I, Hu * Wu * O)
    work = max(plane, Hu * Wu + 1)
    scratch = np.empty((B, 2, plane), dtype=np.float32)
    scratch[:, 0, :h * w * O] = np.asarray(y, np.float32).transpose(0, 2, 3, 1).reshape(B, -1)
    out = np.empty((B, I * H * W), dtype=np.float32)
    pairs = np.stack([np.arange(B, dtype=np.int64), np.zeros(B, dtype=np.int64)], axis=1)
    K._backproject_pairs(steps, np.ascontiguousarray(np.asarray(weight, np.float32).transpose(2, 3, 0, 1)).ravel(),
                         np.ascontiguousarray(np.asarray(switches).transpose(0, 2, 3, 1), dtype=np.int32).ravel(),
                         np.zeros(0, np.uint8), np.zeros((1, 1), np.float32), pairs, H, W, I, K.REDUCE_NONE, scratch,
                         np.empty((B, 1, work), np.float32), np.empty((B, 3, work), np.int32), out,
                         np.zeros((0, 1), np.float32))
    return out.reshape(B, I, H, W)


# ------------------------------------------------------------------------------------ dominant and colour
def reduce_channels(R, reduce: str = "sum") -> np.ndarray:
    """r(x|c): R (..., C, H, W) reduced over C by "sum" (default), "max" or "norm" (L2); float32."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    R = check_array(R, "R", shape_hint=" of shape (..., C, H, W)")
    if R.ndim < 3:
        raise ClearmapsError(f"R has shape {R.shape}; expected at least (C, H, W).")
    R = R.astype(np.float32, copy=False)
    if reduce == "sum":
        return R.sum(axis=-3)
    if reduce == "max":
        return R.max(axis=-3)
    return np.sqrt((R * R).sum(axis=-3))


def dominant(responses):
    """Eqs. 4–5: per pixel, the position k of the largest response (first on ties) and that response.
    responses (B, K, H, W) → (index int64 (B, H, W), response float32 (B, H, W))."""
    r = check_array(responses, "responses", 4, shape_hint=" of shape (B, K, H, W)")
    if r.shape[1] == 0:
        raise ClearmapsError("responses has no classes (K = 0); expected at least one map.")
    B, Kc, H, W = r.shape
    maps = np.ascontiguousarray(r, dtype=np.float32).reshape(B * Kc, H * W)
    best = np.empty((B, H * W), dtype=np.float32)
    index = np.empty((B, H * W), dtype=np.int64)
    K._merge_dominant(maps, np.repeat(np.arange(B, dtype=np.int64), Kc), np.tile(np.arange(Kc, dtype=np.int64), B),
                      best, index)
    return index.reshape(B, H, W), best.reshape(B, H, W)


def _compose(index, response, hues, vmax):
    B = response.shape[0]
    level = resolve_vmax(response, vmax)
    rgb = np.empty((B, response[0].size, 3), dtype=np.uint8)
    K._compose_rgb(np.ascontiguousarray(index, dtype=np.int64).reshape(B, -1),
                   np.ascontiguousarray(response, dtype=np.float64).reshape(B, -1),
                   np.ascontiguousarray(hues, dtype=np.float64), level.astype(np.float64), rgb)
    return rgb.reshape(*response.shape, 3)


def compose(class_index, response, palette=None, vmax=None, *, num_classes=None) -> np.ndarray:
    """The CLEAR map (Eq. 6): uint8 RGB (B, H, W, 3), byte for byte the reference's
    (:func:`clearmaps.reference.compose`; V is computed in float64 from the given D)."""
    index, d, hues = check_compose(class_index, response, palette, num_classes)
    return _compose(index, d, hues, vmax)


# ------------------------------------------------------------------------------------------------ the ops
