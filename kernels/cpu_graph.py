"""The CPU backend on any graph (networks that are not the paper's chain): the reference's walk
(:mod:`clearmaps.reference.graph`, the same definition step for step) with float32 Numba primitives.

Convolutions without groups or dilation run on the chain kernels of :mod:`clearmaps.kernels.cpu` (the
sparse gathers that skip the zeros a ReLU or a rectification leaves); grouped, depthwise and dilated ones,
pools with dilation or ``ceil_mode``, average and adaptive pools on the kernels of ``_cpu_graph_kernels``;
the rest (additions, slices, affine maps, activations) are NumPy float32 operations. With
``keep_responses=False`` the classes run in chunks feeding a running argmax, so the (B, K, H, W) maps are
never all held.
"""

from __future__ import annotations

import types
import weakref

import numpy as np

from clearmaps.reference import ops as ref_ops
from clearmaps.reference import (REDUCTIONS, Clear, ClearmapsError, MaxPool, Network, Trace, check_classes,
                                 check_input, check_method, check_palette, resolve_vmax, softmax)
from clearmaps.reference import graph
from clearmaps.reference.clear import check_trace, image_of, needs_saved

from . import _cpu_graph_kernels as G
from . import _cpu_kernels as K

_CHUNK_BYTES = 256 << 20  # keep_responses=False: the signals of one chunk of classes take at most this

_CAST: dict = {}


def _const(a, like):
    """A layer's constant array in float32, cast once per array (keyed by the frozen array's identity)."""
    if a is None:
        return None
    key = id(a)
    hit = _CAST.get(key)
    if hit is not None and hit[0]() is a:
        return hit[1]
    cast = np.ascontiguousarray(a, dtype=np.float32)
    try:
        _CAST[key] = (weakref.ref(a), cast)
    except TypeError:  # not weak-referenceable (a NumPy scalar): cast each time, it is one number
        pass
    return cast


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(a) for a in v)


class _Layouts:
    """A conv weight in the layouts the kernels read, made once per weight array: the forward gather's
    (kh·kw·I, O) matrix, the transposed gather's (kh, kw, O, I) block, and float32 for the direct kernels."""

    def __init__(self, w):
        w = np.asarray(w, dtype=np.float32)
        O = w.shape[0]
        self.f32 = np.ascontiguousarray(w)
        self.fwd = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, O))
        self.back = np.ascontiguousarray(w.transpose(2, 3, 0, 1)).ravel()


_LAYOUTS: dict = {}


def _layouts(w) -> _Layouts:
    key = id(w)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    made = _Layouts(w)
    _LAYOUTS[key] = (weakref.ref(w, lambda _, k=key: _LAYOUTS.pop(k, None)), made)
    return made


def _nhwc(x):
    """The channel-last memory of a (B, C, H, W) array: free when x is itself a channel-first view of
    channel-last memory (what this backend's convs return), one copy otherwise."""
    a = x.transpose(0, 2, 3, 1)
    return a if a.flags.c_contiguous and a.dtype == np.float32 else np.ascontiguousarray(a, dtype=np.float32)


