"""The CUDA backend's pipeline: forward with switches, back-projection, the fused epilogue.

Data flow (all float32, channel-major (C, n, H, W) inside; routes in routing.py, executors in convs.py):

    forward         per conv: the sparse kernel where it pays (the transposed conv of its flipped kernels,
                    bias added, zeros skipped), else gathered columns (rectifying a pending ReLU as it reads)
                    + one cuBLAS GEMM with the bias in it; per max pool: one kernel writing pooled values, the
                    int64 switches and, for the back-projection, their int32 copy and window offsets.
    back-projection G_L^c z_L for every (image, class) pair at once (B*K signals) — or, for a 1×1 head over
                    ReLUs and a conv, that conv's transpose of it in one step (the folded head,
                    kernels/fold.py: two input channels instead of the conv's) — then per layer below:
                    ReLU → a flag (rectify as the next kernel reads), MaxPool → a flag (the next kernel
                    reads through the switches), Conv → a transposed conv on its route.
    epilogue        one pass per chunk: channel reduction, argmax over classes, max, and HSV when the
                    normaliser is known (see epilogue.py).

That is the paper's chain with the deconvnet. Every other network, and every other response method, takes the
graph path (graph.py): the reference's own walk with device primitives, through the same epilogue.

Work that does not fit in GPU memory is split (memory.py). Every function takes ``config`` (a
:class:`~clearmaps.kernels.cuda.CudaConfig`; None: the default) and ``fast`` (None: the configuration's
precision).
"""

from __future__ import annotations

import numpy as np

from ...reference import (REDUCTIONS, Clear, ClearmapsError, Conv, MaxPool, Network, ReLU, check_classes,
                          check_input, check_method, check_palette, resolve_vmax)
from . import backproject_kernels as bk
from . import graph
from . import device as dv
from . import epilogue as ek
from . import forward_kernels as fk
from . import memory
from .config import CudaConfig, resolve
from .convs import conv_forward, materialise, transpose_conv
from .device import THREADS, ceil_div, launch, xp
from .plans import geometry, network_plan
from .routing import Source
from .validation import CudaTrace, Switches, check_flag, check_net, checked, trace_on_device


def _fused(net: Network, method: str) -> bool:
    """Whether the fused chain kernels compute this: the paper's chain and its deconvnet (everything else takes
    the graph path, graph.py)."""
    return net.is_chain and method == "deconvnet"


def forward(net: Network, x, method: str = "deconvnet", *, fast=None, config: CudaConfig | None = None) -> CudaTrace:
    """Run ``net`` on ``x`` (B, C, H, W) on the GPU, recording the max pools' switches and what ``method``
    needs on the way back.

    Same contract as :func:`clearmaps.reference.forward`, in float32. ``x`` may be a NumPy array (the
    Trace then holds NumPy arrays) or a GPU array (CuPy, or anything with DLPack /
    ``__cuda_array_interface__``; the Trace then holds CuPy arrays). The paper's chain with the deconvnet
    runs on the fused kernels below; any other network or method on the graph path (graph.py)."""
    check_net(net)
    method, _ = check_method(method)
    config, fast = resolve(config, fast)
    if not _fused(net, method):
        return graph.forward(net, x, method, config=config, fast=fast)
    host_out = not dv.on_device(x)
    x = checked(x, lambda a: check_input(net, a)).astype(np.float32, copy=False)
    B = x.shape[0]
    sizes = tuple(tuple(s) for s in net.layer_sizes(x.shape[2:]))
    plan = network_plan(net)
    switches, sw32, channels = {}, {}, net.in_channels
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):
            channels = layer.out_channels
        elif isinstance(layer, MaxPool):
            shape = (B, channels, *sizes[i + 1])
            switches[i] = xp.empty(shape, dtype=np.int64)
            # what the back-projection reads, written by the same pass (no second pass over the switches)
            sw32[i] = Switches(xp.empty(shape, dtype=np.int32), xp.empty(shape, dtype=np.int32), geometry(layer))
    z = xp.empty((B, net.num_classes, *sizes[-1]), dtype=np.float32)
    available = (memory.budget(config) - memory.column_bytes(config) - z.nbytes
                 - 2 * sum(s.nbytes for s in switches.values()))
    bc = memory.forward_images(memory.forward_bytes_per_image(net, sizes), available, B, sizes[0])
    config.mark("forward start")
    for b0 in range(0, B, bc):
        a = xp.ascontiguousarray(x[b0:b0 + bc].transpose(1, 0, 2, 3))
        rect = False  # a ReLU waiting to be applied by whoever reads `a` next
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU):
                rect = True
            elif isinstance(layer, MaxPool):
                C, Bc = a.shape[:2]
                pooled = xp.empty((C, Bc, *sizes[i + 1]), dtype=np.float32)
                launch(fk.max_pool(*geometry(layer)), ceil_div(pooled.size, THREADS), THREADS,
                       a, pooled, switches[i], sw32[i].index, sw32[i].offsets, b0, rect)
                a, rect = pooled, False
            else:
                a, rect = conv_forward(a, layer, plan[i], rect, config, fast), False
            config.mark(lambda: f"forward {i} {type(layer).__name__}")
        if rect:
            a = xp.maximum(a, np.float32(0))
        z[b0:b0 + bc] = a.transpose(1, 0, 2, 3)
    logits = z.mean(axis=(2, 3))
    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = e / e.sum(axis=1, keepdims=True)
    device = {"z": z, "switches": switches, "switches32": sw32}
    if host_out:
        return CudaTrace(sizes, {i: dv.tohost(s) for i, s in switches.items()}, dv.tohost(z),
                         dv.tohost(logits), dv.tohost(probabilities), device=device)
    return CudaTrace(sizes, dict(switches), z, logits, probabilities, device=device)


