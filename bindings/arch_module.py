"""The torch module an architecture spec describes (:class:`SpecModule`), and its clearmaps layers.

:class:`SpecModule` lays out the layers of a spec checked by :func:`clearmaps.arch_spec.read_arch` under the
spec's names (so that its state-dict keys are the checkpoint's); :func:`spec_layers` turns it into the layers
of a :class:`clearmaps.Network`, folding batch norms into convs and a ``gap [flatten] linear`` head into a
1×1 conv.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .arch_spec import read_arch
from .reference import Affine, ClearmapsError, Conv, MaxPool, ReLU


def _module_for(layer: dict) -> nn.Module:
    kind = layer["type"]
    if kind == "conv":
        return nn.Conv2d(layer["in"], layer["out"], layer["kernel"], layer.get("stride", 1),
                         layer.get("padding", 0), bias=layer.get("bias", True))
    if kind == "batchnorm":
        return nn.BatchNorm2d(layer["channels"], eps=layer.get("eps", 1e-5))
    if kind == "relu":
        return nn.ReLU()
    if kind == "maxpool":
        return nn.MaxPool2d(layer["kernel"], layer.get("stride"), layer.get("padding", 0))
    if kind == "dropout":
        return nn.Dropout(layer.get("p", 0.5))
    if kind == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten()
    return nn.Linear(layer["in"], layer["out"], bias=layer.get("bias", True))


def _array(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy().copy()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def spec_layers(module: "SpecModule") -> list:
    """The clearmaps layers of a :class:`SpecModule`, in its spec's order: a batch norm right after a conv is
    folded into it (elsewhere it is a per-channel Affine), dropout is dropped, and a head ``gap [flatten]
    linear`` becomes a 1×1 head conv (exact: global averaging is linear); without a gap the last conv is the
    head (its map's average gives the logits)."""
    layers: list = []
    state = "body"  # body -> gap -> end
    for name, m in module.ordered():
        where = f"arch layer '{name}' ({type(m).__name__})"
        if isinstance(m, nn.Dropout):
            continue
        if state == "end":
            raise ClearmapsError(f"{where} comes after the head's Linear; nothing may follow it.")
        if state == "gap":
            if isinstance(m, nn.Flatten):
                continue
            if isinstance(m, nn.Linear):
                w = _array(m.weight)
                b = _array(m.bias) if m.bias is not None else np.zeros(w.shape[0])
                layers.append(Conv(w[:, :, None, None], b))
                state = "end"
                continue
            raise ClearmapsError(f"{where} follows the global average pool; only flatten, dropout and one linear "
                                 "may.")
        if isinstance(m, nn.Conv2d):
            b = _array(m.bias) if m.bias is not None else np.zeros(m.out_channels)
            layers.append(Conv(_array(m.weight), b, _pair(m.stride), _pair(m.padding)))
        elif isinstance(m, nn.BatchNorm2d):
            scale = 1.0 / np.sqrt(_array(m.running_var) + m.eps) * _array(m.weight)
            shift = _array(m.bias) - _array(m.running_mean) * scale
            if layers and isinstance(layers[-1], Conv):
                conv = layers[-1]
                layers[-1] = Conv(conv.weight * scale[:, None, None, None], conv.bias * scale + shift,
                                  conv.stride, conv.padding)
            else:
                layers.append(Affine(scale[:, None, None], shift[:, None, None]))
        elif isinstance(m, nn.ReLU):
            layers.append(ReLU())
        elif isinstance(m, nn.MaxPool2d):
            layers.append(MaxPool(_pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                                  _pair(m.padding)))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            state = "gap"
        elif isinstance(m, nn.Linear):
            raise ClearmapsError(f"{where} is not after a gap layer: an arch spec's linear layer is the head, after "
                                 "global average pooling (use clearmaps.from_torch for other classifiers).")
        else:  # flatten outside the head: read_arch lets it through, the network cannot use it
            raise ClearmapsError(f"{where} is only allowed between gap and linear.")
    return layers


class SpecModule(nn.Module):
    """A torch module built from an architecture spec: its state-dict keys follow the spec's names and its
    forward runs the layers in the spec's order, returning the logits (B, N)."""

    def __init__(self, arch):
        super().__init__()
        spec = read_arch(arch)
        self.spec = spec
        self._order = []
        for i, layer in enumerate(spec["layers"]):
            name = layer.get("name") or f"layer{i}"
            owner, parts = self, name.split(".")
            for part in parts[:-1]:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if parts[-1] in owner._modules:
                raise ClearmapsError(f"arch layer {i} reuses the name {name!r}; names must be unique.")
            owner.add_module(parts[-1], _module_for(layer))
            self._order.append(name)

    def ordered(self):
        """(name, module) of every layer, in execution order."""
        return [(name, self.get_submodule(name)) for name in self._order]

    def forward(self, x):
        for _, m in self.ordered():
            x = m(x)
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)


def build_module(arch) -> SpecModule:
    """A randomly initialised torch module for ``arch`` (preset name, JSON file or text, dict or list)."""
    return SpecModule(arch)