def conv2d(x, w, b, stride, padding, dilation=1, groups=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    bias = np.zeros(w.shape[0], np.float32) if b is None else _const(b, x)
    if groups == 1 and (dh, dw) == (1, 1):
        # channel-last in and out, as the chain's sparse gather reads and writes it; returned as a
        # channel-first view, so the next conv reads it without a copy
        return _plain_conv(x, w, bias, sh, sw, ph, pw)
    B, _, H, W = x.shape
    O, _, kh, kw = w.shape
    oh, ow = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((B, O, oh, ow), dtype=np.float32)
    G._conv_direct(np.ascontiguousarray(x, dtype=np.float32), _layouts(w).f32, bias, sh, sw, ph, pw, dh, dw,
                   groups, out)
    return out


def _plain_conv(x, w, bias, sh, sw, ph, pw):
    from . import cpu

    a = _nhwc(x)
    B, H, W, C = a.shape
    O, _, kh, kw = w.shape
    oh, ow = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    out4 = np.empty((B, oh, ow, O), dtype=np.float32)
    wmat = _layouts(w).fwd.reshape(-1)
    if C < cpu._DENSE_BELOW:
        K._conv_dense_nhwc(a, wmat, bias, kh, kw, sh, sw, ph, pw, out4)
    else:
        n = a.size
        T = max(1, min(cpu.numba.get_num_threads(), B * max(H, oh)))
        K._conv_sparse_nhwc(a, wmat, kh, kw, sh, sw, ph, pw, out4, np.empty(n, np.float32), np.empty(n, np.int64),
                            np.empty(B * H * W, np.int64), np.empty(B * H * W, np.int64), T)
        out4 += bias
    return out4.transpose(0, 3, 1, 2)


def conv_transpose2d(y, w, stride, padding, output_size, dilation=1, groups=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    N, O = y.shape[:2]
    Ig, kh, kw = w.shape[1:]
    H, W = output_size
    if groups == 1 and (dh, dw) == (1, 1):
        out = np.empty((N, H, W, Ig), dtype=np.float32)
        work = y.shape[2] * y.shape[3] * O + 1
        K._conv_t_batch(_nhwc(y), _layouts(w).back, kh, kw, sh, sw, ph, pw, Ig, out,
                        np.empty((N, 1, work), np.float32), np.empty((N, 3, work), np.int32))
        return out.transpose(0, 3, 1, 2)
    out = np.empty((N, Ig * groups, H, W), dtype=np.float32)
    G._conv_t_direct(np.ascontiguousarray(y, dtype=np.float32), _layouts(w).f32, sh, sw, ph, pw, dh, dw, groups, out)
    return out


def max_pool_with_switches(x, kernel, stride, padding, dilation=(1, 1), ceil_mode=False):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    B, C, H, W = x.shape
    oh = ref_ops._pool_size(H, kh, sh, ph, dh, ceil_mode, "pool")
    ow = ref_ops._pool_size(W, kw, sw, pw, dw, ceil_mode, "pool")
    out = np.empty((B, C, oh, ow), dtype=np.float32)
    switches = np.empty((B, C, oh, ow), dtype=np.int64)
    G._max_pool_switches(np.ascontiguousarray(x, dtype=np.float32), kh, kw, sh, sw, ph, pw, dh, dw, out, switches)
    return out, switches


def unpool(y, switches, input_size):
    B, C = y.shape[:2]
    H, W = input_size
    out = np.empty((B, C, H * W), dtype=np.float32)
    K._unpool_nchw(np.ascontiguousarray(y, dtype=np.float32).reshape(B, C, -1),
                   np.ascontiguousarray(switches, dtype=np.int64).reshape(B, C, -1), out)
    return out.reshape(B, C, H, W)


def _avg_windows(size, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    rs, re, rn = ref_ops._avg_windows(size[0], kh, sh, ph, ceil_mode, count_include_pad)
    cs, ce, cn = ref_ops._avg_windows(size[1], kw, sw, pw, ceil_mode, count_include_pad)
    div = np.full((len(rs), len(cs)), divisor_override, np.float32) if divisor_override else \
        np.outer(rn, cn).astype(np.float32)
    return rs, re, cs, ce, div


def _window_mean(x, windows):
    rs, re, cs, ce, div = windows
    out = np.empty((*x.shape[:2], len(rs), len(cs)), dtype=np.float32)
    G._window_mean(np.ascontiguousarray(x, dtype=np.float32), rs, re, cs, ce, div, out)
    return out


def _window_mean_t(y, size, windows):
    rs, re, cs, ce, div = windows
    out = np.empty((*y.shape[:2], *size), dtype=np.float32)
    G._window_mean_t(np.ascontiguousarray(y, dtype=np.float32), rs, re, cs, ce, div, out)
    return out


def avg_pool2d(x, kernel, stride, padding, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return _window_mean(x, _avg_windows(x.shape[2:], kernel, stride, padding, ceil_mode, count_include_pad,
                                        divisor_override))


def avg_pool2d_transpose(y, size, kernel, stride, padding, ceil_mode=False, count_include_pad=True,
                         divisor_override=None):
    return _window_mean_t(y, size, _avg_windows(size, kernel, stride, padding, ceil_mode, count_include_pad,
                                                divisor_override))


def _adaptive_windows(size, out):
    (rs, re), (cs, ce) = ref_ops._adaptive_windows(size[0], out[0]), ref_ops._adaptive_windows(size[1], out[1])
    return rs, re, cs, ce, np.outer(re - rs, ce - cs).astype(np.float32)


def adaptive_avg_pool2d(x, output_size):
    return _window_mean(x, _adaptive_windows(x.shape[2:], output_size))


def adaptive_avg_pool2d_transpose(y, size):
    return _window_mean_t(y, size, _adaptive_windows(size, y.shape[2:]))


OPS = types.SimpleNamespace(
    xp=np, erf=G.erf, const=_const, conv2d=conv2d, conv_transpose2d=conv_transpose2d,
    max_pool_with_switches=max_pool_with_switches, unpool=unpool, avg_pool2d=avg_pool2d,
    avg_pool2d_transpose=avg_pool2d_transpose, adaptive_avg_pool2d=adaptive_avg_pool2d,
    adaptive_avg_pool2d_transpose=adaptive_avg_pool2d_transpose)


# ---- the backend's entry points for graphs --------------------------------------------------------------------

def forward(net: Network, x, method: str = "deconvnet") -> Trace:
    """:func:`clearmaps.reference.forward` in float32, keeping only what ``method`` needs on the way back
    (the deconvnet needs no ReLU signs)."""
    method, rule = check_method(method)
    x = np.ascontiguousarray(check_input(net, x), dtype=np.float32)
    z, saved, shapes, _ = graph.run_forward(net, x, OPS, needed=lambda layer: needs_saved(layer, rule))
    switches = {i: saved.pop(i) for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)}
    saved[-1] = x
    logits = z.mean(axis=(2, 3), dtype=np.float64)
    return Trace(tuple(net.layer_sizes(x.shape[2:])), switches, z, logits.astype(np.float32),
                 softmax(logits).astype(np.float32), tuple(shapes), saved)


def _prepare(net, trace, rule):
    check_trace(net, trace)
    shapes = trace.shapes if trace.shapes is not None else tuple(net.shapes(trace.sizes[0]))
    saved = {i: v for i, v in (trace.saved or {}).items() if i >= 0}
    saved.update(trace.switches)
    for i, layer in enumerate(net.layers):
        if i not in saved and needs_saved(layer, rule):
            raise ClearmapsError(f"trace lacks what node {i} ({layer!r}) needs on the way back; compute it with "
                                 "forward(net, x, method=...) for the method you ask.")
    saved = {i: (tuple(np.asarray(a) for a in v) if isinstance(v, tuple) else np.asarray(v))
             for i, v in saved.items()}
    return np.ascontiguousarray(np.asarray(trace.z), dtype=np.float32), saved, shapes


def _image(trace):
    return np.ascontiguousarray(np.asarray(image_of(trace)), dtype=np.float32)


def backproject_method(net: Network, trace: Trace, classes, method: str, rule: str) -> np.ndarray:
    z, saved, shapes = _prepare(net, trace, rule)
    classes = check_classes(classes, z.shape[0], net.num_classes)
    B, Kc = classes.shape
    R = graph.backward(net, z, saved, shapes, classes, rule, OPS, (net.in_channels, *trace.sizes[0]))
    R = np.ascontiguousarray(R, dtype=np.float32).reshape(B, Kc, *R.shape[1:])
    return R * _image(trace)[:, None] if method == "input_x_gradient" else R


def _reduce(R, reduce):
    if reduce == "sum":
        return R.sum(axis=-3, dtype=np.float32)
    if reduce == "max":
        return R.max(axis=-3)
    return np.sqrt((R * R).sum(axis=-3))


def clear_from_trace(net: Network, trace: Trace, classes, method: str, rule: str, reduce="sum", palette=None,
                     vmax=None, keep_responses=True, compose=None) -> Clear:
    """Responses (if kept), dominant class and response and the composite, for a graph network; the classes
    run in chunks whose signals fit _CHUNK_BYTES, each chunk's maps merged into a running argmax."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    z, saved, shapes = _prepare(net, trace, rule)
    B = z.shape[0]
    classes = check_classes(classes, B, net.num_classes)
    Kc = classes.shape[1]
    image = _image(trace) if method == "input_x_gradient" else None
    hues = check_palette(palette, Kc)
    resolve_vmax(np.zeros((1, 1, 1)), vmax)
    H, W = trace.sizes[0]
    biggest = max(int(np.prod(s)) for s in shapes) * 4 * B
    chunk = Kc if keep_responses else max(1, min(Kc, _CHUNK_BYTES // max(biggest * 2, 1)))
    best = np.empty((B, H * W), dtype=np.float32)
    index = np.empty((B, H * W), dtype=np.int64)
    kept = np.empty((B, Kc, H, W), dtype=np.float32) if keep_responses else None
    for k0 in range(0, Kc, chunk):
        k1 = min(Kc, k0 + chunk)
        part = classes[:, k0:k1]
        R = graph.backward(net, z, saved, shapes, part, rule, OPS, (net.in_channels, H, W))
        if image is not None:  # input×gradient: the gradient times the image, before the channel reduction
            R = (R.reshape(B, k1 - k0, *R.shape[1:]) * image[:, None]).reshape(R.shape)
        maps = np.ascontiguousarray(_reduce(R, reduce), dtype=np.float32).reshape(B * (k1 - k0), H * W)
        # position 0 (the first class) starts the running max; later ones replace it only when larger
        K._merge_dominant(maps, np.repeat(np.arange(B, dtype=np.int64), k1 - k0),
                          np.tile(np.arange(k0, k1, dtype=np.int64), B), best, index)
        if kept is not None:
            kept[:, k0:k1] = maps.reshape(B, k1 - k0, H, W)
    index, best = index.reshape(B, H, W), best.reshape(B, H, W)
    return Clear(kept, index, best, compose(index, best, hues, vmax))
