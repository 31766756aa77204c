"""The oracle for the oracle (DESIGN.md): R(x|c) as the input gradient of E_c = ½ Σ z_L[c]², computed by
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


def _run(net: Network, x: torch.Tensor) -> torch.Tensor:
    for layer in net.layers:
        if isinstance(layer, Conv):
            x = F.conv2d(x, torch.from_numpy(np.array(layer.weight, dtype=np.float64)),
                         torch.from_numpy(np.array(layer.bias, dtype=np.float64)), layer.stride, layer.padding)
        elif isinstance(layer, MaxPool):
            x = F.max_pool2d(x, layer.kernel, layer.stride, layer.padding)
        else:
            x = DeconvReLU.apply(x)
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
