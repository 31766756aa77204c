"""The oracle for graph Networks built directly (tests/graph_strategies.py): each node run with torch's own
functions in float64, autograd deriving every backward, and the ReLU rule put in by custom autograd
functions (docs/design.md, "Networks as graphs"). It shares no code with clearmaps: not the reference's
rules, not clearmaps' torch forward pass.

R(x|c) = ∂E_c/∂x, E_c = ½·Σ z_L[c]², z_L the last node's output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clearmaps.reference import layers as L


def _t(a):
    return None if a is None else torch.tensor(np.asarray(a, dtype=np.float64))


def _activation(layer, x):
    p = dict(layer.params)
    k = layer.kind
    if k == "hardtanh":
        return F.hardtanh(x, p["min_val"], p["max_val"])
    if k == "leaky_relu":
        return F.leaky_relu(x, p["negative_slope"])
    if k == "elu":
        return F.elu(x, p["alpha"])
    if k == "gelu":
        return F.gelu(x, approximate=p["approximate"])
    if k == "hardsigmoid":
        # torch's own hardsigmoid backward multiplies by 1/6 rounded to float32 even in float64 (a relative
        # error of 3e-8); the same function from exact pieces gets the exact derivative
        return F.hardtanh(x + 3, 0, 6) / 6
    return getattr(F, k)(x) if k != "sigmoid" and k != "tanh" else getattr(torch, k)(x)


def _node(layer, xs, rule):
    x = xs[0]
    if isinstance(layer, L.Conv):
        return F.conv2d(x, _t(layer.weight), _t(layer.bias), layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, L.ReLU) or (isinstance(layer, L.Activation) and layer.relu_rule):
        y = F.relu(x) if isinstance(layer, L.ReLU) else _activation(layer, x)
        # the value is the layer's own; only the way back follows the rule
        return _ruled(x, y, rule)
    if isinstance(layer, L.Activation):
        return _activation(layer, x)
    if isinstance(layer, L.MaxPool):
        return F.max_pool2d(x, layer.kernel, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
    if isinstance(layer, L.AvgPool):
        return F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding, layer.ceil_mode, layer.count_include_pad,
                            layer.divisor_override)
    if isinstance(layer, L.AdaptiveAvgPool):
        return F.adaptive_avg_pool2d(x, layer.resolved(tuple(x.shape[2:])))
    if isinstance(layer, L.Affine):
        return x * (1 if layer.scale is None else _t(layer.scale)) + (0 if layer.shift is None else _t(layer.shift))
    if isinstance(layer, L.Linear):
        return F.linear(x, _t(layer.weight), _t(layer.bias))
    if isinstance(layer, L.Reduce):
        return (x.mean if layer.kind == "mean" else x.sum)(dim=layer.dims, keepdim=layer.keepdim)
    if isinstance(layer, L.Add):
        return layer.alpha[0] * xs[0] + layer.alpha[1] * xs[1]
    if isinstance(layer, L.Mul):
        return xs[0] * xs[1]
    if isinstance(layer, L.Div):
        return xs[0] / xs[1]
    if isinstance(layer, L.Cat):
        return torch.cat(xs, layer.dim)
    if isinstance(layer, L.Slice):
        return x.narrow(layer.dim, layer.start, layer.stop - layer.start)[
            (slice(None),) * layer.dim + (slice(None, None, layer.step),)]
    if isinstance(layer, L.Reshape):
        return x.reshape(x.shape[0], *layer.shape)
    if isinstance(layer, L.Permute):
        return x.permute(0, *layer.perm)
    if isinstance(layer, L.Expand):
        return x.expand(x.shape[0], *layer.shape)
    if isinstance(layer, L.Pad):
        return F.pad(x, layer.pad, value=layer.value)
    if isinstance(layer, L.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, _t(layer.weight), _t(layer.bias), layer.eps)
    raise AssertionError(f"the oracle has no torch form for {layer!r}")


class _Ruled(torch.autograd.Function):
    """y = the layer's value, passed through; its backward is the ReLU rule at the layer's input x."""

    @staticmethod
    def forward(ctx, x, y, rule):
        ctx.save_for_backward(x)
        ctx.rule = rule
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        rule = ctx.rule
        if rule == "rectify":
            back = g.clamp(min=0)
        elif rule == "identity":
            back = g
        elif rule == "guided":
            back = g.clamp(min=0) * (x > 0)
        else:
            back = g * (x > 0)
        return back, None, None


def _ruled(x, y, rule):
    return _Ruled.apply(x, y.detach(), rule)


def run(net, x, rule="rectify"):
    """z_L of ``net`` on the float64 tensor x, every node by torch."""
    values = {-1: x}
    for i, (layer, ins) in enumerate(zip(net.layers, net.inputs)):
        values[i] = _node(layer, [values[j] for j in ins], rule)
    return values[len(net.layers) - 1]


def logits(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return run(net, torch.from_numpy(np.asarray(x, dtype=np.float64))).mean(dim=(2, 3)).numpy()


def responses(net, x: np.ndarray, classes, rule="rectify") -> np.ndarray:
    """R(x|c) for each class id in ``classes`` (the same for every image): float64 (B, K, C, H, W)."""
    out = []
    for c in classes:
        xt = torch.from_numpy(np.asarray(x, dtype=np.float64).copy()).requires_grad_(True)
        z = run(net, xt, rule)
        (grad,) = torch.autograd.grad(0.5 * (z[:, c] ** 2).sum(), xt)
        out.append(grad.numpy())
    return np.stack(out, axis=1)
