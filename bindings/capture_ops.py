"""One handler per Core ATen operation that :mod:`clearmaps.capture` lowers to a clearmaps layer.

Each takes the lowering (its helpers: ``add`` a node, ``refuse`` with the operation's name and where it came
from, ``shape`` of an exported value, constants as arrays), the exported node and its arguments, already
mapped to lowered values: ("node", i) for a tensor of the image's computation, ("const", tensor) for weights,
plain Python values for the rest. It returns the lowered value of the node's output.
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import layers as L

A = torch.ops.aten


# ---- one handler per operator: (lowering, exported node, its arguments) → a value ---------------------------

def _rank(low, node):
    return len(low.shape(node)) + 1


def _unary(layer_of):
    def handler(low, node, x, *args, **kwargs):
        if not low.is_node(x):
            low.refuse(node, "applies to a constant only.")
        return low.add(layer_of(*args, **kwargs), [x[1]], node)
    return handler


def _identity(low, node, x, *args, **kwargs):
    return x


def _convolution(low, node, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        low.refuse(node, "is a transposed convolution, which classifiers do not have and clearmaps does not model.")
    if not (isinstance(w, tuple) and w[0] == "const") or (b is not None and b[0] != "const"):
        low.refuse(node, "convolves with weights computed from the image.")
    weight = low.const_array(w[1], node)
    if weight.ndim != 4:
        low.refuse(node, f"is a {weight.ndim - 2}-D convolution; clearmaps models 2-D convolutions.")
    bias = np.zeros(weight.shape[0]) if b is None else low.const_array(b[1], node)
    layer = L.Conv(weight, bias, tuple(stride), tuple(padding), tuple(dilation), int(groups))
    return low.add(layer, [x[1]], node, "conv")


def _batch_norm(low, node, x, w, b, mean, var, momentum, eps):
    rank = len(low.shape(node.args[0])) + 1
    channels = low.shape(node.args[0])[0]
    get = lambda t, default: default if t is None else low.const_array(t[1], node)  # noqa: E731
    scale = get(w, np.ones(channels)) / np.sqrt(get(var, np.ones(channels)) + eps)
    shift = get(b, np.zeros(channels)) - get(mean, np.zeros(channels)) * scale
    shape = (channels,) + (1,) * (rank - 2)
    out = low.add(L.Affine(scale.reshape(shape), shift.reshape(shape)), [x[1]], node, "batch_norm")
    return ("tuple", [out, None, None])


def _activation(kind, *names):
    def handler(low, node, x, *args, **kwargs):
        params = dict(zip(names, args))
        params.update({k: v for k, v in kwargs.items() if k in names})
        return low.add(L.Activation(kind, tuple(params.items())), [x[1]], node, kind)
    return handler


def _elu(low, node, x, alpha=1.0, scale=1.0, input_scale=1.0):
    if scale != 1 or input_scale != 1:
        low.refuse(node, "is an ELU with scale or input_scale other than 1 (SELU); not modelled.")
    return low.add(L.Activation("elu", (("alpha", float(alpha)),)), [x[1]], node, "elu")


def _max_pool(low, node, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    if len(kernel) == 1:
        kernel = tuple(kernel) * 2
    stride = tuple(stride) or tuple(kernel)
    pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    pool = low.add(L.MaxPool(tuple(kernel), pair(stride), pair(padding), pair(dilation), bool(ceil_mode)), [x[1]],
                   node, "max_pool")
    return ("tuple", [pool, None])


def _avg_pool(low, node, x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    stride = tuple(stride) or tuple(kernel)
    layer = L.AvgPool(pair(kernel), pair(stride), pair(padding), bool(ceil_mode), bool(count_include_pad),
                      divisor_override)
    return low.add(layer, [x[1]], node, "avg_pool")


def _adaptive(low, node, x, output_size):
    return low.add(L.AdaptiveAvgPool(tuple(output_size)), [x[1]], node, "adaptive_avg_pool")


def _reduce(kind):
    def handler(low, node, x, dims=None, keepdim=False, *, dtype=None):
        rank = len(low.shape(node.args[0])) + 1
        dims = list(range(rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        return low.add(L.Reduce(tuple(low.dim(d, rank, node) for d in dims), kind, bool(keepdim)), [x[1]], node, kind)
    return handler


def _binary(low, node, a, b, kind, alpha=1):
    rank = _rank(low, node)
    an, bn = low.is_node(a), low.is_node(b)
    if an and bn:
        if len(low.shape(node.args[0])) != len(low.shape(node.args[1])):
            low.refuse(node, "combines tensors of different ranks; broadcast them explicitly.")
        layer = {"add": L.Add((1.0, float(alpha))), "sub": L.Add((1.0, -float(alpha))), "mul": L.Mul(),
                 "div": L.Div()}[kind]
        return low.add(layer, [a[1], b[1]], node, kind)
    x, c, node_first = (a, b, True) if an else (b, a, False)
    c = c[1] if isinstance(c, tuple) and c and c[0] == "const" else c
    value = low.per_image_const(c, rank, node) if isinstance(c, torch.Tensor) else np.float64(c)
    if kind == "add":
        layer = L.Affine(shift=value * alpha)
    elif kind == "sub":
        layer = L.Affine(shift=-value * alpha) if node_first else L.Affine(scale=np.float64(-alpha), shift=value)
    elif kind == "mul":
        layer = L.Affine(scale=value)
    elif node_first:
        layer = L.Affine(scale=1.0 / value)
    else:
        low.refuse(node, "divides a constant by a tensor; not modelled.")
    return low.add(layer, [x[1]], node, kind)


def _cat(low, node, tensors, dim=0):
    if not all(low.is_node(t) for t in tensors):
        low.refuse(node, "concatenates a constant with the image's values; not modelled.")
    rank = _rank(low, node)
    return low.add(L.Cat(low.dim(dim, rank, node)), [t[1] for t in tensors], node, "cat")


def _split(low, node, x, sizes, dim=0):
    rank = len(low.shape(node.args[0])) + 1
    d = low.dim(dim, rank, node)
    total = low.shape(node.args[0])[d - 1]
    if isinstance(sizes, int):  # split.Tensor: chunks of this size
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    starts = np.cumsum([0] + list(sizes))
    # each piece becomes a Slice when it is used (getitem), so unused pieces leave no node behind
    pieces = [lambda n, a=int(starts[i]), b=int(starts[i + 1]): low.add(L.Slice(d, a, b), [x[1]], n, "split")
              for i in range(len(sizes))]
    return ("tuple", pieces)


def _slice(low, node, x, dim=0, start=None, end=None, step=1):
    full = low.shape(node.args[0])
    rank = len(full) + 1
    d = dim + rank if dim < 0 else dim
    n = full[d - 1] if d else None
    start = 0 if start is None else start
    if d == 0:
        if start == 0 and (end is None or end >= 2 ** 62) and step == 1:
            return x
        low.refuse(node, "selects some images of the batch; clearmaps explains each image alone.")
    start = max(start + n if start < 0 else start, 0)
    end = n if end is None else min(end + n if end < 0 else end, n)
    if start == 0 and end == n and step == 1:
        return x
    return low.add(L.Slice(d, start, end, step), [x[1]], node, "slice")


def _select(low, node, x, dim, index):
    full = low.shape(node.args[0])
    rank = len(full) + 1
    d = low.dim(dim, rank, node)
    index = index + full[d - 1] if index < 0 else index
    piece = low.add(L.Slice(d, index, index + 1), [x[1]], node, "select")
    return low.add(L.Reshape(low.shape(node)), [piece[1]], node, "select")


def _reshape(low, node, x, *args, **kwargs):
    before, after = low.shape(node.args[0]), low.shape(node)
    if before == after:
        return x
    return low.add(L.Reshape(after), [x[1]], node, "reshape")


def _permute(low, node, x, dims):
    rank = len(dims)
    dims = [d + rank if d < 0 else d for d in dims]
    if dims[0] != 0:
        low.refuse(node, "moves the batch axis; clearmaps explains each image alone.")
    if dims == list(range(rank)):
        return x
    return low.add(L.Permute(tuple(dims[1:])), [x[1]], node, "permute")


def _expand(low, node, x, *args, **kwargs):
    before, after = low.shape(node.args[0]), low.shape(node)
    if before == after:
        return x
    return low.add(L.Expand(after), [x[1]], node, "expand")


def _as_strided(low, node, x, size, stride, offset=None):
    """An identity when it only restrides (a memory-format change after a pool): same sizes, and the strides
    of every axis longer than one are the input's own."""
    val = node.args[0].meta.get("val")
    same = isinstance(val, torch.Tensor) and low.shape(node.args[0]) == low.shape(node) and not offset
    if same:
        same = all(int(a) == int(b) for n, a, b in zip(val.shape[1:], stride[1:], val.stride()[1:]) if int(n) > 1)
    if not same:
        low.refuse(node, "reads its input through arbitrary strides; not modelled.")
    return x


