"""The operations a network is made of: what each one is, which inputs it takes and what shape it gives.

The paper's three (Conv, ReLU, MaxPool) and what the CNNs people train add to them (docs/design.md,
"Networks as graphs"): here the layers that compute (convolutions, pools, activations, affine and linear maps,
layer norms), in :mod:`clearmaps.reference.tensor_ops` those that join, split, reduce and move data. Each is
a small frozen record; what it computes forward, and how a response signal goes back through it, is in
:mod:`clearmaps.reference.rules`, op by op.

Shapes here never include the batch: an image batch (B, C, H, W) has shape (C, H, W) to a layer. Every
layer works on each image alone, so the batch is always the first axis and never moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ClearmapsError, check_pair
from .layer_base import _frozen, _need_rank, _set, broadcast_shape, window_output_size  # noqa: F401


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution (cross-correlation, as torch's ``conv2d``) with zero padding.

    ``weight`` (out, in / groups, kh, kw), ``bias`` (out,). ``groups`` splits the channels into groups
    convolved apart (``groups == in == out``: depthwise).
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    def __post_init__(self):
        w = _frozen(self.weight, "Conv.weight", 4, " of shape (out, in / groups, kh, kw)")
        b = _frozen(self.bias, "Conv.bias", 1, " of shape (out,)")
        if min(w.shape) < 1:
            raise ClearmapsError(f"Conv.weight has shape {w.shape}; every dimension must be at least 1.")
        if b.shape != (w.shape[0],):
            raise ClearmapsError(f"Conv.bias has shape {b.shape}; expected ({w.shape[0]},) to match "
                                 f"Conv.weight of shape {w.shape}.")
        g = self.groups
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 or w.shape[0] % g:
            raise ClearmapsError(f"Conv.groups is {g!r}; expected a positive int that divides the "
                                 f"{w.shape[0]} output channels.")
        _set(self, weight=w, bias=b, stride=check_pair(self.stride, "Conv.stride", 1),
             padding=check_pair(self.padding, "Conv.padding", 0),
             dilation=check_pair(self.dilation, "Conv.dilation", 1), groups=int(g))

    arity = 1

    @property
    def kernel(self) -> tuple:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def plain(self) -> bool:
        """No groups and no dilation: the paper's convolution."""
        return self.groups == 1 and self.dilation == (1, 1)

    def output_size(self, size) -> tuple:
        return tuple(window_output_size(n, k, s, p, d, what="Conv") for n, k, s, p, d in
                     zip(size, self.kernel, self.stride, self.padding, self.dilation))

    def output_shape(self, shape):
        _need_rank(shape, 3, repr(self))
        if shape[0] != self.in_channels:
            raise ClearmapsError(f"{self!r} takes {self.in_channels} channels but gets {shape[0]}.")
        return (self.out_channels, *self.output_size(shape[1:]))

    def __repr__(self) -> str:
        o, _, kh, kw = self.weight.shape
        extra = (f", dilation={self.dilation}" if self.dilation != (1, 1) else "") + (
            f", groups={self.groups}" if self.groups != 1 else "")
        return (f"Conv({self.in_channels}->{o}, kernel=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}{extra})")


@dataclass(frozen=True)
class ReLU:
    """max(x, 0). On the way back it becomes the response method's ReLU rule (the deconvnet rectifies)."""

    arity = 1

    def output_shape(self, shape):
        return tuple(shape)

    def __repr__(self) -> str:
        return "ReLU()"


@dataclass(frozen=True)
class MaxPool:
    """Max pooling with -inf padding, as torch's ``max_pool2d`` (dilation and ``ceil_mode`` included).

    Windows may overlap (stride < kernel). The padding is at most half the (dilated) window, as in torch.
    """

    kernel: tuple
    stride: tuple = None
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    ceil_mode: bool = False

    def __post_init__(self):
        kernel = check_pair(self.kernel, "MaxPool.kernel", 1)
        stride = kernel if self.stride is None else check_pair(self.stride, "MaxPool.stride", 1)
        padding = check_pair(self.padding, "MaxPool.padding", 0)
        dilation = check_pair(self.dilation, "MaxPool.dilation", 1)
        if any(2 * p > d * (k - 1) + 1 for p, k, d in zip(padding, kernel, dilation)):
            raise ClearmapsError(f"MaxPool.padding {padding} is more than half the kernel {kernel} "
                                 f"(dilation {dilation}); a window could then hold only padding.")
        if not isinstance(self.ceil_mode, (bool, np.bool_)):
            raise ClearmapsError(f"MaxPool.ceil_mode is {self.ceil_mode!r}; expected True or False.")
        _set(self, kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=bool(self.ceil_mode))

    arity = 1

    @property
    def plain(self) -> bool:
        """No dilation and floor mode: the pools the fused chain kernels handle."""
        return self.dilation == (1, 1) and not self.ceil_mode

    def output_size(self, size) -> tuple:
        return tuple(window_output_size(n, k, s, p, d, self.ceil_mode, "MaxPool") for n, k, s, p, d in
                     zip(size, self.kernel, self.stride, self.padding, self.dilation))

    def output_shape(self, shape):
        _need_rank(shape, 3, "MaxPool")
        return (shape[0], *self.output_size(shape[1:]))

    def __repr__(self) -> str:
        extra = (f", dilation={self.dilation}" if self.dilation != (1, 1) else "") + (
            ", ceil_mode=True" if self.ceil_mode else "")
        return f"MaxPool(kernel={self.kernel}, stride={self.stride}, padding={self.padding}{extra})"


