"""Which kernel runs each conv: the routing GPU runs measured, with the thresholds of a :class:`CudaConfig`.

A transposed conv (the back-projection's G_l, or the ``conv_transpose2d`` op) reads a :class:`Source` and
takes one of three routes (convs.py runs them):

    "direct"   at most ``config.direct_max_channels`` output channels (the input layer): one direct kernel,
               all output channels of a pixel per thread (backproject_kernels.direct_transpose).
    "sparse"   stride 1, ``config.sparse``, a geometry the sparse kernel supports, and, on a dense source,
               where it pays (:func:`dense_pays`); not behind an overlapping pool whose sum must be
               rectified after unpooling (:func:`sparse_takes`).
    "gemm"     everything else: the fused gather of its columns from the source, then one GEMM.

A forward conv runs as the sparse kernel (the transposed conv of its flipped kernels, plus the bias) where
:func:`sparse_forward` says so, else as forward columns + one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...reference import Conv
from . import backproject_kernels as bk
from . import sparse_kernels as sk
from .config import CudaConfig
from .plans import dummy


@dataclass
class Source:
    """How the next kernel reads the signal (see backproject_kernels.py): a dense plane, or a pool's unpooled
    plane read through its switches, with the pending rectifications."""

    kind: int
    array: object          # dense: (C, n, Hs, Ws); unpooled: the pooled signal (C, n, Hs, Ws)
    plane: tuple           # (Hu, Wu): the size of the plane this source stands for
    pre: bool = False      # rectify values as read (dense) / before unpooling (unpooled)
    post: bool = False     # rectify after unpooling (unpooled only)
    switches: object = None  # unpooled: a validation.Switches (int32 (B, C, Hs, Ws) indices and window offsets)
    pool: tuple | None = None

    def rectified(self) -> "Source":
        if self.kind == bk.DENSE:
            return Source(bk.DENSE, self.array, self.plane, pre=True)
        return Source(self.kind, self.array, self.plane, self.pre, True, self.switches, self.pool)

    def args(self):
        """(src, switches) flat, then the dims every kernel takes: C, n, Hs, Ws, Hu, Wu."""
        C, n, Hs, Ws = self.array.shape
        sw = dummy(np.int32) if self.kind == bk.DENSE else self.switches.index.reshape(-1)
        return (self.array.reshape(-1), sw, C, n, Hs, Ws, *self.plane)


def dense_pays(config: CudaConfig, source_channels: int, out_channels: int, kh: int, kw: int) -> bool:
    """Whether a stride-1 conv reading a DENSE source of ``source_channels`` into ``out_channels`` runs
    faster as the sparse kernel than as columns + GEMM (GPU run 5; CudaConfig.dense_max_channels)."""
    return (out_channels <= config.dense_max_channels and source_channels >= config.dense_min_source_channels
            and kh * kw > 1)


def sparse_takes(src: Source, layer: Conv, config: CudaConfig) -> bool:
    """Whether the transposed conv of ``layer`` on ``src`` can run as the sparse kernel. It puts each window's
    (rectified) value at its switch; where windows overlap, a pixel's values are summed there, so a
    rectification AFTER the unpooling (a ReLU below the pool) is not the same unless one before already made
    every value >= 0."""
    if not config.sparse:
        return False
    if src.kind == bk.UNPOOLED_OVERLAP and src.post and not src.pre:
        return False
    if src.kind == bk.DENSE and not dense_pays(config, layer.out_channels, layer.in_channels, *layer.kernel):
        return False
    return sk.supports(*layer.kernel, *layer.stride, *layer.padding, src.pool, sk.tile_shape(src.pool, config.tile))


def sparse_forward(layer: Conv, config: CudaConfig) -> bool:
    """Whether a forward conv runs as the sparse kernel: stride 1, padding < kernel (the flipped conv's
    padding kh - 1 - ph must not be negative), where it pays on a dense source."""
    (kh, kw), (ph, pw) = layer.kernel, layer.padding
    return (config.sparse and dense_pays(config, layer.in_channels, layer.out_channels, kh, kw) and ph < kh
            and pw < kw and sk.supports(kh, kw, *layer.stride, kh - 1 - ph, kw - 1 - pw, None,
                                        sk.tile_shape(None, config.tile)))


def route(src: Source, layer: Conv, config: CudaConfig) -> str:
    """How the transposed conv of ``layer`` on ``src`` runs by default: "direct", "sparse" or "gemm"."""
    if layer.in_channels <= config.direct_max_channels:
        return "direct"
    return "sparse" if sparse_takes(src, layer, config) else "gemm"
