"""The reference's single operators on the GPU, NCHW in and out (the backend contract's op functions).

Each validates its input as the reference does, moves to the backend's channel-major layout, and runs the
same kernels the fused pipeline uses. Host (NumPy) arrays in give NumPy arrays out; GPU arrays give CuPy.
"""

from __future__ import annotations

import numpy as np

from ...reference import REDUCTIONS, ClearmapsError, Conv, MaxPool, check_palette, resolve_vmax
from ...reference.errors import check_array, check_pair
from . import backproject_kernels as bk
from . import device as dv
from . import epilogue as ek
from . import forward_kernels as fk
from .config import CudaConfig, resolve
from .convs import conv_forward, transpose_conv
from .device import THREADS, ceil_div, launch, xp
from .plans import ConvPlan, geometry
from .routing import Source
from .validation import checked


def _back(a, like_device: bool):
    return a if like_device else dv.tohost(a)


def _weights(weight, bias, stride, padding):
    w = dv.tohost(weight) if dv.on_device(weight) else weight
    w = check_array(w, "weight", 4, shape_hint=" of shape (out, in, kh, kw)")
    b = np.zeros(w.shape[0], dtype=np.float32) if bias is None else (dv.tohost(bias) if dv.on_device(bias) else bias)
    b = check_array(b, "bias", 1)
    layer = Conv(w.astype(np.float32), np.asarray(b, dtype=np.float32), check_pair(stride, "stride", 1),
                 check_pair(padding, "padding", 0))
    return layer, ConvPlan(layer)


def conv2d(x, weight, bias=None, stride=1, padding=0, *, fast=None, config: CudaConfig | None = None):
    """Cross-correlation as torch's ``conv2d`` (see :func:`clearmaps.reference.conv2d`), float32."""
    config, fast = resolve(config, fast)
    device = dv.on_device(x)
    x = checked(x, lambda a: check_array(a, "x", 4, shape_hint=" of shape (B, C, H, W)"))
    layer, plan = _weights(weight, bias, stride, padding)
    if layer.in_channels != x.shape[1]:
        raise ClearmapsError(f"x has {x.shape[1]} channels but weight {layer.weight.shape} takes {layer.in_channels}.")
    oh, ow = ((n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[2:], layer.kernel, layer.stride, layer.padding))
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"input of size {x.shape[2]}x{x.shape[3]} is smaller than the "
                             f"{layer.kernel[0]}x{layer.kernel[1]} kernel with padding {padding}.")
    a = xp.ascontiguousarray(x.astype(np.float32).transpose(1, 0, 2, 3))
    out = conv_forward(a, layer, plan, False, config, fast)
    return _back(xp.ascontiguousarray(out.transpose(1, 0, 2, 3)), device)


