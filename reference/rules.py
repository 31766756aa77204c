"""Each operation forward, and the step that carries a response signal back through it, side by side.

The back-projection of a network is defined once, for any graph (docs/design.md, "Networks as graphs"):
R(x|c) = ∂E_c/∂x with E_c = ½·Σ z_L[c]², where every ReLU's backward is replaced by the response method's
ReLU rule and every other operation's backward is its ordinary derivative at the forward point. For the
paper's three layers this is Eqs. 1–3: a conv goes back as the transposed conv with the same weights
(G_l, bias unused), a max pool as switch unpooling (U_l), a ReLU as rectification (the deconvnet).

The ReLU rules (``rule``):

    "rectify"   max(s, 0)                the deconvnet (Zeiler & Fergus; the paper) — the default
    "identity"  s                        rectify=False: Eq. 2 literally, the map is linear in z_L
    "gradient"  s · [x > 0]              ordinary backpropagation
    "guided"    max(s, 0) · [x > 0]      guided backpropagation (Springenberg et al.)

Every function takes ``ops``, the numerical primitives (``clearmaps.reference.ops`` here; a fast backend
passes its own with the same names) and ``xp``, the array module they work in. Forward values are
(B, ...) per image; signals are (B·K, ...), image-major: the K classes of image b are rows b·K .. b·K+K-1.
``saved`` is what the forward step kept for the way back.
"""

from __future__ import annotations

import math

import numpy as np

from . import layers as L

RULES = ("rectify", "identity", "gradient", "guided")


def _per_image(s, saved, K, f):
    """f applied to each (image, class) signal and its image's forward value, broadcasting over the K classes:
    s (B·K, ...), saved (B, ...) → (B·K, ...)."""
    out = f(s.reshape(-1, K, *s.shape[1:]), saved[:, None])
    return out.reshape(-1, *out.shape[2:])


def _unbroadcast(g, shape, xp):
    """Sum a signal (N, ...) over the axes a per-image ``shape`` was broadcast along."""
    lead = g.ndim - 1 - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(1, 1 + lead)))
    axes = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and g.shape[i + 1] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def relu_step(s, positive, rule, K, xp):
    """A ReLU on the way back, by ``rule`` (see the module docstring); ``positive`` = [x > 0] per image."""
    if rule == "rectify":
        return xp.maximum(s, 0)
    if rule == "identity":
        return s
    if rule == "guided":
        s = xp.maximum(s, 0)
    return _per_image(s, positive, K, lambda a, m: a * m)


# ---- the paper's layers -------------------------------------------------------------------------------------

def conv_forward(op: L.Conv, ops, x):
    return ops.conv2d(x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups), None


def conv_backward(op: L.Conv, ops, s, saved, rule, K, in_shapes):
    # G_l: the transposed conv with the same weights, back to the conv's input size; the bias is unused
    return (ops.conv_transpose2d(s, op.weight, op.stride, op.padding, in_shapes[0][1:], op.dilation, op.groups),)


def relu_forward(op, ops, x):
    return ops.xp.maximum(x, 0), x > 0


def relu_backward(op, ops, s, positive, rule, K, in_shapes):
    return (relu_step(s, positive, rule, K, ops.xp),)


def max_pool_forward(op: L.MaxPool, ops, x):
    return ops.max_pool_with_switches(x, op.kernel, op.stride, op.padding, op.dilation, op.ceil_mode)


def max_pool_backward(op, ops, s, switches, rule, K, in_shapes):
    # U_l: each value added at its window's switch (the same switches for the K classes of an image)
    return (ops.unpool(s, ops.xp.repeat(switches, K, axis=0), in_shapes[0][1:]),)


# ---- pools, affine maps, linear layers ------------------------------------------------------------------------

def avg_pool_forward(op: L.AvgPool, ops, x):
    return ops.avg_pool2d(x, op.kernel, op.stride, op.padding, op.ceil_mode, op.count_include_pad,
                          op.divisor_override), None


