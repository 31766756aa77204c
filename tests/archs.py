"""torchvision's classifiers, written again without torchvision, for the graph tests and benchmarks.

Issue 16 asks for CLEAR maps of the CNNs people actually use. torchvision itself cannot be a test dependency
(the package index's build does not import beside the CPU torch 2.13), so this module re-implements the 15
classifiers the issue names with the same module structure (torchvision's attribute names and module paths,
written from its source; loading a real torchvision state dict was not tried, torchvision being unavailable)
and, above all, the same forward code patterns, because those
are what a graph capture must cope with: ``F.relu`` inside ``forward``, in-place ReLUs, ``out += identity``,
``torch.cat``, ``chunk`` and the view/transpose channel shuffle, ``torch.flatten``, ``x.mean((2, 3))``,
``AdaptiveAvgPool2d(7)`` / ``(6)`` before an MLP, ceil-mode max pools, dropout, stochastic depth, squeeze-and-
excitation gates, channel-last LayerNorm and Linear layers.

Every builder takes ``num_classes`` plus a ``width`` (channel) and ``depth`` (repetition) scale; at
``width=1, depth=1`` it is torchvision's architecture and its parameter count for ``num_classes=1000`` is
torchvision's (each docstring states the number; ``tests/test_graph_oracle.py`` checks them on the meta
device). Small scales give the tiny versions the tests run in float64 on the CPU in seconds (``TINY``).

Weights are seeded and every normalisation is made non-trivial: batch norms get random affine parameters,
running statistics measured on a seeded random batch (so activations keep a sensible scale through deep
stacks, as in a trained network) and then perturbed, so that no batch norm is ever the identity; layer norms
get random affine parameters, ConvNeXt's layer scales are drawn from [0.2, 1] instead of 1e-6 (so its residual
branches matter), and every bias is drawn small but non-zero.

Registry: ``ARCHS`` (name -> builder), ``HEADS`` (name -> head declaration, read by ``tests/graph_oracle.py``
and ``bench/torch_graph.py``), ``PARAMS`` (torchvision's counts), ``TINY`` (tiny builder arguments and input
size), ``RELUS`` (how each architecture writes its ReLUs), and ``build`` / ``tiny`` / ``example_input``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from clearmaps.reference import ClearmapsError

# ---------------------------------------------------------------------------------------------------------
# shared building blocks (torchvision.ops.misc and friends, in our own words)


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, at least ``min_value`` (default ``divisor``),
    and never more than 10 % below ``value`` (the MobileNet / EfficientNet channel rule)."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _ch(channels: int, width: float) -> int:
    """A channel count scaled by ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


def _reps(count: int, depth: float) -> int:
    """A repetition count scaled by ``depth`` (at least 1)."""
    return max(1, int(round(count * depth)))


class Conv2dNormActivation(nn.Sequential):
    """Conv2d, then a norm layer, then an activation, as one Sequential (children "0", "1", "2")."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, norm_layer=nn.BatchNorm2d,
                 activation_layer=nn.ReLU, dilation: int = 1, inplace: bool | None = True,
                 bias: bool | None = None):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer() if inplace is None else activation_layer(inplace=inplace))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """x times a per-channel gate: GAP, 1x1 conv, activation, 1x1 conv, gate activation (sigmoid or
    hardsigmoid)."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x: Tensor) -> Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x)
        return scale * x