def conv_transpose2d(y, weight, stride=1, padding=0, output_size=None, *, fast=None,
                     config: CudaConfig | None = None):
    """The transpose of :func:`conv2d` (see :func:`clearmaps.reference.conv_transpose2d`), float32."""
    config, fast = resolve(config, fast)
    device = dv.on_device(y)
    y = checked(y, lambda a: check_array(a, "y", 4, shape_hint=" of shape (B, O, oh, ow)"))
    layer, plan = _weights(weight, None, stride, padding)
    B, O, oh, ow = y.shape
    if layer.out_channels != O:
        raise ClearmapsError(f"y has {O} channels but weight {layer.weight.shape} has {layer.out_channels} kernels.")
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
    if output_size is None:
        output_size = ((oh - 1) * sh - 2 * ph + kh, (ow - 1) * sw - 2 * pw + kw)
    H, W = check_pair(output_size, "output_size", 1)
    fits = ((H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)
    if fits != (oh, ow):
        raise ClearmapsError(f"output_size {(H, W)} does not fit: a conv with kernel {(kh, kw)}, stride "
                             f"{(sh, sw)}, padding {(ph, pw)} maps it to {fits}, not {(oh, ow)}.")
    src = Source(bk.DENSE, xp.ascontiguousarray(y.astype(np.float32).transpose(1, 0, 2, 3)), (oh, ow))
    out, _ = transpose_conv(src, layer, plan, (H, W), 0, 1, config, fast)
    return _back(xp.ascontiguousarray(out.transpose(1, 0, 2, 3)), device)


def max_pool_with_switches(x, kernel, stride=None, padding=0):
    """Max pooling that also returns the switches (see :func:`clearmaps.reference.max_pool_with_switches`)."""
    device = dv.on_device(x)
    x = checked(x, lambda a: check_array(a, "x", 4, shape_hint=" of shape (B, C, H, W)"))
    kh, kw = check_pair(kernel, "kernel", 1)
    ph, pw = check_pair(padding, "padding", 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ClearmapsError(f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}.")
    pool = MaxPool((kh, kw), None if stride is None else check_pair(stride, "stride", 1), (ph, pw))
    B, C, H, W = x.shape
    oh, ow = ((n + 2 * p - k) // s + 1 for n, k, s, p in zip((H, W), pool.kernel, pool.stride, pool.padding))
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the pool's {kh}x{kw} window.")
    a = xp.ascontiguousarray(x.astype(np.float32).transpose(1, 0, 2, 3))
    pooled = xp.empty((C, B, oh, ow), dtype=np.float32)
    switches = xp.empty((B, C, oh, ow), dtype=np.int64)
    index32, offsets = (xp.empty((B, C, oh, ow), dtype=np.int32) for _ in range(2))  # not returned
    launch(fk.max_pool(*geometry(pool)), ceil_div(pooled.size, THREADS), THREADS, a, pooled, switches,
           index32, offsets, 0, False)
    return _back(xp.ascontiguousarray(pooled.transpose(1, 0, 2, 3)), device), _back(switches, device)


def unpool(y, switches, input_size):
    """Switch unpooling (see :func:`clearmaps.reference.unpool`), float32."""
    device = dv.on_device(y)
    y = checked(y, lambda a: check_array(a, "y", 4, shape_hint=" of shape (B, C, oh, ow)"))
    switches = checked(switches, lambda a: check_array(a, "switches", 4, kinds="iu"))
    H, W = check_pair(input_size, "input_size", 1)
    if tuple(switches.shape) != tuple(y.shape):
        raise ClearmapsError(f"switches have shape {tuple(switches.shape)} but y has shape {tuple(y.shape)}; "
                             "they must match.")
    if switches.size:
        lo, hi = int(switches.min()), int(switches.max())
        if lo < 0 or hi >= H * W:
            raise ClearmapsError(f"switches range over [{lo}, {hi}], outside a {H}x{W} plane (0 .. {H * W - 1}).")
    B, C = y.shape[:2]
    out = xp.zeros((B, C, H * W), dtype=np.float32)
    launch(bk.scatter_unpool, ceil_div(y.size, THREADS), THREADS, xp.ascontiguousarray(y.astype(np.float32)),
           xp.ascontiguousarray(switches.astype(np.int64)), out)
    return _back(out.reshape(B, C, H, W), device)


def reduce_channels(R, reduce: str = "sum"):
    """r(x|c): R (..., C, H, W) reduced over C (see :func:`clearmaps.reference.reduce_channels`)."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    device = dv.on_device(R)
    R = checked(R, lambda a: check_array(a, "R", None, shape_hint=" of shape (..., C, H, W)"))
    if R.ndim < 3:
        raise ClearmapsError(f"R has shape {tuple(R.shape)}; expected (..., C, H, W) with at least 3 axes.")
    R = R.astype(np.float32, copy=False)
    if reduce == "sum":
        out = R.sum(axis=-3)
    elif reduce == "max":
        out = R.max(axis=-3)
    else:
        out = xp.sqrt((R * R).sum(axis=-3))
    return _back(out, device)


def dominant(responses):
    """Eqs. 4-5 with the epilogue kernel: (index into K int64, response), both (B, H, W)."""
    device = dv.on_device(responses)
    r = checked(responses,
                lambda a: check_array(a, "responses", 4, shape_hint=" of shape (B, K, H, W)"))
    B, K, H, W = r.shape
    if K == 0:
        raise ClearmapsError("responses has no classes (K = 0); expected at least one map.")
    R = xp.ascontiguousarray(r.astype(np.float32)).reshape(1, B * K, H, W)  # C = 1, signal t = b*K + k
    best_r = xp.empty((B, H, W), dtype=np.float32)
    best_i = xp.empty((B, H, W), dtype=np.int64)
    dummy = xp.empty((1, 1, 1, 1), dtype=np.float32)
    rgb = xp.empty((1, 1, 1, 3), dtype=np.uint8)
    launch(ek.epilogue(ek.SUM, False, False, False), ceil_div(B * H * W, THREADS), THREADS, R, dummy, best_r,
           best_i, xp.zeros(B, np.float32), xp.zeros(B, np.float64), xp.zeros(1, np.float64), rgb,
           0, 0, K, True, True, False)
    return _back(best_i, device), _back(best_r, device)


def compose(class_index, response, palette=None, vmax=None, *, num_classes=None):
    """The CLEAR map (Eq. 6) as uint8 RGB (B, H, W, 3) (see :func:`clearmaps.reference.compose`)."""
    device = dv.on_device(response)
    index = checked(class_index, lambda a: check_array(a, "class_index", 3, kinds="iu", finite=False,
                                                       shape_hint=" of shape (B, H, W)"))
    d = checked(response, lambda a: check_array(a, "response", 3, shape_hint=" of shape (B, H, W)"))
    if tuple(index.shape) != tuple(d.shape):
        raise ClearmapsError(f"class_index {tuple(index.shape)} and response {tuple(d.shape)} must have the same shape.")
    hues = check_palette(palette, num_classes)
    if index.size:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= hues.size:
            raise ClearmapsError(f"class_index holds {hi if hi >= hues.size else lo}; the palette has "
                                 f"{hues.size} entries (0 .. {hues.size - 1}).")
    B = d.shape[0]
    if vmax is None or (isinstance(vmax, str) and vmax == "batch"):
        resolve_vmax(np.zeros((1, 1, 1)), vmax)
        level = xp.maximum(d.reshape(B, -1).max(axis=1).astype(np.float64), 0.0) if d.size else xp.zeros(B)
        if vmax == "batch":
            level = xp.full(B, float(level.max()) if B else 0.0, dtype=np.float64)
    elif isinstance(vmax, str):
        level = dv.asdevice(resolve_vmax(dv.tohost(d), vmax), np.float64)
    else:
        level = dv.asdevice(resolve_vmax(np.zeros((B, 1, 1)), vmax), np.float64)
    rgb = xp.empty((*d.shape, 3), dtype=np.uint8)
    launch(ek.compose_rgb, ceil_div(d.size, THREADS), THREADS, xp.ascontiguousarray(index.astype(np.int64)),
           xp.ascontiguousarray(d), xp.ascontiguousarray(level), dv.asdevice(hues, np.float64), rgb)
    return _back(rgb, device)
