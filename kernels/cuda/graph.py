"""The CUDA backend on any graph and for every response method: the reference's walk on the device.

Networks that are not the paper's chain, and every method other than the deconvnet (docs/design.md,
"Attentive responses and the response methods"), run :func:`clearmaps.reference.graph.run_forward` and
:func:`~clearmaps.reference.graph.backward` — the same definition, step for step — with a device ``ops``
namespace (:func:`clearmaps.kernels.cuda.graph_ops.device_ops`):

    xp                         the device array module (CuPy on a GPU, NumPy under the simulator): every
                               elementwise step, sum, concatenation, slice, reshape, pad, Linear matmul and
                               layer norm of reference/rules.py is an array-module operation
    conv2d, conv_transpose2d   groups 1: the columns (graph_kernels.conv_columns / columns_to_image) and one
                               float32 GEMM (device.gemm_into: cuBLAS, CUBLAS_COMPUTE_32F unless the
                               configuration asks for TF32), in blocks of CudaConfig.column_bytes; groups > 1
                               (depthwise included): graph_kernels.conv_direct / conv_transpose_direct
    max_pool_with_switches, unpool, avg_pool2d(_transpose), adaptive_avg_pool2d(_transpose), erf
                               numba.cuda kernels of graph_kernels.py
    const                      a layer's constant as a float32 device array, uploaded once per array

Images and signals are channel-first (N, C, H, W) float32 as in the reference. The forward pass keeps only
what the method needs on the way back (clearmaps.reference.clear.needs_saved), in chunks of images when the
batch does not fit; the back-projection runs (image, class) pairs in chunks that fit the memory budget
(memory.py), whatever ``keep_responses`` says, and each chunk's maps go through the chain path's fused
epilogue (channel reduction, running argmax with the first class winning ties, HSV). No step uses atomics:
a call's results do not depend on how its threads were scheduled.

Of a :class:`~clearmaps.kernels.cuda.CudaConfig` the graph path reads ``precision``, ``memory_limit``,
``column_bytes`` and ``profiler`` (coarse marks: per chunk of images or classes); the routing settings
(``sparse``, ``tile``, ``direct_max_channels``, ``variants``...) are the fused chain path's. Nothing here is
tuned yet: bench/GPU_NOTES.md says what a GPU run must check and time.
"""

from __future__ import annotations

import types

import numpy as np

from ...reference import (REDUCTIONS, Clear, ClearmapsError, Div, Mul, MaxPool, Network, check_classes, check_input,
                          check_method, check_palette, resolve_vmax)
from ...reference import graph as walk
from ...reference.clear import check_trace, needs_saved
from ...reference.network import IMAGE
from . import device as dv
from . import epilogue as ek
from .graph_ops import _f32, device_ops
from . import memory
from .config import CudaConfig
from .device import xp
from .validation import CudaTrace, check_flag, check_net, checked


# ---- memory estimates ----------------------------------------------------------------------------------------

def _floats(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def forward_bytes_per_image(net: Network, shapes, image) -> int:
    """Bytes one image may need in the forward pass: every node's output and what it keeps, at most (the
    columns of a GEMM are bounded apart, by CudaConfig.column_bytes)."""
    return 4 * 2 * (_floats(image) + sum(_floats(s) for s in shapes))


def backward_bytes_per_signal(net: Network, shapes, image) -> int:
    """Bytes one (image, class) signal may need on the way back: the walk's live signals (each node that still
    waits for its consumers' sum, traced over the graph) at their peak, plus the step's outputs twice over for
    its temporaries, plus R in the epilogue's layout."""
    size = [_floats(s) for s in shapes]
    of = (lambda j: _floats(image) if j == IMAGE else size[j])
    live = {len(shapes) - 1: size[-1]}
    peak = 0
    for i in range(len(shapes) - 1, -1, -1):
        s = live.pop(i, None)
        if s is None:
            continue
        made = sum(of(j) for j in net.inputs[i])
        peak = max(peak, sum(live.values()) + s + 2 * made)
        for j in net.inputs[i]:
            live.setdefault(j, of(j))
    return 4 * (peak + 2 * _floats(image))


# ---- the backend's entry points for graphs -------------------------------------------------------------------

def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(_concat([p[k] for p in parts]) for k in range(len(parts[0])))
    return xp.concatenate(parts, axis=0)


def _to_host(v):
    return tuple(dv.tohost(a) for a in v) if isinstance(v, tuple) else dv.tohost(v)


def forward(net: Network, x, method: str = "deconvnet", *, config: CudaConfig, fast: bool) -> CudaTrace:
    """:func:`clearmaps.reference.forward` in float32 on the device, keeping only what ``method`` needs on the
    way back (and the image). Host (NumPy) images give a trace of host arrays, GPU images one of CuPy arrays;
    the device copies stay in the trace's ``device`` for the back-projection."""
    check_net(net)
    method, rule = check_method(method)
    host_out = not dv.on_device(x)
    x = checked(x, lambda a: check_input(net, a)).astype(np.float32, copy=False)
    B = x.shape[0]
    size = tuple(int(n) for n in x.shape[2:])
    shapes = tuple(tuple(s) for s in net.shapes(size))
    ops = device_ops(config, fast)
    per_image = forward_bytes_per_image(net, shapes, x.shape[1:])
    bc = memory.forward_images(per_image, memory.budget(config) - memory.column_bytes(config), B, size)
    parts = []
    config.mark("graph forward start")
    for b0 in range(0, B, bc):
        z, saved, _, _ = walk.run_forward(net, x[b0:b0 + bc], ops, needed=lambda layer: needs_saved(layer, rule))
        parts.append((z, saved))
        config.mark(lambda: f"graph forward images {b0}..{min(B, b0 + bc) - 1}")
    z = _concat([p[0] for p in parts])
    saved = {i: _concat([p[1][i] for p in parts]) for i in parts[0][1]}
    switches = {i: saved.pop(i) for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)}
    saved[IMAGE] = x
    logits = z.mean(axis=(2, 3), dtype=np.float64)
    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    logits = logits.astype(np.float32)
    sizes = tuple(tuple(int(v) for v in s) for s in net.layer_sizes(size))
    device = {"z": z, "switches": switches, "saved": saved}
    if host_out:
        return CudaTrace(sizes, {i: dv.tohost(s) for i, s in switches.items()}, dv.tohost(z), dv.tohost(logits),
                         dv.tohost(probabilities), shapes, {i: _to_host(v) for i, v in saved.items()}, device=device)
    return CudaTrace(sizes, dict(switches), z, logits, probabilities, shapes, dict(saved), device=device)