def _backproject_chunk(net, plan, sizes, z, classes, switches, b0, bc, k0, kc, rectify, config, fast):
    """R(x|c) of images b0 .. b0+bc-1 and class positions k0 .. k0+kc-1: (C, bc*kc, H, W) and whether a
    rectification is still pending on it."""
    head_i = net.head_index
    n = bc * kc
    B, N, h, w = z.shape
    if plan["fold"] is not None:  # the head, its ReLUs and conv j as one two-channel step (kernels/fold.py)
        top, weight = plan["fold"][0], plan["fold"][1 if rectify else 2]
        layer, folded = net.layers[top], True
    else:
        top, weight, layer, folded = head_i, plan[head_i].weight, net.head, False
    H, W = sizes[top]
    I = layer.in_channels
    signal = xp.empty((I, n, H, W), dtype=np.float32)
    launch(bk.head_signal(*geometry(layer), folded), ceil_div(n * H * W, THREADS), THREADS,
           z.reshape(-1), classes.reshape(-1), weight.reshape(-1), signal.reshape(-1),
           N, classes.shape[1], h, w, I, n, H, W, b0, k0, kc)
    src = Source(bk.DENSE, signal, (H, W))
    config.mark(lambda: f"back {head_i} head" + (f" folded into {top}" if folded else ""))
    for i in range(top - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ReLU):
            if rectify:
                src = src.rectified()
        elif isinstance(layer, MaxPool):
            if src.kind != bk.DENSE:  # two pools in a row: the upper one's plane must exist
                src = Source(bk.DENSE, materialise(src, b0, kc), src.plane)
            pool = geometry(layer)
            src = Source(bk.source_kind(pool), src.array, tuple(sizes[i]), pre=src.pre, switches=switches[i], pool=pool)
        else:
            pooled = src.kind != bk.DENSE
            out, how = transpose_conv(src, layer, plan[i], sizes[i], b0, kc, config, fast)
            src = Source(bk.DENSE, out, tuple(sizes[i]))
            config.mark(lambda: f"back {i} Conv {how}" + (" from switches" if pooled else ""))
    if src.kind != bk.DENSE:
        return materialise(src, b0, kc), False
    return src.array, src.pre


def _prepare(net, trace, classes):
    check_net(net)
    z, switches, sizes = trace_on_device(net, trace)
    if dv.is_device_array(classes):
        classes = dv.tohost(classes)
    classes = np.ascontiguousarray(check_classes(classes, z.shape[0], net.num_classes))
    return z, switches, sizes, classes


def backproject(net: Network, trace, classes=None, rectify: bool = True, method: str = "deconvnet", *, fast=None,
                config: CudaConfig | None = None):
    """R(x|c) for each chosen class, (B, K, C, H, W) float32: :func:`clearmaps.reference.backproject`
    on the GPU (host arrays out when the trace holds host arrays), for any ``method``."""
    rectify = check_flag(rectify, "rectify")
    method, rule = check_method(method, rectify)
    config, fast = resolve(config, fast)
    check_net(net)
    if not _fused(net, method):
        return graph.backproject(net, trace, classes, method, rule, config=config, fast=fast)
    z, switches, sizes, classes = _prepare(net, trace, classes)
    B, K = classes.shape
    C, (H, W) = net.in_channels, sizes[0]
    out = xp.empty((B, K, C, H, W), dtype=np.float32)
    per_signal = memory.backward_bytes_per_signal(net, sizes) + 4 * C * H * W
    available = memory.budget(config) - memory.column_bytes(config) - out.nbytes
    classes_dev = dv.asdevice(classes)
    plan = network_plan(net)
    for b0, bc, k0, kc in memory.chunks(B, K, per_signal, available):
        R, rect = _backproject_chunk(net, plan, sizes, z, classes_dev, switches, b0, bc, k0, kc, rectify, config,
                                     fast)
        if rect:
            R = xp.maximum(R, np.float32(0))
        out[b0:b0 + bc, k0:k0 + kc] = R.reshape(C, bc, kc, H, W).transpose(1, 2, 0, 3, 4)
    return dv.tohost(out) if not dv.on_device(trace.z) else out