def avg_pool_backward(op, ops, s, saved, rule, K, in_shapes):
    return (ops.avg_pool2d_transpose(s, in_shapes[0][1:], op.kernel, op.stride, op.padding, op.ceil_mode,
                                     op.count_include_pad, op.divisor_override),)


def adaptive_forward(op: L.AdaptiveAvgPool, ops, x):
    return ops.adaptive_avg_pool2d(x, op.resolved(x.shape[2:])), None


def adaptive_backward(op, ops, s, saved, rule, K, in_shapes):
    return (ops.adaptive_avg_pool2d_transpose(s, in_shapes[0][1:]),)


def _scale_shift(x, scale, shift, ops):
    """x · scale + shift, either of them absent (None)."""
    if scale is not None:
        x = x * ops.const(scale, x)
    return x if shift is None else x + ops.const(shift, x)


def affine_forward(op: L.Affine, ops, x):
    return _scale_shift(x, op.scale, op.shift, ops), None


def affine_backward(op, ops, s, saved, rule, K, in_shapes):
    return (s if op.scale is None else s * ops.const(op.scale, s),)


def linear_forward(op: L.Linear, ops, x):
    y = ops.xp.matmul(x, ops.const(op.weight, x).T)
    return (y if op.bias is None else y + ops.const(op.bias, x)), None


def linear_backward(op, ops, s, saved, rule, K, in_shapes):
    return (ops.xp.matmul(s, ops.const(op.weight, s)),)


def reduce_forward(op: L.Reduce, ops, x):
    f = x.mean if op.kind == "mean" else x.sum
    return f(axis=op.dims, keepdims=op.keepdim), None


def reduce_backward(op, ops, s, saved, rule, K, in_shapes):
    shape = in_shapes[0]
    if not op.keepdim:
        s = s.reshape(s.shape[0], *(1 if i + 1 in op.dims else n for i, n in enumerate(shape)))
    count = math.prod(shape[d - 1] for d in op.dims) if op.kind == "mean" else 1
    return (ops.xp.broadcast_to(s / count if count != 1 else s, (s.shape[0], *shape)).copy(),)


# ---- joining and splitting paths ------------------------------------------------------------------------------

def add_forward(op: L.Add, ops, a, b):
    a1, a2 = op.alpha
    return (a if a1 == 1 else a * a1) + (b if a2 == 1 else b * a2), None


def add_backward(op, ops, s, saved, rule, K, in_shapes):
    # a residual connection sends the signal down both paths
    return tuple(_unbroadcast(s if al == 1 else s * al, shape, ops.xp) for al, shape in zip(op.alpha, in_shapes))


def mul_forward(op, ops, a, b):
    return a * b, (a, b)


def mul_backward(op, ops, s, saved, rule, K, in_shapes):
    a, b = saved
    xp = ops.xp
    return (_unbroadcast(_per_image(s, b, K, lambda u, v: u * v), in_shapes[0], xp),
            _unbroadcast(_per_image(s, a, K, lambda u, v: u * v), in_shapes[1], xp))


def div_forward(op, ops, a, b):
    return a / b, (a, b)


def div_backward(op, ops, s, saved, rule, K, in_shapes):
    a, b = saved
    xp = ops.xp
    return (_unbroadcast(_per_image(s, b, K, lambda u, v: u / v), in_shapes[0], xp),
            _unbroadcast(_per_image(s, -a / (b * b), K, lambda u, v: u * v), in_shapes[1], xp))


def cat_forward(op: L.Cat, ops, *xs):
    return ops.xp.concatenate(xs, axis=op.dim), None


def cat_backward(op, ops, s, saved, rule, K, in_shapes):
    # each input gets its own slice of the signal back
    ends = np.cumsum([shape[op.dim - 1] for shape in in_shapes])
    return tuple(ops.xp.split(s, ends[:-1].tolist(), axis=op.dim))


def _index(op: L.Slice, ndim):
    index = [slice(None)] * ndim
    index[op.dim] = slice(op.start, op.stop, op.step)
    return tuple(index)


