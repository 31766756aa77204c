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
from . import graph
from .layers import Activation, Div, LayerNorm, Mul, ReLU
from .network import MaxPool, Network, check_input

REDUCTIONS = ("sum", "max", "norm")
# the response methods (docs/design.md, "Response methods"): each is the same walk from the same seed with
# its own ReLU rule, and input×gradient multiplies the gradient by the image before the channel reduction
METHODS = ("deconvnet", "guided", "gradient", "input_x_gradient")
_ALIASES = {"input×gradient": "input_x_gradient", "input*gradient": "input_x_gradient",
            "inputxgradient": "input_x_gradient", "input-x-gradient": "input_x_gradient",
            "guided_backprop": "guided", "guided-backprop": "guided", "saliency": "gradient"}


def check_method(method, rectify=True) -> tuple[str, str]:
    """(the method's canonical name, its ReLU rule) for ``method`` and ``rectify``; refuses what is not one.

    ``rectify=False`` (Eq. 2 literally, the map linear in z_L) belongs to the deconvnet: the other methods
    define their own ReLU rule."""
    if not isinstance(rectify, (bool, np.bool_)):
        raise ClearmapsError(f"rectify={rectify!r}; expected True or False.")
    name = _ALIASES.get(method, method) if isinstance(method, str) else method
    if name not in METHODS:
        raise ClearmapsError(f"method={method!r}; expected one of {METHODS} (or 'input×gradient').")
    if name != "deconvnet" and not rectify:
        raise ClearmapsError(f"rectify=False applies to method='deconvnet' (Eq. 2 literally); method={name!r} has "
                             "its own ReLU rule.")
    rule = {"deconvnet": "rectify" if rectify else "identity", "guided": "guided", "gradient": "gradient",
            "input_x_gradient": "gradient"}[name]
    return name, rule


@dataclass(frozen=True, eq=False)
class Trace:
    """What the forward pass leaves for the back-projection.

    sizes[i]       spatial size (H, W) of node i's (first) input; sizes[-1] is z_L's size
    switches[i]    for each MaxPool node i: int64 (B, C, oh, ow) flat indices into its input plane
    z              z_L, the class map: the last node's output (for a chain, the head conv's output after
                   its ReLU if it has one), (B, N, h, w)
    logits         mean of z over (h, w), (B, N)
    probabilities  softmax of the logits, (B, N)
    shapes         per-image output shape of every node (None: not recorded, a chain's fast backends)
    saved          {node: what its way back needs}: switches, ReLU signs [x > 0], inputs of nonlinear steps
    """

    sizes: tuple
    switches: dict
    z: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    shapes: tuple = None
    saved: dict = None


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(net: Network, x, dtype=np.float64, method: str = "deconvnet") -> Trace:
    """Run ``net`` on ``x`` (B, C, H, W), recording switches, shapes and what the way back needs
    (docs/design.md, "Forward with switches").

    Computes in ``dtype`` (float64 by default: this is the oracle). The reference keeps what every
    ``method`` needs (ReLU signs, the image); fast backends keep only what the named one needs.
    """
    check_method(method)
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    x = check_input(net, x).astype(dtype, copy=False)
    z, saved, shapes, _ = graph.run_forward(net, x)
    switches = {i: saved.pop(i) for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)}
    saved[-1] = x  # the image: input×gradient's final factor
    logits = z.mean(axis=(2, 3))
    return Trace(tuple(net.layer_sizes(x.shape[2:])), switches, z, logits, softmax(logits), tuple(shapes), saved)


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


def backproject(net: Network, trace: Trace, classes=None, rectify: bool = True, method: str = "deconvnet") -> np.ndarray:
    """R(x|c) for each chosen class (Eq. 3): (B, K, C, H, W).

    The seed dE_c/dz_L = z_L[c] goes back through the class map's producer (for the paper's chain, the head
    conv: G_L^c z_L, its kernel c transposing z_L[:, c]); then, node by node in reverse: ReLU → the method's
    rule (the deconvnet rectifies, max(s, 0); ``rectify=False`` skips it, which gives Eq. 2 literally),
    MaxPool → switch unpooling (U_l), Conv → transposed conv (G_l, bias unused), and every other operation
    by its derivative at the forward point (:mod:`clearmaps.reference.rules`). ``classes`` is None (all),
    (K,) or (B, K) class ids. ``method``: "deconvnet" (the paper), "guided" (guided backpropagation),
    "gradient" (plain backpropagation) or "input_x_gradient" (the gradient times the image).
    """
    method, rule = check_method(method, rectify)
    R = backproject_rule(net, trace, classes, rule)
    if method == "input_x_gradient":
        R = R * image_of(trace)[:, None]
    return R


