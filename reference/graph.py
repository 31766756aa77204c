"""The forward pass and the back-projection of any network, walked node by node (Eqs. 1–3 on a graph).

forward      runs every node in order, keeping what the way back needs (switches, ReLU signs, inputs of
             nonlinear steps) and each node's shape.
backproject  seeds the class map with dE_c/dz_L = z_L[c] (one class per signal) and walks the nodes in
             reverse, each node's step from :mod:`clearmaps.reference.rules`; a node read by several
             others gets the sum of their signals (a residual connection), and the image's signal is R(x|c).

``ops`` supplies the numerical primitives: :mod:`clearmaps.reference.ops` in NumPy float64 here; a fast
backend passes its own namespace with the same names and gets the same definition, step for step.
"""

from __future__ import annotations

import types

import numpy as np

from . import ops as _numpy_ops
from . import rules
from .errors import ClearmapsError
from .network import IMAGE, Network


def _erf(x):
    from math import erf

    return np.frompyfunc(erf, 1, 1)(x).astype(x.dtype)


def _cast(a, like):
    return None if a is None else np.asarray(a, dtype=like.dtype)


REFERENCE_OPS = types.SimpleNamespace(
    xp=np, erf=_erf, const=_cast,
    conv2d=lambda x, w, b, *args: _numpy_ops.conv2d(x, _cast(w, x), _cast(b, x), *args),
    conv_transpose2d=lambda y, w, *args: _numpy_ops.conv_transpose2d(y, _cast(w, y), *args),
    **{name: getattr(_numpy_ops, name) for name in (
        "max_pool_with_switches", "unpool", "avg_pool2d", "avg_pool2d_transpose", "adaptive_avg_pool2d",
        "adaptive_avg_pool2d_transpose")})


def run_forward(net: Network, x, ops=REFERENCE_OPS, keep=False, needed=None):
    """Run every node on ``x`` (B, C, H, W). Returns (z_L, saved {node: what its way back needs}, per-image
    output shapes of every node, and all outputs when ``keep``). ``needed``, a predicate on a layer, limits
    what is saved (default: everything any response method needs)."""
    consumers = {}
    for i, ins in enumerate(net.inputs):
        for j in ins:
            consumers[j] = consumers.get(j, 0) + 1
    values, saved, shapes, kept = {IMAGE: x}, {}, [], []
    for i, (layer, ins) in enumerate(zip(net.layers, net.inputs)):
        y, keep_back = rules.FORWARD[type(layer)](layer, ops, *(values[j] for j in ins))
        if keep_back is not None and (needed is None or needed(layer)):
            saved[i] = keep_back
        shapes.append(tuple(int(n) for n in y.shape[1:]))
        values[i] = y
        if keep:
            kept.append(y)
        for j in ins:  # free what no later node reads
            consumers[j] -= 1
            if consumers[j] == 0 and j != len(net.layers) - 1:
                del values[j]
    return values[len(net.layers) - 1], saved, shapes, kept


def backward(net: Network, z, saved, shapes, classes, rule: str, ops=REFERENCE_OPS, image_shape=None):
    """R(x|c) for the (B, K) class ids ``classes``: (B·K, C, H, W), image-major.

    The seed is dE_c/dz_L = z_L[c] in channel c (zero elsewhere), one signal per (image, class)."""
    if rule not in rules.RULES:
        raise ClearmapsError(f"rule={rule!r}; expected one of {rules.RULES}.")
    xp = ops.xp
    B, K = classes.shape
    n = len(net.layers)
    seed = xp.zeros((B * K, *z.shape[1:]), dtype=z.dtype)
    rows = xp.arange(B * K)
    flat_classes = xp.asarray(np.ascontiguousarray(classes).reshape(-1))
    seed[rows, flat_classes] = z[rows // K, flat_classes]
    signals = {n - 1: seed}
    image = tuple(image_shape)
    for i in range(n - 1, -1, -1):
        s = signals.pop(i, None)
        if s is None:  # no signal reaches this node
            continue
        layer, ins = net.layers[i], net.inputs[i]
        in_shapes = [image if j == IMAGE else shapes[j] for j in ins]
        back = rules.BACKWARD[type(layer)](layer, ops, s, saved.get(i), rule, K, in_shapes)
        for j, g in zip(ins, back):
            signals[j] = g if j not in signals else signals[j] + g
    return signals[IMAGE]
