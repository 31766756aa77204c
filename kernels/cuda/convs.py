"""The conv executors: a forward conv, or a transposed conv on a :class:`~routing.Source`, on its route.

Channel-major (C, n, H, W) in and out. :func:`conv_forward` and :func:`transpose_conv` first offer the conv to
the configuration's ``variants`` (none in the product; the lab's experiments plug in here), then run the
default route (routing.py): the sparse kernel, the direct kernel, or columns + GEMM in blocks of
``CudaConfig.column_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...reference import Conv
from . import backproject_kernels as bk
from . import device as dv
from . import forward_kernels as fk
from . import sparse_kernels as sk
from .config import CudaConfig
from .device import THREADS, ceil_div, launch, xp
from .memory import column_block
from .plans import ConvPlan, dummy, geometry
from .routing import Source, route, sparse_forward


class Variant:
    """Another way to run some convs (``CudaConfig.variants``): each method returns the output array, or None
    to leave the conv to the next variant and then to the default routes. ``name`` labels its steps in a
    profiler's timeline.

    ``transposed(src, layer, plan, out_size, b0, kc, config, fast)``: the transposed conv of ``layer`` on
    ``src`` (a :class:`~routing.Source`), (I, n, *out_size). ``forward(a, layer, plan, rect, config, fast)``:
    the conv of ``a`` (I, Bc, H, W), bias added, ``rect``: a ReLU still to apply to ``a`` as it is read."""

    name = "variant"

    def transposed(self, src, layer, plan, out_size, b0, kc, config, fast):
        return None

    def forward(self, a, layer, plan, rect, config, fast):
        return None


@dataclass(frozen=True, eq=False)
class SparseLaunch:
    """One launch of a sparse-kernel specialisation: ``build(*spec)`` is the kernel (``name`` its name), on
    src (O, n, Hs, Ws), window offsets (or None: a dense source), weight (O, kh, kw, I), bias (I,) or None,
    into out (I, n, H, W). What a :class:`~config.Profiler` sees (warm records these)."""

    build: object
    spec: tuple
    name: str
    src: object
    offsets: object
    weight: object
    bias: object
    out: object
    b0: int
    kc: int
    rect: bool

    def kernel(self):
        return self.build(*self.spec)

    def run(self) -> None:
        kernel = self.kernel()
        O, n, Hs, Ws = self.src.shape
        I, _, H, W = self.out.shape
        threads, _, (TY, TX), cpt = self.spec[5:]  # (kh, kw, ph, pw, pool) come first
        tiles_y, tiles_x = ceil_div(H, TY), ceil_div(W, TX)
        launch(kernel, (n * tiles_y * tiles_x, ceil_div(I, threads * cpt)), threads, self.src.reshape(-1),
               dummy(np.int32) if self.offsets is None else self.offsets.reshape(-1), self.weight.reshape(-1),
               dummy(np.float32) if self.bias is None else self.bias, self.out.reshape(-1), O, I, n, Hs, Ws, H, W,
               tiles_x, tiles_y, self.b0, self.kc, self.rect)


def launch_sparse(config: CudaConfig, src, offsets, weight, bias, out, kernel, padding, pool, b0: int, kc: int,
                  rect: bool, build=None, name=None) -> None:
    """out (I, n, H, W) = the stride-1 transposed conv (``kernel``, ``padding``) of src (O, n, Hs, Ws), read
    through a pool's switches when ``pool`` (``offsets``: their window offsets), as the sparse kernel
    (``build``, named by ``name``: by default sparse_kernels.sparse_transpose and kernel_name; the tile and
    channels per thread from ``config``), with ``bias`` (I,) added unless None; weight (O, kh, kw, I). The
    configuration's profiler may take the launch instead."""
    build, name = build or sk.sparse_transpose, name or sk.kernel_name
    spec = sk.specialisation(kernel, padding, pool, out.shape[0], bias is not None, config.tile,
                             config.max_channels_per_thread)
    job = SparseLaunch(build, spec, name(*spec), src, offsets, weight, bias, out, b0, kc, rect)
    if config.profiler is None or not config.profiler.sparse_launch(job):
        job.run()


def sparse_transpose_conv(src: Source, layer: Conv, plan: ConvPlan, out, b0: int, kc: int, config: CudaConfig,
                          build=None, name=None):
    """The transposed conv of ``layer`` on ``src`` into ``out`` as the sparse kernel (``build``)."""
    launch_sparse(config, src.array, None if src.kind == bk.DENSE else src.switches.offsets, plan.sparse, None, out,
                  layer.kernel, layer.padding, src.pool, b0, kc, src.pre or src.post, build, name)
    return out