def slice_forward(op: L.Slice, ops, x):
    return x[_index(op, x.ndim)], None


def slice_backward(op, ops, s, saved, rule, K, in_shapes):
    out = ops.xp.zeros((s.shape[0], *in_shapes[0]), dtype=s.dtype)
    out[_index(op, s.ndim)] = s
    return (out,)


# ---- data movement: undone exactly ---------------------------------------------------------------------------

def reshape_forward(op: L.Reshape, ops, x):
    return x.reshape(x.shape[0], *op.shape), None


def reshape_backward(op, ops, s, saved, rule, K, in_shapes):
    return (s.reshape(s.shape[0], *in_shapes[0]),)


def permute_forward(op: L.Permute, ops, x):
    return x.transpose(0, *op.perm), None


def permute_backward(op, ops, s, saved, rule, K, in_shapes):
    inverse = np.argsort(op.perm) + 1
    return (s.transpose(0, *inverse.tolist()),)


def expand_forward(op: L.Expand, ops, x):
    return ops.xp.broadcast_to(x, (x.shape[0], *op.shape)).copy(), None


def expand_backward(op, ops, s, saved, rule, K, in_shapes):
    return (_unbroadcast(s, in_shapes[0], ops.xp),)


def _pad_crop(x, widths, value, xp):
    """Pad (positive widths) or crop (negative ones) the per-image axes of x."""
    crop = tuple([slice(None)] + [slice(max(-a, 0), n - max(-b, 0)) for n, (a, b) in zip(x.shape[1:], widths)])
    x = x[crop]
    grow = [(0, 0)] + [(max(a, 0), max(b, 0)) for a, b in widths]
    return xp.pad(x, grow, constant_values=value) if any(a or b for a, b in grow) else x


def pad_forward(op: L.Pad, ops, x):
    return _pad_crop(x, op.widths(x.ndim - 1), op.value, ops.xp), None


def pad_backward(op, ops, s, saved, rule, K, in_shapes):
    return (_pad_crop(s, [(-a, -b) for a, b in op.widths(s.ndim - 1)], 0.0, ops.xp),)


# ---- nonlinearities other than ReLU: their derivative at the forward point ---------------------------------

def _sigmoid(x, xp):
    return 0.5 + 0.5 * xp.tanh(0.5 * x)


def activation_value(op: L.Activation, ops, x):
    xp, k = ops.xp, op.kind
    if k == "hardtanh":
        return xp.clip(x, op["min_val"], op["max_val"])
    if k == "leaky_relu":
        return xp.where(x > 0, x, x * op["negative_slope"])
    if k == "elu":
        return xp.where(x > 0, x, op["alpha"] * xp.expm1(xp.minimum(x, 0)))
    if k == "sigmoid":
        return _sigmoid(x, xp)
    if k == "tanh":
        return xp.tanh(x)
    if k == "silu":
        return x * _sigmoid(x, xp)
    if k == "hardswish":
        return x * xp.clip(x + 3, 0, 6) / 6
    if k == "hardsigmoid":
        return xp.clip(x + 3, 0, 6) / 6
    if k == "mish":
        return x * xp.tanh(xp.logaddexp(0, x))
    if op["approximate"] == "tanh":  # gelu
        return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + ops.erf(x / math.sqrt(2)))


