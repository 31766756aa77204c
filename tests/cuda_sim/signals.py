"""Signals for the kernel tests of this folder: what a transposed conv reads, a dense plane or the pooled
values of a max pool with the switches of real pooling, and how the reference unpools them; and a small
network that runs the sparse kernel in its forms."""

from __future__ import annotations

import numpy as np

from clearmaps import reference as ref
from clearmaps.kernels.cuda import sparse_kernels as sk
from clearmaps.reference import Conv, MaxPool, Network, ReLU


def small_net(rng, classes: int = 3) -> Network:
    """A network small enough for the simulator whose convs run on the sparse kernel in each of its forms:
    a dense 16 -> 20 conv (forward and back), a conv behind a 2x2 pool, and a 1x1 head of ``classes``."""

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    return Network([conv(2, 16), ReLU(), conv(16, 20), ReLU(), MaxPool(2), conv(20, 33), ReLU(),
                    conv(33, classes, 1, 0)])


def signals(rng, B: int, kc: int, O: int, Hu: int, Wu: int, pool):
    """(y, offsets, geometry, unpool) for B images with kc classes each (n = B*kc signals, O channels).

    ``pool`` None: y (n, O, Hu, Wu) is the dense source itself, offsets a dummy, geometry None, unpool the
    identity. ``pool`` (k, s, p): the switches of a k x k / s max pool (padding p) over random (B, O, Hu, Wu)
    images, y (n, O, Hs, Ws) random pooled values, offsets the switches' window offsets (int32, as the
    kernels read them), geometry (k, k, s, s, p, p), and unpool(values) the reference's unpooling of
    (n, O, Hs, Ws) values through signal t's image's switches. None when the pool leaves no output."""
    n = B * kc
    if pool is None:
        return rng.normal(size=(n, O, Hu, Wu)), np.zeros(1, np.int32), None, lambda v: v
    k, s, p = pool
    if (Hu + 2 * p - k) // s + 1 < 1 or (Wu + 2 * p - k) // s + 1 < 1:
        return None
    _, sw = ref.max_pool_with_switches(rng.normal(size=(B, O, Hu, Wu)), k, s, p)
    geometry = (k, k, s, s, p, p)
    offsets, inside = sk.window_offsets(sw.astype(np.int32), geometry, (Hu, Wu))
    assert inside
    image = np.arange(n) // kc
    return rng.normal(size=(n, *sw.shape[1:])), offsets, geometry, lambda v: ref.unpool(v, sw[image], (Hu, Wu))
