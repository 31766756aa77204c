"""The device primitives of the CUDA graph path (:mod:`clearmaps.kernels.cuda.graph`): the ``ops`` namespace
the reference's walk runs with on the GPU (:func:`device_ops`): convolutions (columns + one float32 GEMM for
groups 1, direct kernels for groups > 1), max pools with switches, unpooling, average and adaptive pools and
their transposes, erf, and each layer's constants and weights uploaded once per host array."""

from __future__ import annotations

import types
import weakref
from functools import cached_property, lru_cache, partial

import numpy as np

from ...reference import ClearmapsError
from ...reference import ops as ref_ops
from . import device as dv
from . import graph_kernels as gk
from . import memory
from .config import CudaConfig
from .device import THREADS, ceil_div, launch, xp


def _pair(v, default=None):
    if v is None:
        v = default
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(a) for a in v)


def _f32(a):
    """``a`` as a C-contiguous float32 device array a kernel may take (writeable under the simulator)."""
    return dv.asdevice(a, np.float32)


def _grid(pixels: int, channels: int):
    return (ceil_div(pixels, THREADS), ceil_div(max(channels, 1), gk.CHANNELS))


# ---- constants and weights on the device, made once per host array ---------------------------------------------

class _Cache:
    """{id(host array): device object}, each entry dropped when its host array is (layers own frozen arrays)."""

    def __init__(self):
        self._entries = {}

    def get(self, a, make):
        key = id(a)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is a:
            return hit[1]
        made = make(a)
        try:
            self._entries[key] = (weakref.ref(a, lambda _, k=key: self._entries.pop(k, None)), made)
        except TypeError:  # not weak-referenceable (a NumPy scalar): made each time, it is one number
            pass
        return made


_CONSTS = _Cache()
_WEIGHTS = _Cache()


def const(a, like=None):
    """A layer's constant (an Affine scale, a Linear weight, a bias...) as a float32 device array."""
    if a is None:
        return None
    if dv.on_device(a):
        return _f32(a)
    return _CONSTS.get(a, lambda h: dv.asdevice(np.ascontiguousarray(h, dtype=np.float32)))


class _Weight:
    """A conv weight (O, Ig, kh, kw) on the device, in the layouts the routes read, each made on first use."""

    def __init__(self, w):
        self._host = np.asarray(dv.tohost(w) if dv.on_device(w) else w, dtype=np.float32)
        self.shape = self._host.shape

    @cached_property
    def direct(self):  # (O, Ig, kh, kw): conv_direct, conv_transpose_direct
        return dv.asdevice(np.ascontiguousarray(self._host))

    @cached_property
    def matrix(self):  # (O, Ig*kh*kw): the forward GEMM
        return dv.asdevice(np.ascontiguousarray(self._host.reshape(self.shape[0], -1)))

    @cached_property
    def transposed(self):  # (Ig*kh*kw, O): the transposed conv's GEMM
        return dv.asdevice(np.ascontiguousarray(self._host.reshape(self.shape[0], -1).T))


def _weight(w) -> _Weight:
    if dv.on_device(w):
        return _Weight(w)
    return _WEIGHTS.get(w, _Weight)


# ---- the primitives ------------------------------------------------------------------------------------------

