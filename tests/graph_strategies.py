"""Hypothesis strategies: graph networks (DAGs) of every operation clearmaps models, and inputs for them.

A network is a stem conv, then 1–4 blocks drawn from the shapes CNNs are made of — a residual block (with a
strided 1×1 projection on the skip when it downsamples), a dense block (the input concatenated with a conv
of it), inception-style branches, a ShuffleNet unit (split, conv one half, concatenate, channel shuffle by
reshape / permute / reshape), a depthwise or dilated conv, a squeeze-and-excitation gate, a pool of any kind
(max with padding, dilation or ceil_mode; average with ceil_mode, count_include_pad or a divisor; adaptive),
an activation of any kind (each ReLU-like one with or without the ReLU rule), a per-channel affine map (an
eval-mode batch norm with random statistics that no conv absorbs), a constant pad, a layer norm over the
channels (via permutes) — then a head: a 1×1 class conv (with or without a ReLU), or an MLP on the pooled
features whose logits are the class map (N, 1, 1).

Weights are Gaussian, scaled so that signals stay of order one through the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from clearmaps.reference import layers as L
from clearmaps.reference import Network

ACTIVATION_KINDS = sorted(L.ACTIVATIONS)


@dataclass
class GraphCase:
    net: Network
    x: np.ndarray

    def __repr__(self) -> str:
        return f"GraphCase(x.shape={self.x.shape}, net=\n{self.net!r})"


class _Builder:
    def __init__(self, rng, channels, size):
        self.rng, self.layers, self.inputs, self.shapes = rng, [], [], []
        self.image = (channels, *size)

    def shape(self, i):
        return self.image if i == -1 else self.shapes[i]

    def add(self, layer, *ins):
        shape = layer.output_shape(*(self.shape(i) for i in ins))
        self.layers.append(layer)
        self.inputs.append(tuple(ins))
        self.shapes.append(tuple(shape))
        return len(self.layers) - 1

    def conv(self, i, out, k=3, stride=1, padding=None, dilation=1, groups=1, bias=True):
        c = self.shape(i)[0]
        padding = (dilation * (k - 1)) // 2 if padding is None else padding
        w = self.rng.normal(scale=1.0 / np.sqrt(c // groups * k * k), size=(out, c // groups, k, k))
        b = self.rng.normal(scale=0.1, size=out) if bias else np.zeros(out)
        return self.add(L.Conv(w, b, stride, padding, dilation, groups), i)

    def affine(self, i):
        c = self.shape(i)[0]
        return self.add(L.Affine(self.rng.uniform(0.5, 1.5, (c, 1, 1)), self.rng.normal(0, 0.3, (c, 1, 1))), i)


def _block(draw, b: _Builder, i):
    c, h, w = b.shape(i)
    kind = draw(st.sampled_from(["residual", "dense", "inception", "shuffle", "depthwise", "dilated", "se",
                                 "pool", "activation", "affine", "pad", "layer_norm"]))
    if kind == "residual":
        down = min(h, w) >= 4 and draw(st.booleans())
        s = 2 if down else 1
        width = draw(st.integers(1, 5))
        y = b.add(L.ReLU(), b.conv(i, width, 3, s))
        y = b.affine(b.conv(y, width, 3))
        skip = b.conv(i, width, 1, s, 0) if (down or width != c) else i
        return b.add(L.ReLU(), b.add(L.Add(), y, skip))
    if kind == "dense":
        y = b.conv(b.add(L.ReLU(), b.affine(i)), draw(st.integers(1, 3)), 3)
        return b.add(L.Cat(1), i, y)
    if kind == "inception":
        one = b.add(L.ReLU(), b.conv(i, draw(st.integers(1, 3)), 1, padding=0))
        three = b.add(L.ReLU(), b.conv(i, draw(st.integers(1, 3)), 3))
        pooled = b.conv(b.add(L.MaxPool(3, 1, 1, ceil_mode=True), i), 1, 1, padding=0)
        return b.add(L.Cat(1), one, three, pooled)
    if kind == "shuffle" and c >= 2 and c % 2 == 0:
        half = c // 2
        left = b.add(L.Slice(1, 0, half), i)
        right = b.add(L.Slice(1, half, c), i)
        right = b.add(L.ReLU(), b.conv(right, half, 3, groups=half))
        y = b.add(L.Cat(1), left, right)
        y = b.add(L.Reshape((2, half, h, w)), y)
        y = b.add(L.Permute((2, 1, 3, 4)), y)
        return b.add(L.Reshape((c, h, w)), y)
    if kind == "depthwise":
        mult = draw(st.integers(1, 2))
        return b.add(L.Activation("hardtanh", (("min_val", 0.0), ("max_val", 6.0)), draw(st.booleans())),
                     b.conv(i, c * mult, 3, draw(st.integers(1, 2)), groups=c))
    if kind == "dilated":
        d = draw(st.integers(2, 3))
        if min(h, w) <= 2 * d:
            return i
        return b.add(L.ReLU(), b.conv(i, draw(st.integers(1, 4)), 3, dilation=d))
    if kind == "se":
        squeezed = b.add(L.Reduce((2, 3), "mean", keepdim=False), i)
        hidden = max(1, c // 2)
        fc1 = b.add(L.Linear(b.rng.normal(size=(hidden, c)) / np.sqrt(c), b.rng.normal(0, 0.1, hidden)), squeezed)
        fc1 = b.add(L.ReLU(), fc1)
        fc2 = b.add(L.Linear(b.rng.normal(size=(c, hidden)) / np.sqrt(hidden), b.rng.normal(0, 0.1, c)), fc1)
        gate = b.add(L.Activation(draw(st.sampled_from(["sigmoid", "hardsigmoid"]))), fc2)
        gate = b.add(L.Reshape((c, 1, 1)), gate)
        return b.add(L.Mul(), i, gate)
    if kind == "pool" and min(h, w) >= 3:
        which = draw(st.sampled_from(["max", "avg", "adaptive"]))
        ceil = draw(st.booleans())
        if which == "max":
            k, d = draw(st.sampled_from([(2, 1), (3, 1), (2, 2)]))
            return b.add(L.MaxPool(k, draw(st.integers(1, 2)), draw(st.integers(0, (d * (k - 1) + 1) // 2)), d, ceil),
                         i)
        if which == "avg":
            k = draw(st.integers(2, 3))
            return b.add(L.AvgPool(k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)), ceil, draw(st.booleans()),
                                   draw(st.sampled_from([None, 3]))), i)
        return b.add(L.AdaptiveAvgPool((draw(st.integers(1, h)), draw(st.integers(1, w)))), i)
    if kind == "activation":
        k = draw(st.sampled_from(ACTIVATION_KINDS))
        params = {"hardtanh": (("min_val", -0.5), ("max_val", 1.0)), "leaky_relu": (("negative_slope", 0.2),),
                  "elu": (("alpha", 0.7),), "gelu": (("approximate", draw(st.sampled_from(["none", "tanh"]))),)}
        relu_rule = k in L.RELU_LIKE and draw(st.booleans())
        return b.add(L.Activation(k, params.get(k, ()), relu_rule), i)
    if kind == "affine":
        return b.affine(i)
    if kind == "pad":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        return b.add(L.Pad(pads, draw(st.sampled_from([0.0, 0.5]))), i)
    if kind == "layer_norm" and c >= 2:  # over one channel a layer norm is a constant: R is exactly 0
        y = b.add(L.Permute((2, 3, 1)), i)
        y = b.add(L.LayerNorm((c,), b.rng.uniform(0.5, 1.5, c), b.rng.normal(0, 0.2, c)), y)
        return b.add(L.Permute((3, 1, 2)), y)
    return b.add(L.ReLU(), b.conv(i, draw(st.integers(1, 4)), 3))


@st.composite
def graph_cases(draw, max_blocks: int = 4, min_size: int = 6, max_size: int = 16, max_batch: int = 2,
                max_channels: int = 3, max_classes: int = 6) -> GraphCase:
    """A graph network and a float64 input for it."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = draw(st.integers(1, max_channels))
    size = (draw(st.integers(min_size, max_size)), draw(st.integers(min_size, max_size)))
    b = _Builder(rng, c, size)
    i = b.add(L.ReLU(), b.conv(-1, draw(st.integers(2, 4)), 3))
    for _ in range(draw(st.integers(1, max_blocks))):
        i = _block(draw, b, i)
    n = draw(st.integers(2, max_classes))
    if draw(st.booleans()):  # a class conv (the paper's head)
        i = b.conv(i, n, draw(st.sampled_from([1, 3])))
        if draw(st.booleans()):
            b.add(L.ReLU(), i)
    else:  # an MLP on the pooled features: the logits are the class map
        ch = b.shape(i)[0]
        i = b.add(L.Reduce((2, 3), "mean"), i)
        i = b.add(L.ReLU(), b.add(L.Linear(rng.normal(size=(4, ch)) / np.sqrt(ch), rng.normal(0, .1, 4)), i))
        i = b.add(L.Linear(rng.normal(size=(n, 4)) / 2, rng.normal(0, .1, n)), i)
        b.add(L.Reshape((n, 1, 1)), i)
    net = Network(b.layers, input_shape=(c, *size), inputs=b.inputs)
    x = rng.normal(size=(draw(st.integers(1, max_batch)), c, *size))
    return GraphCase(net, x)
