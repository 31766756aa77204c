"""A :class:`~clearmaps.reference.Network` run with torch's own kernels: the one torch forward pass of the
package (``clearmaps.torch.explain``, the check of every conversion, the quick classification of many
images in ``clearmaps.paper``).

``F.max_pool2d(..., return_indices=True)`` gives exactly the paper's switches (the flat index into the
unpadded input plane of each window's first maximum), so a trace recorded here feeds any backend's
back-projection.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from .reference import Network
from .reference import layers as L
from .reference.network import IMAGE

_WEIGHTS: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def weights(net: Network, device, dtype) -> list:
    """Every layer's arrays as torch tensors on ``device`` in ``dtype`` ({field: tensor} per layer), made
    once per (network, device, dtype): a forward pass then copies no weight."""
    per_net = _WEIGHTS.setdefault(net, {})
    key = (str(device), dtype)
    if key not in per_net:
        per_net[key] = [{f.name: torch.tensor(np.asarray(getattr(layer, f.name)), dtype=dtype,
                                                 device=device)
                         for f in dataclasses.fields(layer)
                         if isinstance(getattr(layer, f.name), np.ndarray)} for layer in net.layers]
    return per_net[key]


def _activation(layer: L.Activation, x):
    k, p = layer.kind, dict(layer.params)
    if k == "hardtanh":
        return F.hardtanh(x, p["min_val"], p["max_val"])
    if k == "leaky_relu":
        return F.leaky_relu(x, p["negative_slope"])
    if k == "elu":
        return F.elu(x, p["alpha"])
    if k == "gelu":
        return F.gelu(x, approximate=p["approximate"])
    return {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "hardswish": F.hardswish,
            "hardsigmoid": F.hardsigmoid, "mish": F.mish}[k](x)


def _step(layer, w, xs):
    """(output, what the way back needs or None) of one layer, as the reference's rules keep it."""
    x = xs[0]
    if isinstance(layer, L.Conv):
        return F.conv2d(x, w["weight"], w["bias"], layer.stride, layer.padding, layer.dilation, layer.groups), None
    if isinstance(layer, L.ReLU):
        return F.relu(x), x > 0
    if isinstance(layer, L.MaxPool):
        return F.max_pool2d(x, layer.kernel, layer.stride, layer.padding, layer.dilation, layer.ceil_mode,
                            return_indices=True)
    if isinstance(layer, L.AvgPool):
        return F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding, layer.ceil_mode, layer.count_include_pad,
                            layer.divisor_override), None
    if isinstance(layer, L.AdaptiveAvgPool):
        return F.adaptive_avg_pool2d(x, layer.resolved(tuple(x.shape[2:]))), None
    if isinstance(layer, L.Activation):
        return _activation(layer, x), (x > 0 if layer.relu_rule else x)
    if isinstance(layer, L.Affine):
        if "scale" in w:
            x = x * w["scale"]
        return (x + w["shift"] if "shift" in w else x), None
    if isinstance(layer, L.Linear):
        return F.linear(x, w["weight"], w.get("bias")), None
    if isinstance(layer, L.Reduce):
        f = torch.mean if layer.kind == "mean" else torch.sum
        return f(x, dim=layer.dims, keepdim=layer.keepdim), None
    if isinstance(layer, L.Add):
        a, b = layer.alpha
        return (xs[0] if a == 1 else xs[0] * a) + (xs[1] if b == 1 else xs[1] * b), None
    if isinstance(layer, L.Mul):
        return xs[0] * xs[1], (xs[0], xs[1])
    if isinstance(layer, L.Div):
        return xs[0] / xs[1], (xs[0], xs[1])
    if isinstance(layer, L.Cat):
        return torch.cat(xs, dim=layer.dim), None
    if isinstance(layer, L.Slice):
        index = [slice(None)] * x.ndim
        index[layer.dim] = slice(layer.start, layer.stop, layer.step)
        return x[tuple(index)], None
    if isinstance(layer, L.Reshape):
        return x.reshape(x.shape[0], *layer.shape), None
    if isinstance(layer, L.Permute):
        return x.permute(0, *layer.perm), None
    if isinstance(layer, L.Expand):
        return x.expand(x.shape[0], *layer.shape), None
    if isinstance(layer, L.Pad):
        return F.pad(x, layer.pad, value=layer.value), None
    if isinstance(layer, L.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, w.get("weight"), w.get("bias"), layer.eps), x
    raise TypeError(f"no torch step for {layer!r}")  # every type of reference.layers has one above


def run(net: Network, x: torch.Tensor, record: bool = True):
    """Run ``net`` on the tensor ``x`` (B, C, H, W) with torch's kernels (no autograd).

    Returns (z_L (B, N, h, w), switches {MaxPool node: int64 (B, C, oh, ow)}, saved {node: what its way back
    needs, as :func:`clearmaps.reference.forward` keeps it}, per-image output shape of every node). With
    ``record=False`` only z_L is kept (switches and saved stay empty).
    """
    params = weights(net, x.device, x.dtype)
    consumers = {}
    for ins in net.inputs:
        for j in ins:
            consumers[j] = consumers.get(j, 0) + 1
    last = len(net.layers) - 1
    values, switches, saved, shapes = {IMAGE: x}, {}, {}, []
    with torch.no_grad():
        for i, (layer, ins) in enumerate(zip(net.layers, net.inputs)):
            y, keep = _step(layer, params[i], [values[j] for j in ins])
            if record and keep is not None:
                (switches if isinstance(layer, L.MaxPool) else saved)[i] = keep
            shapes.append(tuple(int(n) for n in y.shape[1:]))
            values[i] = y
            for j in ins:
                consumers[j] -= 1
                if consumers[j] == 0 and j != last:
                    del values[j]
    return values[last], switches, saved, shapes


def logits(net: Network, x: torch.Tensor) -> torch.Tensor:
    """The logits (B, N): z_L averaged over its positions."""
    return run(net, x, record=False)[0].mean(dim=(2, 3))


def predict(net: Network, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class ids (int64 (B,)) of NumPy images ``x`` (B, C, H, W), in float32 batches on the CPU."""
    out = []
    for i in range(0, len(x), batch):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        out.append(logits(net, t).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)