@dataclass(frozen=True)
class AvgPool:
    """Average pooling as torch's ``avg_pool2d``: zero padding, ``ceil_mode``, ``count_include_pad`` and
    ``divisor_override`` with torch's meaning."""

    kernel: tuple
    stride: tuple = None
    padding: tuple = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int = None

    def __post_init__(self):
        kernel = check_pair(self.kernel, "AvgPool.kernel", 1)
        stride = kernel if self.stride is None else check_pair(self.stride, "AvgPool.stride", 1)
        padding = check_pair(self.padding, "AvgPool.padding", 0)
        if any(2 * p > k for p, k in zip(padding, kernel)):
            raise ClearmapsError(f"AvgPool.padding {padding} is more than half the kernel {kernel}.")
        d = self.divisor_override
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1):
            raise ClearmapsError(f"AvgPool.divisor_override is {d!r}; expected None or a positive int.")
        _set(self, kernel=kernel, stride=stride, padding=padding, ceil_mode=bool(self.ceil_mode),
             count_include_pad=bool(self.count_include_pad), divisor_override=None if d is None else int(d))

    arity = 1

    def output_size(self, size) -> tuple:
        return tuple(window_output_size(n, k, s, p, 1, self.ceil_mode, "AvgPool") for n, k, s, p in
                     zip(size, self.kernel, self.stride, self.padding))

    def output_shape(self, shape):
        _need_rank(shape, 3, "AvgPool")
        return (shape[0], *self.output_size(shape[1:]))

    def __repr__(self) -> str:
        extra = (", ceil_mode=True" if self.ceil_mode else "") + (
            "" if self.count_include_pad else ", count_include_pad=False") + (
            f", divisor_override={self.divisor_override}" if self.divisor_override else "")
        return f"AvgPool(kernel={self.kernel}, stride={self.stride}, padding={self.padding}{extra})"


@dataclass(frozen=True)
class AdaptiveAvgPool:
    """torch's ``adaptive_avg_pool2d``: output cell i averages input rows floor(i·H/h) .. ceil((i+1)·H/h) - 1
    (and so for columns). ``None`` in ``output_size`` keeps that axis's size."""

    output_size: tuple

    def __post_init__(self):
        size = self.output_size
        size = (size, size) if size is None or isinstance(size, (int, np.integer)) else tuple(size)
        if len(size) != 2 or any(s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                                    or s < 1) for s in size):
            raise ClearmapsError(f"AdaptiveAvgPool.output_size is {self.output_size!r}; expected a positive int "
                                 "or a pair of positive ints (or None).")
        _set(self, output_size=tuple(None if s is None else int(s) for s in size))

    arity = 1

    def resolved(self, size) -> tuple:
        return tuple(n if s is None else s for n, s in zip(size, self.output_size))

    def output_shape(self, shape):
        _need_rank(shape, 3, "AdaptiveAvgPool")
        return (shape[0], *self.resolved(shape[1:]))

    def __repr__(self) -> str:
        return f"AdaptiveAvgPool({self.output_size})"


