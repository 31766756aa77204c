"""Hypothesis strategies: networks CLEAR can explain, and inputs for them.

Networks are drawn as conv blocks (kernels 1/3/5, strides 1–2, paddings up to half the kernel), each
optionally followed by a max pool (2/2, or the overlapping 3/2, with or without padding), then a head conv
with 2–12 kernels, with or without a ReLU after it. Layers that would shrink the image below one pixel
are left out, so every drawn network is valid for its drawn input size.

Half the cases use small integers for weights and inputs: then float32 and float64 are both exact, max
pools see ties (ReLU makes many zeros), and responses tie, which is what the tie rules are about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from clearmaps.reference import Conv, MaxPool, Network, ReLU


@dataclass
class Case:
    net: Network
    x: np.ndarray
    integer: bool

    def __repr__(self) -> str:
        return f"Case(integer={self.integer}, x.shape={self.x.shape}, net={self.net!r})"


def _conv(rng, c_in, c_out, k, stride, padding, integer):
    if integer:
        w = rng.integers(-2, 3, size=(c_out, c_in, k, k)).astype(np.float64)
        b = rng.integers(-1, 2, size=c_out).astype(np.float64)
    else:
        w = rng.normal(scale=1.0 / np.sqrt(c_in * k * k), size=(c_out, c_in, k, k))
        b = rng.normal(scale=0.1, size=c_out)
    return Conv(w, b, (stride, stride), (padding, padding))


@st.composite
def clear_cases(draw, max_classes: int = 12, min_classes: int = 2, min_size: int = 8, max_size: int = 40,
                max_batch: int = 2, max_channels: int = 3, max_blocks: int = 3, max_width: int = 4,
                integer=None) -> Case:
    """A (network, input) pair, float64. ``integer`` forces integer-valued weights and inputs (or not)."""
    integer = draw(st.booleans()) if integer is None else integer
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = draw(st.integers(1, max_channels))
    h = draw(st.integers(min_size, max_size))
    w = draw(st.integers(min_size, max_size))
    batch = draw(st.integers(1, max_batch))
    layers, size, channels = [], (h, w), c
    for _ in range(draw(st.integers(1, max_blocks))):
        k = draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, k // 2))
        width = draw(st.integers(1, max_width))
        conv = _conv(rng, channels, width, k, stride, padding, integer)
        if min(_out(size, k, stride, padding)) < 1:
            continue
        layers += [conv, ReLU()]
        size, channels = _out(size, k, stride, padding), width
        pool = draw(st.sampled_from([None, (2, 2, 0), (3, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1)]))
        if pool is not None and min(_out(size, *pool)) >= 1:
            layers.append(MaxPool((pool[0], pool[0]), (pool[1], pool[1]), (pool[2], pool[2])))
            size = _out(size, *pool)
    n = draw(st.integers(min_classes, max_classes))
    k = draw(st.sampled_from([1, 3])) if min(size) >= 3 else 1
    layers.append(_conv(rng, channels, n, k, 1, draw(st.integers(0, k // 2)), integer))
    if draw(st.booleans()):
        layers.append(ReLU())
    net = Network(layers)
    if integer:
        x = rng.integers(0, 4, size=(batch, c, h, w)).astype(np.float64)
    else:
        x = rng.normal(size=(batch, c, h, w))
    return Case(net, x, integer)


def _out(size, k, s, p):
    return tuple((n + 2 * p - k) // s + 1 for n in size)