class _Prepared(types.SimpleNamespace):
    """A trace checked against its network and on the device: z, saved {node: what its step back reads, the
    switches included}, shapes, image (C, H, W) and the images themselves (input×gradient) or None."""


def _device_value(v):
    if isinstance(v, tuple):
        return tuple(_device_value(a) for a in v)
    a = dv.asdevice(v)
    return _f32(a) if a.dtype.kind == "f" else a


def _prepare(net: Network, trace, rule: str, method: str) -> _Prepared:
    """Check ``trace`` (any backend's, or one made by hand) against ``net`` and bring what the walk reads to the
    device, refusing what would make a kernel read or write outside its arrays."""
    check_net(net)
    check_trace(net, trace)
    sizes = tuple(tuple(int(v) for v in s) for s in trace.sizes)
    try:
        shapes = tuple(tuple(s) for s in net.shapes(sizes[0]))
        expected = tuple(tuple(s) for s in net.layer_sizes(sizes[0]))
    except ClearmapsError:
        expected = shapes = None
    if expected != sizes or (trace.shapes is not None and tuple(tuple(s) for s in trace.shapes) != shapes):
        raise ClearmapsError(f"the trace's sizes {sizes} (or node shapes) are not this network's for an input of "
                             f"{sizes[0]}: pass the trace forward(net, x) made for this network.")
    image = (net.in_channels, *sizes[0])
    cached = getattr(trace, "device", None) or {}
    z = cached["z"] if "z" in cached else _f32(trace.z)
    B = z.shape[0]
    if tuple(z.shape) != (B, *shapes[-1]):
        raise ClearmapsError(f"trace.z has shape {tuple(z.shape)}; expected (B, {', '.join(map(str, shapes[-1]))}) "
                             "for this network.")
    ours = "saved" in cached  # made by this backend's forward: nothing in it needs checking
    source = cached["saved"] if ours else (trace.saved or {})
    in_shapes = net.input_shapes(sizes[0])
    saved = {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, MaxPool):
            s = cached["switches"][i] if "switches" in cached else dv.asdevice(trace.switches[i])
            want = (B, *shapes[i])
            if s.dtype.kind not in "iu" or tuple(s.shape) != want:
                raise ClearmapsError(f"trace.switches[{i}] has shape {tuple(s.shape)} and dtype {s.dtype}; expected "
                                     f"int64 {want}.")
            plane = in_shapes[i][0][1] * in_shapes[i][0][2]
            if "switches" not in cached and s.size and (int(s.min()) < 0 or int(s.max()) >= plane):
                raise ClearmapsError(f"trace.switches[{i}] ranges over [{int(s.min())}, {int(s.max())}], outside the "
                                     f"{in_shapes[i][0][1]}x{in_shapes[i][0][2]} plane it indexes (0 .. {plane - 1}).")
            saved[i] = dv.asdevice(s, np.int64)
        elif needs_saved(layer, rule):
            v = source.get(i)
            if v is None:
                raise ClearmapsError(f"trace lacks what node {i} ({layer!r}) needs on the way back; compute it with "
                                     "forward(net, x, method=...) for the method you ask.")
            v = _device_value(v)
            if not ours:
                got = [tuple(a.shape) for a in v] if isinstance(v, tuple) else [tuple(v.shape)]
                want = [(B, *s) for s in in_shapes[i]] if isinstance(layer, (Mul, Div)) else [(B, *in_shapes[i][0])]
                if got != want:
                    raise ClearmapsError(f"trace.saved[{i}] (for {layer!r}) has shape {got}; expected {want}.")
            saved[i] = v
    images = None
    if method == "input_x_gradient":
        v = source.get(IMAGE)
        if v is None:
            raise ClearmapsError("this trace does not hold its input image, which method='input_x_gradient' needs; "
                                 "compute it with forward(net, x) of this backend.")
        images = _f32(v)
        if tuple(images.shape) != (B, *image):
            raise ClearmapsError(f"trace.saved[-1] (the image) has shape {tuple(images.shape)}; expected "
                                 f"{(B, *image)}.")
    return _Prepared(z=z, saved=saved, shapes=shapes, image=image, images=images, sizes=sizes, B=B)