def _pad(low, node, x, pad, value=0.0):
    return low.add(L.Pad(tuple(pad), float(value)), [x[1]], node, "pad")


def _linear_like(low, node, x, w, b=None, transposed=False):
    if not (low.is_node(x) and isinstance(w, tuple) and w[0] == "const") or (b is not None and b[0] != "const"):
        low.refuse(node, "multiplies by weights computed from the image; not modelled.")
    weight = low.const_array(w[1], node)
    weight = weight.T if transposed else weight
    bias = None if b is None else low.const_array(b[1], node)
    if bias is not None and bias.shape != (weight.shape[0],):
        bias = np.broadcast_to(bias, (weight.shape[0],)).copy()
    return low.add(L.Linear(weight, bias), [x[1]], node, "linear")


def _addmm(low, node, bias, x, w, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        low.refuse(node, "is an addmm with beta or alpha other than 1; not modelled.")
    return _linear_like(low, node, x, w, bias, transposed=True)


def _mm(low, node, x, w):
    return _linear_like(low, node, x, w, None, transposed=True)


def _layer_norm(low, node, x, shape, w, b, eps):
    get = lambda t: None if t is None else low.const_array(t[1], node)  # noqa: E731
    out = low.add(L.LayerNorm(tuple(shape), get(w), get(b), float(eps)), [x[1]], node, "layer_norm")
    return ("tuple", [out, None, None])


def _softmax(kind):
    def handler(low, node, x, dim, *args):
        rank = _rank(low, node)
        if dim not in (1, -1) or rank != 2:
            low.refuse(node, "is a softmax that is not over the classes of the output; not modelled.")
        return ("softmax", kind, x)
    return handler


def _dropout(low, node, x, p=0.5, train=False):
    if train:
        low.refuse(node, "is dropout in training mode; clearmaps captures modules in eval mode.")
    return x


def _to_copy(low, node, x, *args, dtype=None, **kwargs):
    if dtype is not None and dtype != node.args[0].meta["val"].dtype:
        low.refuse(node, f"converts to {dtype}; not modelled.")
    return x


HANDLERS = {
    A.convolution.default: _convolution,
    A._native_batch_norm_legit_no_training.default: _batch_norm,
    A.relu.default: _unary(L.ReLU),
    A.hardtanh.default: _activation("hardtanh", "min_val", "max_val"),
    A.leaky_relu.default: _activation("leaky_relu", "negative_slope"),
    A.elu.default: _elu,
    A.sigmoid.default: _activation("sigmoid"),
    A.tanh.default: _activation("tanh"),
    A.silu.default: _activation("silu"),
    A.hardswish.default: _activation("hardswish"),
    A.hardsigmoid.default: _activation("hardsigmoid"),
    A.mish.default: _activation("mish"),
    A.gelu.default: _activation("gelu", "approximate"),
    A.max_pool2d_with_indices.default: _max_pool,
    A.avg_pool2d.default: _avg_pool,
    A._adaptive_avg_pool2d.default: _adaptive,
    A.mean.dim: _reduce("mean"),
    A.sum.dim_IntList: _reduce("sum"),
    A.add.Tensor: lambda low, node, a, b, alpha=1: _binary(low, node, a, b, "add", alpha),
    A.sub.Tensor: lambda low, node, a, b, alpha=1: _binary(low, node, a, b, "sub", alpha),
    A.mul.Tensor: lambda low, node, a, b: _binary(low, node, a, b, "mul"),
    A.div.Tensor: lambda low, node, a, b: _binary(low, node, a, b, "div"),
    A.neg.default: lambda low, node, x: low.add(L.Affine(scale=np.float64(-1)), [x[1]], node, "neg"),
    A.cat.default: _cat,
    A.split_with_sizes.default: _split,
    A.split.Tensor: _split,
    A.slice.Tensor: _slice,
    A.select.int: _select,
    A.view.default: _reshape,
    A._unsafe_view.default: _reshape,
    A.reshape.default: _reshape,
    A.squeeze.dim: _reshape,
    A.squeeze.dims: _reshape,
    A.squeeze.default: _reshape,
    A.unsqueeze.default: _reshape,
    A.permute.default: _permute,
    A.expand.default: _expand,
    A.constant_pad_nd.default: _pad,
    A.as_strided.default: _as_strided,
    A.linear.default: _linear_like,
    A.addmm.default: _addmm,
    A.mm.default: _mm,
    A.native_layer_norm.default: _layer_norm,
    A._softmax.default: _softmax("softmax"),
    A._log_softmax.default: _softmax("log_softmax"),
    A.clone.default: _identity,
    A.alias.default: _identity,
    A.detach.default: _identity,
    A.lift_fresh_copy.default: _identity,
    A.dropout.default: _dropout,
    A._to_copy.default: _to_copy,
}