def activation_derivative(op: L.Activation, ops, x):
    """d activation / dx at x, with autograd's value at the kinks (torch's backward formulas)."""
    xp, k = ops.xp, op.kind
    one, zero = xp.ones_like(x), xp.zeros_like(x)
    if k == "hardtanh":
        return xp.where((x > op["min_val"]) & (x < op["max_val"]), one, zero)
    if k == "leaky_relu":
        return xp.where(x > 0, one, one * op["negative_slope"])
    if k == "elu":
        return xp.where(x > 0, one, op["alpha"] * xp.exp(xp.minimum(x, 0)))
    if k == "sigmoid":
        y = _sigmoid(x, xp)
        return y * (1 - y)
    if k == "tanh":
        y = xp.tanh(x)
        return 1 - y * y
    if k == "silu":
        y = _sigmoid(x, xp)
        return y * (1 + x * (1 - y))
    if k == "hardswish":
        return xp.where(x < -3, zero, xp.where(x <= 3, x / 3 + 0.5, one))
    if k == "hardsigmoid":
        return xp.where((x > -3) & (x < 3), one / 6, zero)
    if k == "mish":
        t = xp.tanh(xp.logaddexp(0, x))
        return t + x * _sigmoid(x, xp) * (1 - t * t)
    if op["approximate"] == "tanh":
        beta, kappa = math.sqrt(2 / math.pi), 0.044715
        t = xp.tanh(beta * (x + kappa * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * beta * (1 + 3 * kappa * x * x)
    return 0.5 * (1 + ops.erf(x / math.sqrt(2))) + x * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def activation_forward(op, ops, x):
    return activation_value(op, ops, x), (x > 0 if op.relu_rule else x)


def activation_backward(op, ops, s, saved, rule, K, in_shapes):
    if op.relu_rule:  # the user asked for the ReLU rule at ReLU6 / LeakyReLU
        return (relu_step(s, saved, rule, K, ops.xp),)
    return (_per_image(s, activation_derivative(op, ops, saved), K, lambda u, d: u * d),)


def _layer_norm_parts(op: L.LayerNorm, x, xp):
    axes = tuple(range(x.ndim - len(op.normalized_shape), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    rstd = 1 / xp.sqrt((centred * centred).mean(axis=axes, keepdims=True) + op.eps)
    return axes, centred * rstd, rstd


def layer_norm_forward(op: L.LayerNorm, ops, x):
    _, y, _ = _layer_norm_parts(op, x, ops.xp)
    return _scale_shift(y, op.weight, op.bias, ops), x


def layer_norm_backward(op, ops, s, x, rule, K, in_shapes):
    axes, xhat, rstd = _layer_norm_parts(op, x, ops.xp)
    g = s if op.weight is None else s * ops.const(op.weight, s)
    kaxes = tuple(a + 1 for a in axes)

    def step(g, parts):
        xhat, rstd = parts[..., 0], parts[..., 1]
        return rstd * (g - g.mean(axis=kaxes, keepdims=True) - xhat * (g * xhat).mean(axis=kaxes, keepdims=True))

    parts = ops.xp.stack([xhat, ops.xp.broadcast_to(rstd, xhat.shape)], axis=-1)
    return (_per_image(g, parts, K, step),)


FORWARD = {
    L.Conv: conv_forward, L.ReLU: relu_forward, L.MaxPool: max_pool_forward, L.AvgPool: avg_pool_forward,
    L.AdaptiveAvgPool: adaptive_forward, L.Affine: affine_forward, L.Linear: linear_forward,
    L.Reduce: reduce_forward, L.Add: add_forward, L.Mul: mul_forward, L.Div: div_forward, L.Cat: cat_forward,
    L.Slice: slice_forward, L.Reshape: reshape_forward, L.Permute: permute_forward, L.Expand: expand_forward,
    L.Pad: pad_forward, L.Activation: activation_forward, L.LayerNorm: layer_norm_forward,
}
BACKWARD = {
    L.Conv: conv_backward, L.ReLU: relu_backward, L.MaxPool: max_pool_backward, L.AvgPool: avg_pool_backward,
    L.AdaptiveAvgPool: adaptive_backward, L.Affine: affine_backward, L.Linear: linear_backward,
    L.Reduce: reduce_backward, L.Add: add_backward, L.Mul: mul_backward, L.Div: div_backward,
    L.Cat: cat_backward, L.Slice: slice_backward, L.Reshape: reshape_backward, L.Permute: permute_backward,
    L.Expand: expand_backward, L.Pad: pad_backward, L.Activation: activation_backward,
    L.LayerNorm: layer_norm_backward,
}
assert set(FORWARD) == set(BACKWARD) == set(L.LAYER_TYPES)