def _rows(v, b0, bc):
    return tuple(a[b0:b0 + bc] for a in v) if isinstance(v, tuple) else v[b0:b0 + bc]


def _responses(net, prep: _Prepared, classes, b0: int, rule: str, ops):
    """R(x|c) of images b0 .. b0 + bc - 1 for their (bc, kc) class ids ``classes`` (host): (bc*kc, C, H, W),
    image-major (times the image for input×gradient)."""
    bc, kc = classes.shape
    saved = {i: _rows(v, b0, bc) for i, v in prep.saved.items()}
    R = walk.backward(net, prep.z[b0:b0 + bc], saved, prep.shapes, np.ascontiguousarray(classes), rule, ops,
                      prep.image)
    if prep.images is not None:  # input×gradient: the gradient times the image, before the channel reduction
        R = (R.reshape(bc, kc, *prep.image) * prep.images[b0:b0 + bc, None]).reshape(bc * kc, *prep.image)
    return R


def _classes(classes, B, net):
    if dv.is_device_array(classes):
        classes = dv.tohost(classes)
    return np.ascontiguousarray(check_classes(classes, B, net.num_classes))


def backproject(net: Network, trace, classes, method: str, rule: str, *, config: CudaConfig, fast: bool):
    """R(x|c) for each chosen class, (B, K, C, H, W) float32 (host arrays when the trace holds host arrays)."""
    prep = _prepare(net, trace, rule, method)
    classes = _classes(classes, prep.B, net)
    B, K = classes.shape
    out = xp.empty((B, K, *prep.image), dtype=np.float32)
    per_signal = backward_bytes_per_signal(net, prep.shapes, prep.image)
    available = memory.budget(config) - memory.column_bytes(config) - out.nbytes
    ops = device_ops(config, fast)
    for b0, bc, k0, kc in memory.chunks(B, K, per_signal, available):
        R = _responses(net, prep, classes[b0:b0 + bc, k0:k0 + kc], b0, rule, ops)
        out[b0:b0 + bc, k0:k0 + kc] = R.reshape(bc, kc, *prep.image)
        config.mark(lambda: f"graph back images {b0}.. classes {k0}..")
    return out if dv.on_device(trace.z) else dv.tohost(out)


def clear_from_trace(net: Network, trace, classes, method: str, rule: str, reduce="sum", palette=None, vmax=None,
                     keep_responses=True, *, config: CudaConfig, fast: bool) -> Clear:
    """Responses (if kept), dominant class and response and the composite for any graph and method: the
    (image, class) pairs in chunks that fit the memory budget, each chunk's R through the fused epilogue."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    keep_responses = check_flag(keep_responses, "keep_responses")
    prep = _prepare(net, trace, rule, method)
    classes = _classes(classes, prep.B, net)
    B, K = classes.shape
    hues = check_palette(palette, K)
    resolve_vmax(np.zeros((1, 1, 1)), vmax)  # refuses a bad vmax before any work
    C, H, W = prep.image
    res = ek.Results(B, K, H, W, keep_responses, vmax, hues)
    per_signal = backward_bytes_per_signal(net, prep.shapes, prep.image)
    available = memory.budget(config) - memory.column_bytes(config) - res.nbytes
    kernel = ek.epilogue(ek.REDUCE_CODES[reduce], keep_responses, res.fixed, vmax is None or vmax == "batch")
    ops = device_ops(config, fast)
    config.mark("graph clear start")
    for b0, bc, k0, kc in memory.chunks(B, K, per_signal, available):
        R = _responses(net, prep, classes[b0:b0 + bc, k0:k0 + kc], b0, rule, ops)
        R = xp.ascontiguousarray(R.transpose(1, 0, 2, 3))  # (C, bc*kc, H, W): the epilogue's layout
        res.merge(kernel, R, b0, bc, k0, kc, K, H, W, False)
        config.mark(lambda: f"graph back + epilogue images {b0}.. classes {k0}..")
        del R
    return res.finish(vmax, keep_responses, dv.on_device(trace.z))