def image_of(trace: Trace):
    """The image a trace was made from (what input×gradient multiplies by)."""
    image = (trace.saved or {}).get(-1)
    if image is None:
        raise ClearmapsError("this trace does not hold its input image, which method='input_x_gradient' needs; "
                             "compute it with forward(net, x) of this backend.")
    return image


def backproject_rule(net: Network, trace: Trace, classes=None, rule: str = "rectify") -> np.ndarray:
    """:func:`backproject` with a ReLU rule by name (``clearmaps.reference.rules.RULES``)."""
    z = trace.z
    saved, shapes = walk_inputs(net, trace, rule)
    B = z.shape[0]
    classes = check_classes(classes, B, net.num_classes)
    R = graph.backward(net, z, saved, shapes, classes, rule, image_shape=(net.in_channels, *trace.sizes[0]))
    return R.reshape(B, classes.shape[1], *R.shape[1:])


def walk_inputs(net: Network, trace: Trace, rule: str) -> tuple[dict, tuple]:
    """What the walk back needs from a trace (of any backend): {node: saved value} (switches included) and
    every node's shape; refuses a trace of another network or one that lacks what ``rule`` reads."""
    check_trace(net, trace)
    shapes = trace.shapes if trace.shapes is not None else tuple(net.shapes(trace.sizes[0]))
    saved = {i: v for i, v in (trace.saved or {}).items() if i >= 0}
    saved.update(trace.switches)
    for i, layer in enumerate(net.layers):
        if i not in saved and needs_saved(layer, rule):
            raise ClearmapsError(f"trace lacks what node {i} ({layer!r}) needs on the way back; compute it with "
                                 "forward(net, x, method=...) for the method you ask.")
    return saved, shapes


def needs_saved(layer, rule: str) -> bool:
    """Whether ``layer``'s step back under ``rule`` reads what its forward step kept."""
    if isinstance(layer, (Activation, Mul, Div, LayerNorm, MaxPool)):
        return True
    return isinstance(layer, ReLU) and rule in ("gradient", "guided")


def check_trace(net: Network, trace) -> None:
    """Refuse a trace that another network (or another input size) made."""
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    if not isinstance(trace, Trace):
        raise ClearmapsError(f"trace is a {type(trace).__name__}; expected the Trace that forward(net, x) returns.")
    z = trace.z
    if len(trace.sizes) != len(net.layers) + 1 or getattr(z, "ndim", 0) != 4 or z.shape[1] != net.num_classes \
            or set(trace.switches) != {i for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)}:
        raise ClearmapsError("trace does not belong to this network (layer sizes, z or switches differ); "
                             "compute it with forward(net, x) for the same net.")
    if trace.shapes is not None and len(trace.shapes) != len(net.layers):
        raise ClearmapsError("trace does not belong to this network (it has shapes for another number of "
                             "nodes); compute it with forward(net, x) for the same net.")


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
                        dtype=np.float64, method: str = "deconvnet") -> np.ndarray:
    """The attentive response maps r(x|c), (B, K, H, W), for ``classes`` (None = all)."""
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    check_method(method, rectify)
    return reduce_channels(backproject(net, forward(net, x, dtype), classes, rectify, method), reduce)


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
                     vmax=None, keep_responses=True, method="deconvnet") -> Clear:
    """Everything after the forward pass: responses, dominant class and response, and the RGB composite.

    Fast backends fuse these steps; this is the unfused definition they are tested against. A signed
    method's maps compose as Eqs. 4–6 say: the dominant class is the largest response, and a pixel whose
    largest response is ≤ 0 is black.
    """
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    responses = reduce_channels(backproject(net, trace, classes, rectify, method), reduce)
    index, response = dominant(responses)
    rgb = compose(index, response, palette, vmax, num_classes=responses.shape[1])
    return Clear(responses if keep_responses else None, index, response, rgb)