def conv2d(x, w, b, stride=1, padding=0, dilation=1, groups=1, *, config: CudaConfig, fast: bool = False):
    """reference.ops.conv2d in float32 on the device: x (B, I, H, W), w (O, I / groups, kh, kw), b (O,) or
    None → (B, O, oh, ow)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    weight = _weight(w)
    O, Ig, kh, kw = weight.shape
    x = _f32(x)
    B, C, H, W = x.shape
    if C != Ig * groups or O % groups:
        raise ClearmapsError(f"conv2d: weight {weight.shape} with groups={groups} does not fit an input of "
                             f"{C} channels.")
    oh, ow = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"conv2d: input of size {H}x{W} is smaller than the {kh}x{kw} kernel.")
    bias = xp.zeros(O, dtype=np.float32) if b is None else const(b)
    if groups > 1:
        out = xp.empty((B, O, oh, ow), dtype=np.float32)
        launch(gk.conv_direct, _grid(B * oh * ow, O), THREADS, x, weight.direct, bias, out, int(groups),
               sh, sw, ph, pw, dh, dw)
        return out
    rows, ncols = C * kh * kw, B * oh * ow
    out = xp.empty((O, ncols), dtype=np.float32)
    block = memory.column_block(config, rows, ncols)
    work = xp.empty(rows * min(block, ncols), dtype=np.float32)
    for j0 in range(0, ncols, block):
        nb = min(block, ncols - j0)
        cols = work[:rows * nb].reshape(rows, nb)
        launch(gk.conv_columns, _grid(nb, C), THREADS, x, cols, j0, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
        dv.gemm_into(weight.matrix, cols, out, j0, fast)
    out = xp.ascontiguousarray(out.reshape(O, B, oh, ow).transpose(1, 0, 2, 3))
    out += bias[None, :, None, None]
    return out


def conv_transpose2d(y, w, stride=1, padding=0, output_size=None, dilation=1, groups=1, *, config: CudaConfig,
                     fast: bool = False):
    """reference.ops.conv_transpose2d in float32 on the device: y (N, O, oh, ow) → (N, Ig*groups, H, W),
    (H, W) = ``output_size`` (checked as the reference checks it; default the smallest)."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    weight = _weight(w)
    O, Ig, kh, kw = weight.shape
    y = _f32(y)
    N, Oy, oh, ow = y.shape
    if Oy != O or O % groups:
        raise ClearmapsError(f"conv_transpose2d: y has {Oy} channels; weight {weight.shape} with groups={groups} "
                             f"has {O} kernels.")
    H, W = ref_ops.transposed_size(output_size, (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    I = Ig * groups
    out = xp.empty((N, I, H, W), dtype=np.float32)
    if groups > 1:
        launch(gk.conv_transpose_direct, _grid(N * H * W, I), THREADS, y, weight.direct, out, int(groups),
               sh, sw, ph, pw, dh, dw)
        return out
    # signals in blocks whose columns fit the workspace: G (Ig*kh*kw, m*oh*ow) = W^T @ y(m signals), then
    # each pixel gathers its taps' columns
    rows = Ig * kh * kw
    block = max(1, min(N, memory.column_bytes(config) // max(4 * rows * oh * ow, 1)))
    for n0 in range(0, N, block):
        m = min(block, N - n0)
        signal = xp.ascontiguousarray(y[n0:n0 + m].transpose(1, 0, 2, 3)).reshape(O, m * oh * ow)
        cols = xp.empty((rows, m * oh * ow), dtype=np.float32)
        dv.gemm_into(weight.transposed, signal, cols, 0, fast)
        launch(gk.columns_to_image, _grid(m * H * W, I), THREADS, cols, out, n0, oh, ow, kh, kw, sh, sw, ph, pw,
               dh, dw)
    return out


def max_pool_with_switches(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """reference.ops.max_pool_with_switches in float32 on the device: (pooled, int64 switches), (B, C, oh, ow)."""
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel), _pair(padding), _pair(dilation)
    sh, sw = _pair(stride, (kh, kw))
    x = _f32(x)
    B, C, H, W = x.shape
    oh = ref_ops._pool_size(H, kh, sh, ph, dh, ceil_mode, "pool")
    ow = ref_ops._pool_size(W, kw, sw, pw, dw, ceil_mode, "pool")
    out = xp.empty((B, C, oh, ow), dtype=np.float32)
    switches = xp.empty((B, C, oh, ow), dtype=np.int64)
    launch(gk.max_pool_switches, _grid(B * oh * ow, C), THREADS, x, out, switches, kh, kw, sh, sw, ph, pw, dh, dw)
    return out, switches


def unpool(y, switches, input_size):
    """reference.ops.unpool in float32 on the device. The switches must index the (H, W) plane (the graph path
    checks a trace's switches once, when it reads the trace)."""
    y = _f32(y)
    switches = dv.asdevice(switches, np.int64)
    if tuple(switches.shape) != tuple(y.shape):
        raise ClearmapsError(f"unpool: switches have shape {tuple(switches.shape)} but y has {tuple(y.shape)}.")
    H, W = _pair(input_size)
    N, C = y.shape[:2]
    out = xp.zeros((N, C, H * W), dtype=np.float32)
    launch(gk.unpool_planes, ceil_div(N * C, THREADS), THREADS, y, switches, out)
    return out.reshape(N, C, H, W)


class _Windows:
    """An average pool's windows along both axes, on the device: rows rs..re-1 and columns cs..ce-1 of each
    output cell, its divisor div (oh, ow), and for each input row (column) the first and last window that
    may hold it."""

    def __init__(self, size, rows, cols, div):
        (rs, re), (cs, ce) = rows, cols
        H, W = size
        self.shape = (len(rs), len(cs))
        self.rs, self.re, self.cs, self.ce = (dv.asdevice(np.asarray(a, dtype=np.int64)) for a in (rs, re, cs, ce))
        self.div = dv.asdevice(np.ascontiguousarray(div, dtype=np.float32))
        self.first_row, self.last_row = (dv.asdevice(a) for a in _holders(rs, re, H))
        self.first_col, self.last_col = (dv.asdevice(a) for a in _holders(cs, ce, W))


def _holders(start, end, n):
    """For each index 0 .. n-1: the first and last window (start[u] <= index < end[u]) that holds it; an index
    that no window holds gets (0, -1), an empty range."""
    index = np.arange(n)[:, None]
    holds = (np.asarray(start)[None, :] <= index) & (index < np.asarray(end)[None, :])
    any_ = holds.any(axis=1)
    first = np.where(any_, holds.argmax(axis=1), 0)
    last = np.where(any_, holds.shape[1] - 1 - holds[:, ::-1].argmax(axis=1), -1)
    return first.astype(np.int64), last.astype(np.int64)


@lru_cache(maxsize=256)
def _avg_windows(size, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> _Windows:
    (kh, kw), (ph, pw) = kernel, padding
    sh, sw = stride
    rs, re, rn = ref_ops._avg_windows(size[0], kh, sh, ph, ceil_mode, count_include_pad)
    cs, ce, cn = ref_ops._avg_windows(size[1], kw, sw, pw, ceil_mode, count_include_pad)
    div = np.full((len(rs), len(cs)), divisor_override) if divisor_override else np.outer(rn, cn)
    return _Windows(size, (rs, re), (cs, ce), div)


@lru_cache(maxsize=256)
def _adaptive_windows(size, out) -> _Windows:
    (rs, re), (cs, ce) = ref_ops._adaptive_windows(size[0], out[0]), ref_ops._adaptive_windows(size[1], out[1])
    return _Windows(size, (rs, re), (cs, ce), np.outer(re - rs, ce - cs))


def _window_mean(x, win: _Windows):
    x = _f32(x)
    N, C = x.shape[:2]
    oh, ow = win.shape
    out = xp.empty((N, C, oh, ow), dtype=np.float32)
    launch(gk.window_mean, _grid(N * oh * ow, C), THREADS, x, out, win.rs, win.re, win.cs, win.ce, win.div)
    return out


def _window_mean_transpose(y, size, win: _Windows):
    y = _f32(y)
    N, C = y.shape[:2]
    if tuple(y.shape[2:]) != win.shape:
        raise ClearmapsError(f"an average pool of a {size[0]}x{size[1]} input gives {win.shape}; y has size "
                             f"{tuple(y.shape[2:])}.")
    H, W = size
    out = xp.empty((N, C, H, W), dtype=np.float32)
    launch(gk.window_mean_transpose, _grid(N * H * W, C), THREADS, y, out, win.rs, win.re, win.cs, win.ce, win.div,
           win.first_row, win.last_row, win.first_col, win.last_col)
    return out


def _avg_key(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel = _pair(kernel)
    return (kernel, _pair(stride, kernel), _pair(padding), bool(ceil_mode), bool(count_include_pad),
            divisor_override or None)


def avg_pool2d(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """reference.ops.avg_pool2d in float32 on the device."""
    size = tuple(int(n) for n in x.shape[2:])
    return _window_mean(x, _avg_windows(size, *_avg_key(kernel, stride, padding, ceil_mode, count_include_pad,
                                                        divisor_override)))


def avg_pool2d_transpose(y, input_size, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                         divisor_override=None):
    """reference.ops.avg_pool2d_transpose in float32 on the device."""
    size = _pair(input_size)
    return _window_mean_transpose(y, size, _avg_windows(size, *_avg_key(kernel, stride, padding, ceil_mode,
                                                                       count_include_pad, divisor_override)))


def adaptive_avg_pool2d(x, output_size):
    """reference.ops.adaptive_avg_pool2d in float32 on the device."""
    return _window_mean(x, _adaptive_windows(tuple(int(n) for n in x.shape[2:]), _pair(output_size)))


def adaptive_avg_pool2d_transpose(y, input_size):
    """reference.ops.adaptive_avg_pool2d_transpose in float32 on the device."""
    size = _pair(input_size)
    return _window_mean_transpose(y, size, _adaptive_windows(size, tuple(int(n) for n in y.shape[2:])))


def erf(x):
    """math.erf of each element, float32 on the device (the exact GELU)."""
    a = _f32(x)
    out = xp.empty_like(a)
    launch(gk.erf_flat, ceil_div(a.size, THREADS), THREADS, a.reshape(-1), out.reshape(-1))
    return out


def device_ops(config: CudaConfig | None = None, fast: bool = False) -> types.SimpleNamespace:
    """The ``ops`` namespace of :mod:`clearmaps.reference.graph` on the device, for ``config`` (None: the
    default) and its GEMMs' precision ``fast``."""
    from .config import resolve

    config, fast = resolve(config, fast)
    return types.SimpleNamespace(
        xp=xp, erf=erf, const=const, conv2d=partial(conv2d, config=config, fast=fast),
        conv_transpose2d=partial(conv_transpose2d, config=config, fast=fast),
        max_pool_with_switches=max_pool_with_switches, unpool=unpool, avg_pool2d=avg_pool2d,
        avg_pool2d_transpose=avg_pool2d_transpose, adaptive_avg_pool2d=adaptive_avg_pool2d,
        adaptive_avg_pool2d_transpose=adaptive_avg_pool2d_transpose)