# activations other than ReLU: name -> parameters (name, default)
ACTIVATIONS = {
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),   # ReLU6 is hardtanh(0, 6)
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "sigmoid": (), "tanh": (), "silu": (), "hardswish": (), "hardsigmoid": (), "mish": (),
    "gelu": (("approximate", "none"),),
}
# the ones a user may ask to treat by the ReLU rule on the way back (piecewise linear, zero or small below 0)
RELU_LIKE = ("hardtanh", "leaky_relu")


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity other than ReLU. On the way back its signal follows its derivative at the
    forward point (as autograd and Captum do), or, for ReLU-like ones with ``relu_rule=True``, the ReLU rule
    of the response method (the deconvnet then rectifies there too)."""

    kind: str
    params: tuple = ()
    relu_rule: bool = False

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ClearmapsError(f"Activation kind {self.kind!r} is not supported; expected one of "
                                 f"{sorted(ACTIVATIONS)} (or ReLU).")
        names = [n for n, _ in ACTIVATIONS[self.kind]]
        params = dict(zip(names, (d for _, d in ACTIVATIONS[self.kind])))
        given = dict(self.params)
        if set(given) - set(names):
            raise ClearmapsError(f"Activation {self.kind!r} has parameters {names}; got {sorted(given)}.")
        params.update(given)
        if self.kind == "gelu" and params["approximate"] not in ("none", "tanh"):
            raise ClearmapsError(f"gelu approximate={params['approximate']!r}; expected 'none' or 'tanh'.")
        if self.relu_rule and self.kind not in RELU_LIKE:
            raise ClearmapsError(f"relu_rule applies to {RELU_LIKE}, not {self.kind!r}.")
        _set(self, params=tuple((n, params[n]) for n in names), relu_rule=bool(self.relu_rule))

    arity = 1

    def __getitem__(self, name):
        return dict(self.params)[name]

    def output_shape(self, shape):
        return tuple(shape)

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={v!r}" for n, v in self.params) + (", relu_rule=True" if self.relu_rule else "")
        return f"{self.kind}({args})"


@dataclass(frozen=True, eq=False)
class Affine:
    """x · scale + shift with constant arrays broadcast over the per-image shape (no batch axis): an eval-mode
    batch norm that no conv before it absorbs (scale and shift (C, 1, 1)), a layer scale, a constant
    factor or offset. Either may be None."""

    scale: np.ndarray = None
    shift: np.ndarray = None

    def __post_init__(self):
        _set(self, scale=None if self.scale is None else _frozen(np.asarray(self.scale, dtype=np.float64)
                                                                  if np.isscalar(self.scale) else self.scale,
                                                                  "Affine.scale"),
             shift=None if self.shift is None else _frozen(np.asarray(self.shift, dtype=np.float64)
                                                           if np.isscalar(self.shift) else self.shift, "Affine.shift"))

    arity = 1

    def output_shape(self, shape):
        for a, name in ((self.scale, "scale"), (self.shift, "shift")):
            if a is not None and broadcast_shape(shape, a.shape, "Affine") != tuple(shape):
                raise ClearmapsError(f"Affine.{name} of shape {a.shape} would grow an input of shape {tuple(shape)}.")
        return tuple(shape)

    def __repr__(self) -> str:
        s = lambda a: "-" if a is None else (f"{float(a.reshape(-1)[0]):g}" if a.size == 1 else str(a.shape))  # noqa: E731
        return f"Affine(scale={s(self.scale)}, shift={s(self.shift)})"


@dataclass(frozen=True, eq=False)
class Linear:
    """x · weightᵀ + bias on the last axis (torch's ``linear``): weight (out, in), bias (out,) or None."""

    weight: np.ndarray
    bias: np.ndarray = None

    def __post_init__(self):
        w = _frozen(self.weight, "Linear.weight", 2, " of shape (out, in)")
        b = None if self.bias is None else _frozen(self.bias, "Linear.bias", 1, " of shape (out,)")
        if b is not None and b.shape != (w.shape[0],):
            raise ClearmapsError(f"Linear.bias has shape {b.shape}; expected ({w.shape[0]},).")
        _set(self, weight=w, bias=b)

    arity = 1

    def output_shape(self, shape):
        if not shape or shape[-1] != self.weight.shape[1]:
            raise ClearmapsError(f"{self!r} takes {self.weight.shape[1]} features on its last axis but gets "
                                 f"a tensor of shape (B, {', '.join(map(str, shape))}).")
        return (*shape[:-1], self.weight.shape[0])

    def __repr__(self) -> str:
        return f"Linear({self.weight.shape[1]}->{self.weight.shape[0]}{'' if self.bias is not None else ', no bias'})"


@dataclass(frozen=True, eq=False)
class LayerNorm:
    """torch's ``layer_norm`` over the last ``len(weight.shape)`` axes: (x - mean) / sqrt(var + eps) · weight
    + bias (biased variance). Its signal follows its derivative at the forward point."""

    normalized_shape: tuple
    weight: np.ndarray = None
    bias: np.ndarray = None
    eps: float = 1e-5

    def __post_init__(self):
        shape = tuple(int(s) for s in self.normalized_shape)
        w = None if self.weight is None else _frozen(self.weight, "LayerNorm.weight")
        b = None if self.bias is None else _frozen(self.bias, "LayerNorm.bias")
        for a, n in ((w, "weight"), (b, "bias")):
            if a is not None and a.shape != shape:
                raise ClearmapsError(f"LayerNorm.{n} has shape {a.shape}; expected {shape}.")
        if not self.eps > 0:
            raise ClearmapsError(f"LayerNorm.eps is {self.eps!r}; expected a positive number.")
        _set(self, normalized_shape=shape, weight=w, bias=b, eps=float(self.eps))

    arity = 1

    def output_shape(self, shape):
        n = len(self.normalized_shape)
        if tuple(shape[len(shape) - n:]) != self.normalized_shape or len(shape) < n:
            raise ClearmapsError(f"{self!r} of a tensor of shape (B, {', '.join(map(str, shape))}).")
        return tuple(shape)

    def __repr__(self) -> str:
        return f"LayerNorm({self.normalized_shape}, eps={self.eps:g})"


# the operations that join, split, reduce and move data live in tensor_ops.py (imported here, so that this module
# names every layer type)
from .tensor_ops import Add, Cat, Div, Expand, Mul, Pad, Permute, Reduce, Reshape, Slice  # noqa: E402

LAYER_TYPES = (Conv, ReLU, MaxPool, AvgPool, AdaptiveAvgPool, Activation, Affine, Linear, Reduce, Add, Mul, Div,
               Cat, Slice, Reshape, Permute, Expand, Pad, LayerNorm)
Layer = Conv | ReLU | MaxPool  # the paper's layers (the chain form)
