"""The CPU backend on any graph (networks that are not the paper's chain): the reference's walk
(:mod:`clearmaps.reference.graph`, the same definition step for step) with float32 Numba primitives.

Convolutions, forward and transposed (groups, depthwise, dilation), run on torch's oneDNN kernels, which
were 2–3x faster than the chain's sparse Numba gathers on the layer sizes graphs have (ResNet-50, MobileNetV2;
the fused chain keeps its own kernels, which win on the paper's small chains); max pools with switches
(dilation, ``ceil_mode``), unpooling, average and adaptive pools on the Numba kernels of ``_cpu_graph_kernels``;
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
from clearmaps.reference.clear import image_of, needs_saved, walk_inputs

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


_TORCH_WEIGHTS: dict = {}


def _torch_weight(w):
    """A layer's weight (or bias) as a float32 torch tensor, made once per array (keyed by the frozen array's
    identity, forgotten with it)."""
    import torch

    key = id(w)
    hit = _TORCH_WEIGHTS.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    _TORCH_WEIGHTS[key] = (weakref.ref(w, lambda _, k=key: _TORCH_WEIGHTS.pop(k, None)), t)
    return t


def _as_tensor(a):
    """A NumPy float32 batch as a torch tensor on the same memory: a channel-first view of channel-last memory
    (what these convs return) is torch's channels_last layout, which oneDNN reads as it is."""
    import torch

    t = torch.from_numpy(np.asarray(a, dtype=np.float32))
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    # any other strides (a slice, a broadcast sum of two layouts) would send torch to its slow generic conv
    return t.contiguous(memory_format=torch.channels_last)


def conv2d(x, w, b, stride, padding, dilation=1, groups=1):
    # convolutions run on torch's oneDNN kernels: on the graphs this path serves (ResNet-50's transposed
    # convs, 10 signals) they took 0.62 s where the chain's sparse Numba gathers took 1.8 s (bench/graphs.py)
    import torch.nn.functional as F

    y = F.conv2d(_as_tensor(x), _torch_weight(w), None if b is None else _torch_weight(b), _pair(stride),
                 _pair(padding), _pair(dilation), int(groups))
    return y.numpy()


def conv_transpose2d(y, w, stride, padding, output_size, dilation=1, groups=1):
    import torch.nn.functional as F

    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh, ow = y.shape[2:]
    kh, kw = w.shape[2:]
    # the output padding that makes the transpose land on the conv's input size (a strided conv maps several
    # input sizes to one output size)
    extra = (output_size[0] - ((oh - 1) * sh - 2 * ph + dh * (kh - 1) + 1),
             output_size[1] - ((ow - 1) * sw - 2 * pw + dw * (kw - 1) + 1))
    out = F.conv_transpose2d(_as_tensor(y), _torch_weight(w), None, (sh, sw), (ph, pw), extra, int(groups), (dh, dw))
    return out.numpy()


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
    saved, shapes = walk_inputs(net, trace, rule)
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