class StochasticDepth(nn.Module):
    """Drops whole residual branches ("row": per image) with probability ``p`` while training; the
    identity in eval mode, which is the mode every explanation runs in."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        if not 0.0 <= p <= 1.0 or mode not in ("row", "batch"):
            raise ClearmapsError(f"StochasticDepth(p={p}, mode={mode!r}); expected 0 <= p <= 1 and mode "
                                 "'row' or 'batch'.")
        self.p, self.mode = p, mode

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return x * noise


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (permuted to channel-last and back)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


# ---------------------------------------------------------------------------------------------------------
# AlexNet and VGG: convs, ReLU modules, max pools, an adaptive average pool to a fixed size, an MLP


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        c = [_ch(n, width) for n in (64, 192, 384, 256, 256)]
        hidden = _ch(4096, width)
        self.features = nn.Sequential(
            nn.Conv2d(3, c[0], kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c[0], c[1], kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(c[4] * 6 * 6, hidden), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


_VGG_CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: str, batch_norm: bool, num_classes: int = 1000, width: float = 1.0,
                 dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG_CFGS[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _ch(v, width)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        hidden = _ch(4096, width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------------
# ResNet: one ReLU module used several times per block, `out += identity`, downsampling shortcuts


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        self.inplanes = _ch(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, _ch(64, width), layers[0])
        self.layer2 = self._make_layer(block, _ch(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, _ch(256, width), layers[2], stride=2)
        self.layer4 = self._make_layer(block, _ch(512, width), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_ch(512, width) * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------------
# SqueezeNet 1.0: fire modules (torch.cat of two expand branches), ceil-mode pools, a conv + ReLU class map


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.0. Fire(in, squeeze, expand1x1, expand3x3); every count scales with ``width``."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        w = partial(_ch, width=width)
        stem = w(96)
        fires = [(16, 64, 64), (16, 64, 64), (32, 128, 128), "M", (32, 128, 128), (48, 192, 192),
                 (48, 192, 192), (64, 256, 256), "M", (64, 256, 256)]
        layers: list[nn.Module] = [nn.Conv2d(3, stem, kernel_size=7, stride=2), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)]
        channels = stem
        for f in fires:
            if f == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
                continue
            s, e1, e3 = (w(n) for n in f)
            layers.append(Fire(channels, s, e1, e3))
            channels = e1 + e3
        self.num_classes = num_classes
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


# ---------------------------------------------------------------------------------------------------------
# MobileNet V2 (inverted residuals, ReLU6, `x + self.conv(x)`) and V3 small (hardswish, hardsigmoid SE)


class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """``width`` is torchvision's width_mult; below 1 it also scales the last 1280-channel conv (torchvision
    keeps that at 1280 for every width_mult ≤ 1; scaling it keeps the tiny test models tiny)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2,
                 round_nearest: int = 8):
        super().__init__()
        norm_layer = nn.BatchNorm2d
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                   [6, 160, 3, 2], [6, 320, 1, 1]]
        input_channel = make_divisible(32 * width, round_nearest)
        self.last_channel = make_divisible(1280 * width, round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2, norm_layer=norm_layer,
                                                          activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width, round_nearest)
            for i in range(_reps(n, depth)):
                features.append(InvertedResidualV2(input_channel, output_channel, s if i == 0 else 1, t,
                                                   norm_layer=norm_layer))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


@dataclass
class _V3Block:
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int