def clear_from_trace(net: Network, trace, classes, rectify=True, reduce="sum", palette=None, vmax=None,
                     keep_responses=True, method: str = "deconvnet", *, fast=None,
                     config: CudaConfig | None = None) -> Clear:
    """Responses, dominant class and response, and the RGB composite, from a forward trace.

    Same contract as :func:`clearmaps.reference.clear_from_trace`. All (image, class) pairs go through
    as one batch unless they do not fit in GPU memory; with ``keep_responses=False`` the (B, K, H, W) maps
    are never stored. Arrays come back on the GPU (CuPy) when the trace holds GPU arrays, else as NumPy.
    """
    rectify = check_flag(rectify, "rectify")
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    keep_responses = check_flag(keep_responses, "keep_responses")
    method, rule = check_method(method, rectify)
    config, fast = resolve(config, fast)
    check_net(net)
    if not _fused(net, method):
        return graph.clear_from_trace(net, trace, classes, method, rule, reduce, palette, vmax, keep_responses,
                                      config=config, fast=fast)
    config.mark("clear entry")
    z, switches, sizes, classes = _prepare(net, trace, classes)
    B, K = classes.shape
    hues = check_palette(palette, K)
    resolve_vmax(np.zeros((1, 1, 1)), vmax)  # refuses a bad vmax before any work
    C, (H, W) = net.in_channels, sizes[0]
    plan = network_plan(net)
    res = ek.Results(B, K, H, W, keep_responses, vmax, hues)
    per_signal = memory.backward_bytes_per_signal(net, sizes) + 4 * C * H * W
    available = memory.budget(config) - memory.column_bytes(config) - res.nbytes
    kernel = ek.epilogue(ek.REDUCE_CODES[reduce], keep_responses, res.fixed, vmax is None or vmax == "batch")
    classes_dev = dv.asdevice(classes)
    config.mark("clear start")
    for b0, bc, k0, kc in memory.chunks(B, K, per_signal, available):
        R, rect = _backproject_chunk(net, plan, sizes, z, classes_dev, switches, b0, bc, k0, kc, rectify, config,
                                     fast)
        res.merge(kernel, R, b0, bc, k0, kc, K, H, W, rect)
        config.mark("epilogue")
        del R
    out = res.finish(vmax, keep_responses, dv.on_device(trace.z))
    config.mark("compose")
    return out


def agreement(net: Network, x, classes=None, reference=None, rectify: bool = True, reduce: str = "sum", *,
              config: CudaConfig | None = None) -> dict:
    """How often the fast (TF32) mode's dominant class equals the exact one's (or ``reference``'s, a
    Clear computed some other way, e.g. by the float64 reference).

    Returns {"agreement": fraction of all pixels, "decisive_agreement": fraction among pixels whose top
    two exact responses differ by more than 1e-3 of the image's largest response (where TF32's error
    cannot flip the order), "pixels": count}."""
    trace = forward(net, x, fast=False, config=config)
    ids = check_classes(classes, np.asarray(dv.tohost(trace.logits)).shape[0], net.num_classes)
    exact = reference or clear_from_trace(net, trace, ids, rectify, reduce, keep_responses=True, fast=False,
                                          config=config)
    fast_trace = forward(net, x, fast=True, config=config)
    quick = clear_from_trace(net, fast_trace, ids, rectify, reduce, keep_responses=False, fast=True, config=config)
    ref_index = np.asarray(dv.tohost(exact.dominant_index))
    got = np.asarray(dv.tohost(quick.dominant_index))
    same = ref_index == got
    r = np.sort(np.asarray(dv.tohost(exact.responses), dtype=np.float64), axis=1)
    scale = np.abs(r).reshape(r.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    gap = r[:, -1] - r[:, -2] if r.shape[1] > 1 else np.full(r.shape[:1] + r.shape[2:], np.inf)
    decisive = gap > 1e-3 * np.maximum(scale, 1e-30)
    return {"agreement": float(same.mean()),
            "decisive_agreement": float(same[decisive].mean()) if decisive.any() else 1.0,
            "pixels": int(same.size)}
