"""A Network run with torch's own operators: checks conversions against the original module."""

from __future__ import annotations

from .reference import Conv, MaxPool, Network


def network_logits(net: Network, x):
    """Logits of ``net`` on the torch tensor ``x`` (B, C, H, W), computed with torch.nn.functional."""
    import torch
    import torch.nn.functional as F

    for layer in net.layers:
        if isinstance(layer, Conv):
            x = F.conv2d(x, torch.tensor(layer.weight, dtype=x.dtype, device=x.device),
                         torch.tensor(layer.bias, dtype=x.dtype, device=x.device), layer.stride, layer.padding)
        elif isinstance(layer, MaxPool):
            x = F.max_pool2d(x, layer.kernel, layer.stride, layer.padding)
        else:
            x = torch.relu(x)
    return x.mean(dim=(2, 3))
