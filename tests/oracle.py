"""The oracle for the oracle (docs/design.md): R(x|c) as the input gradient of E_c = ½ Σ z_L[c]², computed by
torch autograd with every ReLU's backward replaced by ReLU of the incoming gradient.

Autograd's max-pool backward is switch unpooling (with torch's own switches), and a conv's input gradient
is the transposed conv, so this shares no code with clearmaps.reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clearmaps.reference import Conv, MaxPool, Network


class DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward passes relu(grad): the deconvnet's rectification (Zeiler & Fergus)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _layer(layer, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Conv):
        return F.conv2d(x, torch.from_numpy(np.array(layer.weight, dtype=np.float64)),
                        torch.from_numpy(np.array(layer.bias, dtype=np.float64)), layer.stride, layer.padding)
    if isinstance(layer, MaxPool):
        return F.max_pool2d(x, layer.kernel, layer.stride, layer.padding)
    return DeconvReLU.apply(x)


def _run(net: Network, x: torch.Tensor) -> torch.Tensor:
    for layer in net.layers:
        x = _layer(layer, x)
    return x


def torch_logits(net: Network, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _run(net, torch.from_numpy(np.asarray(x, dtype=np.float64))).mean(dim=(2, 3)).numpy()


def torch_responses(net: Network, x: np.ndarray, classes) -> np.ndarray:
    """R(x|c) for each class id in ``classes``: float64 (B, K, C, H, W)."""
    out = []
    for c in classes:
        xt = torch.from_numpy(np.asarray(x, dtype=np.float64).copy()).requires_grad_(True)
        z = _run(net, xt)
        energy = 0.5 * (z[:, c] ** 2).sum()  # images are independent, so one sum serves the batch
        (grad,) = torch.autograd.grad(energy, xt)
        out.append(grad.numpy())
    return np.stack(out, axis=1)


def torch_switches(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    _, idx = F.max_pool2d(torch.from_numpy(np.asarray(x, dtype=np.float64)), kernel, stride, padding,
                          return_indices=True)
    return idx.numpy()


def switch_flips(net: Network, x: np.ndarray, trace, margin: float = 1e-12) -> int:
    """How many of the reference trace's switches differ from those of torch's own float64 forward pass,
    after checking that every difference is a near-tie: the two positions' values, as the reference computed
    them, within ``margin`` × the layer input's largest |value|. Mathematically equal window values summed
    in a different order can round apart, and two correct libraries then pick different maxima; any other
    difference fails here."""
    ours = np.asarray(x, dtype=np.float64)
    theirs = torch.from_numpy(ours.copy())
    flips = 0
    for i, layer in enumerate(net.layers):
        if isinstance(layer, MaxPool):
            _, idx = F.max_pool2d(theirs, layer.kernel, layer.stride, layer.padding, return_indices=True)
            bad = trace.switches[i] != idx.numpy()
            if bad.any():
                B, C = ours.shape[:2]
                flat = ours.reshape(B, C, -1)
                b, c = np.nonzero(bad)[:2]
                gap = np.abs(flat[b, c, trace.switches[i][bad]] - flat[b, c, idx.numpy()[bad]])
                scale = np.abs(flat).max()
                assert (gap <= margin * scale).all(), (
                    f"layer {i}: switches differ from torch's where the values are not a near-tie "
                    f"(gaps {gap[gap > margin * scale][:5]}, scale {scale})")
                flips += int(bad.sum())
        with torch.no_grad():
            theirs = _layer(layer, theirs)
        ours = reference_layer(layer, ours)
    return flips


def reference_layer(layer, x: np.ndarray) -> np.ndarray:
    """One layer of the reference's forward pass (float64)."""
    from clearmaps import reference as ref

    if isinstance(layer, Conv):
        return ref.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    if isinstance(layer, MaxPool):
        return ref.max_pool_with_switches(x, layer.kernel, layer.stride, layer.padding)[0]
    return np.maximum(x, 0)
