"""CLEAR's attentive responses and dominant class (Kumar, Wong & Taylor 2017, Eqs. 1–5), in plain NumPy.

forward            runs the network and records every max-pool's switches (what U_l needs).
backproject        R(x|c) = G_1 U_1 G_2 U_2 … G_{L-1} U_{L-1} G_L^c z_L          (Eqs. 1–3)
attentive_responses  r(x|c): R reduced over the input channels to one value per pixel.
dominant           C(x) = argmax_c r(x|c), D(x) = max_c r(x|c)                    (Eqs. 4–5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .colour import compose
from .errors import ClearmapsError, check_array
from .network import Conv, MaxPool, Network, ReLU, check_input
from .ops import conv2d, conv_transpose2d, max_pool_with_switches, unpool

REDUCTIONS = ("sum", "max", "norm")


@dataclass(frozen=True, eq=False)
class Trace:
    """What the forward pass leaves for the back-projection.

    sizes[i]       spatial input size (H, W) of layer i (sizes[-1] is the head's output size)
    switches[i]    for each MaxPool layer i: int64 (B, C, oh, ow) flat indices into its input plane
    z              z_L, the head conv's output after its ReLU if it has one, (B, N, h, w)
    logits         mean of z over (h, w), (B, N)
    probabilities  softmax of the logits, (B, N)
    """

    sizes: tuple
    switches: dict
    z: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(net: Network, x, dtype=np.float64) -> Trace:
    """Run ``net`` on ``x`` (B, C, H, W), recording switches and layer sizes (DESIGN.md, "Forward").

    Computes in ``dtype`` (float64 by default: this is the oracle).
    """
    x = check_input(net, x).astype(dtype, copy=False)
    sizes, switches = [], {}
    for i, layer in enumerate(net.layers):
        sizes.append(x.shape[2:])
        if isinstance(layer, Conv):
            x = conv2d(x, layer.weight.astype(dtype), layer.bias.astype(dtype), layer.stride, layer.padding)
        elif isinstance(layer, ReLU):
            x = np.maximum(x, 0)
        else:
            x, switches[i] = max_pool_with_switches(x, layer.kernel, layer.stride, layer.padding)
    sizes.append(x.shape[2:])
    logits = x.mean(axis=(2, 3))
    return Trace(tuple(sizes), switches, x, logits, softmax(logits))


def check_classes(classes, batch: int, num_classes: int) -> np.ndarray:
    """Class ids as an int64 array (B, K): None means all, a 1-D list applies to every image."""
    if classes is None:
        return np.broadcast_to(np.arange(num_classes), (batch, num_classes))
    c = check_array(classes, "classes", kinds="iu", finite=False)
    if c.ndim == 1:
        c = np.broadcast_to(c, (batch, c.shape[0]))
    if c.ndim != 2 or c.shape[0] != batch or c.shape[1] == 0:
        raise ClearmapsError(f"classes has shape {np.shape(classes)}; expected (K,) or (B={batch}, K) "
                             "class ids with K >= 1.")
    if c.min() < 0 or c.max() >= num_classes:
        raise ClearmapsError(f"classes contain {int(c.min()) if c.min() < 0 else int(c.max())}; the network "
                             f"has classes 0 .. {num_classes - 1}.")
    return c.astype(np.int64, copy=False)


def backproject(net: Network, trace: Trace, classes=None, rectify: bool = True) -> np.ndarray:
    """R(x|c) for each chosen class (Eq. 3): (B, K, C, H, W).

    The head's kernel c transposes z_L[:, c] into the head's input space (G_L^c z_L); then, walking the
    layers below in reverse: ReLU → rectify (max(s, 0), the deconvnet rule; skipped when ``rectify`` is
    False, which gives Eq. 2 literally), MaxPool → switch unpooling (U_l), Conv → transposed conv (G_l,
    bias unused). ``classes`` is None (all), (K,) or (B, K) class ids.
    """
    if not isinstance(rectify, (bool, np.bool_)):
        raise ClearmapsError(f"rectify={rectify!r}; expected True or False.")
    z = trace.z
    B = z.shape[0]
    classes = check_classes(classes, B, net.num_classes)
    K = classes.shape[1]
    head_i = net.head_index
    head = net.head
    w = head.weight.astype(z.dtype)
    # G_L^c z_L for every (image, class) pair; the pairs become one batch of B*K signals, image-major
    signal = np.stack([
        conv_transpose2d(z[b:b + 1, c:c + 1], w[c:c + 1], head.stride, head.padding, trace.sizes[head_i])[0]
        for b in range(B) for c in classes[b]])
    for i in range(head_i - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ReLU):
            if rectify:
                signal = np.maximum(signal, 0)
        elif isinstance(layer, MaxPool):
            switches = np.repeat(trace.switches[i], K, axis=0)  # the same switches for all K classes
            signal = unpool(signal, switches, trace.sizes[i])
        else:
            signal = conv_transpose2d(signal, layer.weight.astype(z.dtype), layer.stride, layer.padding,
                                      trace.sizes[i])
    return signal.reshape(B, K, *signal.shape[1:])


def reduce_channels(R, reduce: str = "sum") -> np.ndarray:
    """r(x|c): R (..., C, H, W) reduced over C by "sum" (default), "max" or "norm" (L2)."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    if reduce == "sum":
        return R.sum(axis=-3)
    if reduce == "max":
        return R.max(axis=-3)
    return np.sqrt((R * R).sum(axis=-3))


def attentive_responses(net: Network, x, classes=None, rectify: bool = True, reduce: str = "sum",
                        dtype=np.float64) -> np.ndarray:
    """The attentive response maps r(x|c), (B, K, H, W), for ``classes`` (None = all)."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    return reduce_channels(backproject(net, forward(net, x, dtype), classes, rectify), reduce)


def dominant(responses):
    """Eqs. 4–5: per pixel, the position k (into the K maps) of the largest response, first on ties,
    and that response. responses (B, K, H, W) → (index int64 (B, H, W), response (B, H, W))."""
    r = check_array(responses, "responses", 4, shape_hint=" of shape (B, K, H, W)")
    if r.shape[1] == 0:
        raise ClearmapsError("responses has no classes (K = 0); expected at least one map.")
    index = np.argmax(r, axis=1)  # NumPy's argmax returns the first maximum
    return index, np.take_along_axis(r, index[:, None], axis=1)[:, 0]


class Clear(NamedTuple):
    """The arrays of one CLEAR computation. ``responses`` is None when only the composite was asked for."""

    responses: np.ndarray | None
    dominant_index: np.ndarray
    dominant_response: np.ndarray
    rgb: np.ndarray


def clear_from_trace(net: Network, trace: Trace, classes, rectify=True, reduce="sum", palette=None,
                     vmax=None, keep_responses=True) -> Clear:
    """Everything after the forward pass: responses, dominant class and response, and the RGB composite.

    Fast backends fuse these steps; this is the unfused definition they are tested against.
    """
    responses = reduce_channels(backproject(net, trace, classes, rectify), reduce)
    index, response = dominant(responses)
    rgb = compose(index, response, palette, vmax, num_classes=responses.shape[1])
    return Clear(responses if keep_responses else None, index, response, rgb)