def materialise(src: Source, b0: int, kc: int):
    """The source as a dense (C, n, Hu, Wu) plane, with its rectifications applied."""
    C, n = src.array.shape[:2]
    out = xp.empty((C, n, *src.plane), dtype=np.float32)
    src_flat, sw, *dims = src.args()
    launch(bk.materialise(src.kind, src.pool), ceil_div(out.size, THREADS), THREADS,
           src_flat, sw, out.reshape(-1), *dims, b0, kc, src.pre, src.post)
    return out


def transpose_conv(src: Source, layer: Conv, plan: ConvPlan, out_size, b0: int, kc: int, config: CudaConfig,
                   fast: bool):
    """G_l of the paper on a source: (O, n, Hu, Wu) → (I, n, H, W), H, W = ``out_size``; and the route taken."""
    for variant in config.variants:
        out = variant.transposed(src, layer, plan, out_size, b0, kc, config, fast)
        if out is not None:
            return out, variant.name
    O, I, kh, kw = layer.weight.shape
    n = src.array.shape[1]
    H, W = out_size
    out = xp.empty((I, n, H, W), dtype=np.float32)
    src_flat, sw, *dims = src.args()  # dims: O, n, Hs, Ws, Hu, Wu
    how = route(src, layer, config)
    if how == "direct":
        launch(bk.direct_transpose(I, *geometry(layer), src.kind, src.pool), ceil_div(n * H * W, THREADS), THREADS,
               src_flat, sw, plan.weight.reshape(-1), out.reshape(-1), *dims, H, W, b0, kc, src.pre, src.post)
    elif how == "sparse":
        sparse_transpose_conv(src, layer, plan, out, b0, kc, config)
    else:
        rows, ncols = O * kh * kw, n * H * W
        out2d = out.reshape(I, ncols)
        block = column_block(config, rows, ncols)
        work = xp.empty(rows * min(block, ncols), dtype=np.float32)
        kernel = bk.gather_columns(*geometry(layer), src.kind, src.pool)
        groups = ceil_div(O, bk.GATHER_CHANNELS)
        for j0 in range(0, ncols, block):
            nb = min(block, ncols - j0)
            cols = work[:rows * nb]
            launch(kernel, (ceil_div(nb, THREADS), groups), THREADS, src_flat, sw, cols, nb, j0, *dims, H, W, b0, kc,
                   src.pre, src.post)
            dv.gemm_into(plan.transposed, cols.reshape(rows, nb), out2d, j0, fast)
    return out, how


def conv_forward(a, layer: Conv, plan: ConvPlan, rect: bool, config: CudaConfig, fast: bool):
    """a (I, Bc, H, W) → conv output (O, Bc, oh, ow) with bias; ``rect`` rectifies a pending ReLU."""
    for variant in config.variants:
        out = variant.forward(a, layer, plan, rect, config, fast)
        if out is not None:
            return out
    I, Bc, H, W = a.shape
    O = layer.out_channels
    kh, kw = layer.kernel
    oh, ow = layer.output_size((H, W))
    if sparse_forward(layer, config):  # the transposed conv of the flipped kernels, input channels as its "O"
        out = xp.empty((O, Bc, oh, ow), dtype=np.float32)
        launch_sparse(config, a, None, plan.flipped, plan.bias, out, (kh, kw),
                      (kh - 1 - layer.padding[0], kw - 1 - layer.padding[1]), None, 0, 1, rect)
        return out
    rows = I * kh * kw + 1
    ncols = Bc * oh * ow
    out = xp.empty((O, ncols), dtype=np.float32)
    block = column_block(config, rows, ncols)
    work = xp.empty(rows * min(block, ncols), dtype=np.float32)
    kernel = fk.forward_columns(*geometry(layer))
    groups = ceil_div(I, fk.FORWARD_CHANNELS)
    flat = a.reshape(-1)
    for j0 in range(0, ncols, block):
        nb = min(block, ncols - j0)
        cols = work[:rows * nb]
        launch(kernel, (ceil_div(nb, THREADS), groups), THREADS, flat, cols, nb, j0, I, Bc, H, W, oh, ow, rect, True)
        dv.gemm_into(plan.forward, cols.reshape(rows, nb), out, j0, fast)
    return out.reshape(O, Bc, oh, ow)