class InvertedResidualV3(nn.Module):
    def __init__(self, cnf: _V3Block, norm_layer):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel,
                                           stride=cnf.stride, groups=cnf.expanded_channels,
                                           norm_layer=norm_layer, activation_layer=activation_layer))
        if cnf.use_se:
            squeeze_channels = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels,
                                            scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3Small(nn.Module):
    """``width`` is torchvision's width_mult; ``depth`` scales each run of blocks with the same output
    channels (keeping the first, strided one)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2):
        super().__init__()
        adjust = partial(lambda c, w: make_divisible(c * w, 8), w=width)
        # (input, kernel, expanded, out, SE, hardswish, stride)
        table = [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
                 (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
                 (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
                 (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
                 (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
                 (96, 5, 576, 96, True, True, 1)]
        runs: list[list[tuple]] = []
        for row in table:
            if runs and runs[-1][0][3] == row[3]:
                runs[-1].append(row)
            else:
                runs.append([row])
        kept = [row for run in runs for row in run[:_reps(len(run), depth)]]
        blocks = []
        prev_out = None
        for c_in, k, exp, c_out, se, hs, s in kept:
            c_in = adjust(c_in) if prev_out is None else prev_out
            blocks.append(_V3Block(c_in, k, adjust(exp), adjust(c_out), se, hs, s))
            prev_out = adjust(c_out)
        last_channel = adjust(1024)
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [Conv2dNormActivation(3, blocks[0].input_channels, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer, activation_layer=nn.Hardswish)]
        layers += [InvertedResidualV3(cnf, norm_layer) for cnf in blocks]
        lastconv_input = blocks[-1].out_channels
        lastconv_output = 6 * lastconv_input
        layers.append(Conv2dNormActivation(lastconv_input, lastconv_output, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output, last_channel), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------------
# DenseNet: BN-ReLU-conv layers over a growing torch.cat, transitions with an average pool, and a functional
# F.relu + F.adaptive_avg_pool2d head


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated)))

    def forward(self, x) -> Tensor:
        prev_features = [x] if isinstance(x, Tensor) else x
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                              bn_size, drop_rate))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, num_features, bn_size,
                                                                       growth_rate, drop_rate))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# ---------------------------------------------------------------------------------------------------------
# GoogLeNet: conv + BN + functional F.relu units, four-branch inception modules, ceil-mode pools


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision's "5x5" branch is a 3x3 conv (kept for its pretrained weights); so is this one
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class GoogLeNet(nn.Module):
    """GoogLeNet without the auxiliary classifiers (torchvision drops them in eval mode and from its
    pretrained model) and without transform_input."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        w = partial(_ch, width=width)

        def inception(c_in, *counts):
            return Inception(c_in, *(w(c) for c in counts))

        self.conv1 = BasicConv2d(3, w(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(w(64), w(64), kernel_size=1)
        self.conv3 = BasicConv2d(w(64), w(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = inception(w(192), 64, 96, 128, 16, 32, 32)
        self.inception3b = inception(self.inception3a.out_channels, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inception(self.inception3b.out_channels, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception(self.inception4a.out_channels, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception(self.inception4b.out_channels, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception(self.inception4c.out_channels, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception(self.inception4d.out_channels, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inception(self.inception4e.out_channels, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception(self.inception5a.out_channels, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01 if isinstance(m, nn.Linear) else 0.1,
                                      a=-2, b=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.maxpool2(x)
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------------
# ShuffleNet V2: chunk into two halves, depthwise convs, torch.cat, view/transpose channel shuffle, x.mean


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


def _depthwise_conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                    bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=bias, groups=c_in)


class ShuffleUnit(nn.Module):
    """torchvision's shufflenetv2.InvertedResidual."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        if stride not in (1, 2) or oup % 2 or (stride == 1 and inp != oup):
            raise ClearmapsError(f"ShuffleUnit({inp}, {oup}, stride={stride}); expected stride 1 or 2, an even "
                                 "oup, and inp == oup for stride 1.")
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise_conv(inp, inp, kernel_size=3, stride=stride, padding=1), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, kernel_size=1, stride=1,
                      padding=0, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            _depthwise_conv(branch_features, branch_features, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats: list[int], stages_out_channels: list[int], num_classes: int = 1000):
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, output_channels in zip(("stage2", "stage3", "stage4"), stages_repeats,
                                                  stages_out_channels[1:]):
            seq = [ShuffleUnit(input_channels, output_channels, 2)]
            seq += [ShuffleUnit(output_channels, output_channels, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # global average pool
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------------
# EfficientNet B0: SiLU, SE with sigmoid, stochastic depth (identity in eval), `result += input`


@dataclass
class _MBConvConfig:
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


class MBConv(nn.Module):
    def __init__(self, cnf: _MBConvConfig, stochastic_depth_prob: float, norm_layer):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.SiLU
        expanded = make_divisible(cnf.input_channels * cnf.expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=cnf.kernel, stride=cnf.stride,
                                           groups=expanded, norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        squeeze_channels = max(1, cnf.input_channels // 4)
        layers.append(SqueezeExcitation(expanded, squeeze_channels, activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    """EfficientNet (V1 blocks); ``width`` / ``depth`` are EfficientNet's own width_mult / depth_mult."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2):
        super().__init__()
        adjust = partial(lambda c, w: make_divisible(c * w, 8), w=width)
        base = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
        setting = [_MBConvConfig(e, k, s, adjust(i), adjust(o), int(math.ceil(n * depth)))
                   for e, k, s, i, o, n in base]
        norm_layer = nn.BatchNorm2d
        layers: list[nn.Module] = [Conv2dNormActivation(3, setting[0].input_channels, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer, activation_layer=nn.SiLU)]
        total_blocks = sum(cnf.num_layers for cnf in setting)
        block_id = 0
        for cnf in setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = _MBConvConfig(**vars(cnf))
                if stage:
                    block_cnf.input_channels, block_cnf.stride = block_cnf.out_channels, 1
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                stage.append(MBConv(block_cnf, sd_prob, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        lastconv_input = setting[-1].out_channels
        lastconv_output = 4 * lastconv_input
        layers.append(Conv2dNormActivation(lastconv_input, lastconv_output, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(lastconv_output, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------------
# RegNet X: grouped 3x3 convs in residual bottlenecks, `x = self.proj(x) + self.f(x)`


class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in: int, width_out: int, stride: int, norm_layer, activation_layer,
                 group_width: int, bottleneck_multiplier: float):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        groups = w_b // group_width
        layers["a"] = Conv2dNormActivation(width_in, w_b, kernel_size=1, stride=1, norm_layer=norm_layer,
                                           activation_layer=activation_layer)
        layers["b"] = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=groups,
                                           norm_layer=norm_layer, activation_layer=activation_layer)
        layers["c"] = Conv2dNormActivation(w_b, width_out, kernel_size=1, stride=1, norm_layer=norm_layer,
                                           activation_layer=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int, stride: int, norm_layer, activation_layer,
                 group_width: int = 1, bottleneck_multiplier: float = 1.0):
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride,
                                             norm_layer=norm_layer, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, norm_layer, activation_layer, group_width,
                                     bottleneck_multiplier)
        self.activation = activation_layer(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


def regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> list[tuple[int, int, int]]:
    """(width, blocks, group width) per stage of a RegNet from its design-space parameters (Radosavovic et
    al. 2020): block j has width w_0 * w_m^round(log((w_0 + j w_a) / w_0) / log w_m), quantised to multiples
    of 8; runs of equal width form a stage; each stage width is made a multiple of its group width. The
    arithmetic is float32, as torchvision's, so that the rounding lands where it does there."""
    cont = torch.arange(depth, dtype=torch.float32, device="cpu") * w_a + w_0
    capacity = torch.round(torch.log(cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), 8)) * 8).int().tolist()
    runs: list[list[int]] = []
    for w in block_widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    stages = []
    for w, d in runs:
        g = min(group_width, w)
        stages.append((make_divisible(w, g), d, g))
    return stages


class RegNet(nn.Module):
    def __init__(self, stages: list[tuple[int, int, int]], num_classes: int = 1000, stem_width: int = 32):
        super().__init__()
        norm_layer = partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1)
        activation = nn.ReLU
        self.stem = Conv2dNormActivation(3, stem_width, kernel_size=3, stride=2, norm_layer=norm_layer,
                                         activation_layer=activation)
        current = stem_width
        blocks = []
        for i, (width_out, depth, group_width) in enumerate(stages):
            stage = nn.Sequential()
            for j in range(depth):
                stage.add_module(f"block{i + 1}-{j}", ResBottleneckBlock(
                    current if j == 0 else width_out, width_out, 2 if j == 0 else 1, norm_layer, activation,
                    group_width, 1.0))
            blocks.append((f"block{i + 1}", stage))
            current = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_features=current, out_features=num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------------
# ConvNeXt: depthwise 7x7, permute to channel-last, LayerNorm, Linear, GELU, Linear, layer scale, and a
# LayerNorm2d between the global pool and the classifier


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float, norm_layer):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            norm_layer(dim),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: Tensor) -> Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims: list[int], depths: list[int], num_classes: int = 1000,
                 stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6):
        super().__init__()
        norm2d = partial(LayerNorm2d, eps=1e-6)
        block_norm = partial(nn.LayerNorm, eps=1e-6)
        layers: list[nn.Module] = [Conv2dNormActivation(3, dims[0], kernel_size=4, stride=4, padding=0,
                                                        norm_layer=norm2d, activation_layer=None, bias=True)]
        total = sum(depths)
        block_id = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * block_id / (total - 1.0) if total > 1 else 0.0
                stage.append(CNBlock(dim, layer_scale, sd_prob, block_norm))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm2d(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------------
# seeded, non-trivial weights


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _randomise_(model: nn.Module) -> None:
    """Biases ~10 % of a unit-input output's scale, random norm affines and layer scales (global RNG, which
    the caller has seeded)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.bias, 0.0, 0.1 * float(m.weight.detach().std()) * math.sqrt(fan_in) + 1e-3)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
        elif isinstance(m, CNBlock):
            nn.init.uniform_(m.layer_scale, 0.2, 1.0)


@torch.no_grad()
def _calibrate_batch_norms_(model: nn.Module, size: tuple[int, int, int]) -> None:
    """Running statistics measured on a random batch (every other module in eval mode), then perturbed: the
    mean by ±0.2 standard deviations, the variance by a factor in [0.6, 1.5], so that no batch norm is the
    identity and none is exactly the batch's own normalisation either."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
        m.train()
    model(torch.randn(4, *size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()
        m.running_mean += 0.2 * torch.randn_like(m.running_mean) * m.running_var.sqrt()
        m.running_var *= torch.empty_like(m.running_var).uniform_(0.6, 1.5)


def _seeded(make: Callable[[], nn.Module], seed: int | None, calibration_size=(3, 64, 64)) -> nn.Module:
    """Build under ``seed`` without touching the caller's RNG; make every norm non-trivial; eval mode.
    ``seed=None`` keeps the architecture's plain initialisation (and the caller's RNG). On the meta device
    only the structure is built."""
    if seed is None:
        return make().eval()
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ClearmapsError(f"seed={seed!r}; expected an int (or None for the plain initialisation).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        if not _is_meta(model):
            _randomise_(model)
            _calibrate_batch_norms_(model, calibration_size)
    return model.eval()


def _check_scales(name: str, num_classes, width, depth) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ClearmapsError(f"{name}: num_classes={num_classes!r}; expected a positive int.")
    for what, v in (("width", width), ("depth", depth)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 4:
            raise ClearmapsError(f"{name}: {what}={v!r}; expected a number in (0, 4] (1 is torchvision's size).")


# ---------------------------------------------------------------------------------------------------------
# builders: builder(num_classes=1000, width=1.0, depth=1.0, seed=0) -> eval-mode nn.Module


def alexnet(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """AlexNet (torchvision's one-GPU variant). 61,100,840 parameters at width 1, 1000 classes, as
    torchvision's. ``depth`` has no effect (fixed layer count)."""
    _check_scales("alexnet", num_classes, width, depth)
    return _seeded(lambda: AlexNet(num_classes, width), seed)


def vgg11(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """VGG-11 (config A), no batch norm: 132,863,336 parameters as torchvision's. ``depth`` has no effect."""
    _check_scales("vgg11", num_classes, width, depth)
    return _seeded(lambda: VGG("A", False, num_classes, width), seed)


def vgg16(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """VGG-16 (config D), no batch norm: 138,357,544 parameters as torchvision's. ``depth`` has no effect."""
    _check_scales("vgg16", num_classes, width, depth)
    return _seeded(lambda: VGG("D", False, num_classes, width), seed)


def vgg16_bn(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """VGG-16 with batch norm after every conv: 138,365,992 parameters as torchvision's. ``depth`` has no
    effect."""
    _check_scales("vgg16_bn", num_classes, width, depth)
    return _seeded(lambda: VGG("D", True, num_classes, width), seed)


def resnet18(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """ResNet-18 (basic blocks [2, 2, 2, 2] scaled by ``depth``): 11,689,512 parameters as torchvision's."""
    _check_scales("resnet18", num_classes, width, depth)
    return _seeded(lambda: ResNet(BasicBlock, [_reps(n, depth) for n in (2, 2, 2, 2)], num_classes, width), seed)


def resnet50(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """ResNet-50 v1.5 (bottlenecks [3, 4, 6, 3] scaled by ``depth``): 25,557,032 parameters as
    torchvision's."""
    _check_scales("resnet50", num_classes, width, depth)
    return _seeded(lambda: ResNet(Bottleneck, [_reps(n, depth) for n in (3, 4, 6, 3)], num_classes, width), seed)


def squeezenet1_0(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                  seed: int | None = 0) -> nn.Module:
    """SqueezeNet 1.0: 1,248,424 parameters as torchvision's. ``depth`` has no effect."""
    _check_scales("squeezenet1_0", num_classes, width, depth)
    return _seeded(lambda: SqueezeNet(num_classes, width), seed)


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """MobileNet V2: 3,504,872 parameters as torchvision's (width_mult 1)."""
    _check_scales("mobilenet_v2", num_classes, width, depth)
    return _seeded(lambda: MobileNetV2(num_classes, width, depth), seed)


def mobilenet_v3_small(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                       seed: int | None = 0) -> nn.Module:
    """MobileNet V3 small: 2,542,856 parameters as torchvision's (width_mult 1)."""
    _check_scales("mobilenet_v3_small", num_classes, width, depth)
    return _seeded(lambda: MobileNetV3Small(num_classes, width, depth), seed)


def densenet121(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """DenseNet-121 (growth 32 and 64 initial features scaled by ``width``, blocks [6, 12, 24, 16] by
    ``depth``): 7,978,856 parameters as torchvision's."""
    _check_scales("densenet121", num_classes, width, depth)
    return _seeded(lambda: DenseNet(_ch(32, width), tuple(_reps(n, depth) for n in (6, 12, 24, 16)),
                                    _ch(64, width), num_classes=num_classes), seed)


def googlenet(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, seed: int | None = 0) -> nn.Module:
    """GoogLeNet without auxiliary heads: 6,624,904 parameters as torchvision's pretrained GoogLeNet
    (torchvision's constructor with aux_logits=True adds 6,379,984 for the two training-only heads).
    ``depth`` has no effect."""
    _check_scales("googlenet", num_classes, width, depth)
    return _seeded(lambda: GoogLeNet(num_classes, width), seed)


def shufflenet_v2_x0_5(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                       seed: int | None = 0) -> nn.Module:
    """ShuffleNet V2 x0.5 (stage channels [24, 48, 96, 192, 1024] scaled by ``width``, kept even; repeats
    [4, 8, 4] by ``depth``): 1,366,792 parameters as torchvision's."""
    _check_scales("shufflenet_v2_x0_5", num_classes, width, depth)
    channels = [max(2, 2 * int(round(c * width / 2))) for c in (24, 48, 96, 192)] + [_ch(1024, width)]
    return _seeded(lambda: ShuffleNetV2([_reps(n, depth) for n in (4, 8, 4)], channels, num_classes), seed)


def efficientnet_b0(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                    seed: int | None = 0) -> nn.Module:
    """EfficientNet-B0 (width_mult = depth_mult = 1): 5,288,548 parameters as torchvision's."""
    _check_scales("efficientnet_b0", num_classes, width, depth)
    return _seeded(lambda: EfficientNet(num_classes, width, depth), seed)


def regnet_x_400mf(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                   seed: int | None = 0) -> nn.Module:
    """RegNetX-400MF (depth 22, w_0 24, w_a 24.48, w_m 2.54, group width 16: stages of widths
    [32, 64, 160, 400], blocks [1, 2, 7, 12]): 5,495,976 parameters as torchvision's. ``width`` scales the
    group width and the stage widths (kept multiples of it) and the stem; ``depth`` the blocks per stage."""
    _check_scales("regnet_x_400mf", num_classes, width, depth)
    stages = []
    for w, d, g in regnet_stages(22, 24, 24.48, 2.54, 16):
        g2 = _ch(g, width)
        stages.append((max(g2, int(round(w * width / g2)) * g2), _reps(d, depth), g2))
    return _seeded(lambda: RegNet(stages, num_classes, stem_width=_ch(32, width)), seed)


def convnext_tiny(num_classes: int = 1000, width: float = 1.0, depth: float = 1.0,
                  seed: int | None = 0) -> nn.Module:
    """ConvNeXt-T (dims [96, 192, 384, 768] scaled by ``width``, blocks [3, 3, 9, 3] by ``depth``):
    28,589,128 parameters as torchvision's."""
    _check_scales("convnext_tiny", num_classes, width, depth)
    return _seeded(lambda: ConvNeXt([_ch(c, width) for c in (96, 192, 384, 768)],
                                    [_reps(n, depth) for n in (3, 3, 9, 3)], num_classes), seed)


# ---------------------------------------------------------------------------------------------------------
# the registry

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet, "vgg11": vgg11, "vgg16": vgg16, "vgg16_bn": vgg16_bn, "resnet18": resnet18,
    "resnet50": resnet50, "squeezenet1_0": squeezenet1_0, "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small, "densenet121": densenet121, "googlenet": googlenet,
    "shufflenet_v2_x0_5": shufflenet_v2_x0_5, "efficientnet_b0": efficientnet_b0,
    "regnet_x_400mf": regnet_x_400mf, "convnext_tiny": convnext_tiny,
}

# Where each architecture's class map z_L is (docs/design.md, "Networks as graphs"), declared by hand so that the
# oracle does not share the graph capture's answer:
#   ("logits",)                                      z_L = the model's output as (B, N, 1, 1): MLP heads
#   ("feature_map", module)                          z_L = that module's output (B, N, h, w)
#   ("linear_at_positions", linear, features[, op])  z_L = the Linear applied at every position of the
#        features module's output (bias included), after `op` ("relu") where forward applies it functionally
#        between that module and the global average pool
HEADS: dict[str, tuple] = {
    "alexnet": ("logits",),
    "vgg11": ("logits",),
    "vgg16": ("logits",),
    "vgg16_bn": ("logits",),
    "resnet18": ("linear_at_positions", "fc", "layer4"),
    "resnet50": ("linear_at_positions", "fc", "layer4"),
    "squeezenet1_0": ("feature_map", "classifier.2"),
    "mobilenet_v2": ("linear_at_positions", "classifier.1", "features"),
    "mobilenet_v3_small": ("logits",),
    "densenet121": ("linear_at_positions", "classifier", "features", "relu"),
    "googlenet": ("linear_at_positions", "fc", "inception5b"),
    "shufflenet_v2_x0_5": ("linear_at_positions", "fc", "conv5"),
    "efficientnet_b0": ("linear_at_positions", "classifier.1", "features"),
    "regnet_x_400mf": ("linear_at_positions", "fc", "trunk_output"),
    "convnext_tiny": ("logits",),
}

# torchvision's parameter counts for num_classes=1000 (its weights' "num_params"), matched at width = depth = 1
PARAMS: dict[str, int] = {
    "alexnet": 61_100_840, "vgg11": 132_863_336, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "resnet18": 11_689_512, "resnet50": 25_557_032, "squeezenet1_0": 1_248_424, "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856, "densenet121": 7_978_856, "googlenet": 6_624_904,
    "shufflenet_v2_x0_5": 1_366_792, "efficientnet_b0": 5_288_548, "regnet_x_400mf": 5_495_976,
    "convnext_tiny": 28_589_128,
}

# How the ReLUs are written. Captum's Deconvolution / GuidedBackprop override nn.ReLU modules only, so on
# "functional" and "mixed" architectures their maps differ from the deconvnet's definition.
#   module: nn.ReLU modules only; functional: F.relu in forward only; mixed: both; none: no ReLU (then the
#   deconvnet is the plain gradient). "relu6": ReLU6 modules (ReLU rule optional, see graph_oracle).
RELUS: dict[str, str] = {
    "alexnet": "module", "vgg11": "module", "vgg16": "module", "vgg16_bn": "module", "resnet18": "module",
    "resnet50": "module", "squeezenet1_0": "module", "mobilenet_v2": "relu6", "mobilenet_v3_small": "module",
    "densenet121": "mixed", "googlenet": "functional", "shufflenet_v2_x0_5": "module",
    "efficientnet_b0": "none", "regnet_x_400mf": "module", "convnext_tiny": "none",
}


@dataclass(frozen=True)
class Tiny:
    """A tiny version: builder arguments and the input size (C, H, W) the tests use."""

    width: float
    depth: float
    size: tuple[int, int, int]


TINY: dict[str, Tiny] = {
    "alexnet": Tiny(1 / 16, 1.0, (3, 64, 64)),   # the smallest input AlexNet's pools accept is 63 px
    "vgg11": Tiny(1 / 16, 1.0, (3, 32, 32)),
    "vgg16": Tiny(1 / 16, 1.0, (3, 32, 32)),
    "vgg16_bn": Tiny(1 / 16, 1.0, (3, 32, 32)),
    "resnet18": Tiny(1 / 8, 0.5, (3, 64, 64)),
    "resnet50": Tiny(1 / 8, 0.34, (3, 64, 64)),
    "squeezenet1_0": Tiny(1 / 8, 1.0, (3, 48, 48)),
    "mobilenet_v2": Tiny(0.25, 0.5, (3, 48, 48)),
    "mobilenet_v3_small": Tiny(0.25, 0.5, (3, 48, 48)),
    "densenet121": Tiny(1 / 8, 0.17, (3, 64, 64)),
    "googlenet": Tiny(1 / 16, 1.0, (3, 64, 64)),
    "shufflenet_v2_x0_5": Tiny(0.25, 0.25, (3, 64, 64)),
    "efficientnet_b0": Tiny(0.25, 0.2, (3, 48, 48)),
    "regnet_x_400mf": Tiny(1 / 8, 0.25, (3, 64, 64)),
    "convnext_tiny": Tiny(1 / 12, 1 / 3, (3, 64, 64)),
}

FULL_SIZE = (3, 224, 224)


def _check_name(name: str) -> None:
    if name not in ARCHS:
        raise ClearmapsError(f"unknown architecture {name!r}; expected one of {sorted(ARCHS)}.")


def build(name: str, num_classes: int = 1000, *, tiny: bool = False, seed: int | None = 0,
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """An architecture of the registry, seeded and in eval mode.

    Parameters
    ----------
    name : str
        A key of ``ARCHS``.
    num_classes : int
        Classes of the classifier.
    tiny : bool
        The tiny version of ``TINY[name]`` instead of torchvision's size.
    seed : int or None
        Seed of the weights and the non-trivial norms; None keeps the plain initialisation.
    dtype : torch.dtype
        float32 or float64.
    """
    _check_name(name)
    if dtype not in (torch.float32, torch.float64):
        raise ClearmapsError(f"dtype={dtype}; expected torch.float32 or torch.float64.")
    scales = {"width": TINY[name].width, "depth": TINY[name].depth} if tiny else {}
    return ARCHS[name](num_classes, seed=seed, **scales).to(dtype)


def example_input(name: str, batch: int = 2, *, tiny: bool = True, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """A seeded standard-normal batch of the size the architecture's tiny (or full) version takes."""
    _check_name(name)
    if not isinstance(batch, int) or batch < 1:
        raise ClearmapsError(f"batch={batch!r}; expected a positive int.")
    size = TINY[name].size if tiny else FULL_SIZE
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *size, generator=gen, dtype=dtype)


def count_parameters(name: str, num_classes: int = 1000, **scales) -> int:
    """The parameter count of ``ARCHS[name](num_classes, **scales)``, built on the meta device (no memory,
    no initialisation)."""
    _check_name(name)
    with torch.device("meta"):
        model = ARCHS[name](num_classes, seed=None, **scales)
    return sum(p.numel() for p in model.parameters())
