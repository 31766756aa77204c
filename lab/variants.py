"""The lab's experiments as :class:`clearmaps.kernels.cuda.convs.Variant` objects, for ``CudaConfig.variants``.

A variant is offered each conv before the product's default routes and either runs it (returning the
output) or declines (None). Nothing here is reachable from the product: a run uses a variant only when
its configuration lists it, as the benchmark's lab methods do (bench/methods_cuda.py)::

    from clearmaps.kernels.cuda import CudaConfig
    from lab.variants import TensorCores
    config = CudaConfig(precision="tf32", variants=(TensorCores(halo=True),))

    TensorCores(halo, wide)  fast mode only: stride-1 convs, forward and transposed (dense source, or behind
                             a pool whose windows do not overlap), of at least tensor_cores.MIN_CHANNELS
                             source channels, as the TF32 implicit GEMM of lab/tensor_cores.py
    RowsDirect(px)           the transposed convs the product runs as direct_transpose (few output
                             channels), on a dense source with stride 1, as lab/direct_rows.py
    EagerOffsets()           the sparse kernel's transposed convs behind a pool, with its offsets loaded
                             ahead of the zero tests (lab/eager_offsets.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clearmaps.kernels.cuda import backproject_kernels as bk
from clearmaps.kernels.cuda.convs import Variant, sparse_transpose_conv
from clearmaps.kernels.cuda.device import THREADS, ceil_div, launch, xp
from clearmaps.kernels.cuda.plans import dummy
from clearmaps.kernels.cuda.routing import route

from . import direct_rows as dr
from . import eager_offsets as eo
from . import tensor_cores as tc


def _flipped_layout(w):
    # a forward conv is the transposed conv of its flipped kernels (in and out channels swapped)
    return tc.weight_layout(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


@dataclass(frozen=True)
class TensorCores(Variant):
    """The fast mode's stride-1 convs on the tensor cores (``halo``: the halo kernel where a patch fits;
    ``wide``: 128-channel tiles on layers of at least 128 output channels)."""

    halo: bool = False
    wide: bool = False

    @property
    def name(self) -> str:
        return "tensor cores" + (" halo" if self.halo else "") + (" wide" if self.wide else "")

    def takes(self, kernel, stride, padding, pool, source_channels: int, out_channels: int, sizes: tuple,
              fast: bool) -> bool:
        """Whether a transposed conv (forward: of the flipped kernels) runs here: in the fast mode, for a
        geometry the kernel supports, a source of at least tc.MIN_CHANNELS channels and arrays its 32-bit
        indices reach (``sizes``: the source's and the output's element counts; the switch offsets it reads
        are the chunk's images', no more than the source)."""
        weight = int(np.prod(tc.padded_shape(source_channels, out_channels, *kernel)))
        return (fast and source_channels >= tc.MIN_CHANNELS and tc.fits(*sizes) and tc.fits(weight, 0)
                and tc.supports(*kernel, *stride, *padding, pool) and tc.available() is None)

    def transposed(self, src, layer, plan, out_size, b0, kc, config, fast):
        if layer.in_channels <= config.direct_max_channels:
            return None
        O, I = layer.out_channels, layer.in_channels
        n = src.array.shape[1]
        H, W = out_size
        if not self.takes(layer.kernel, layer.stride, layer.padding, src.pool, O, I, (src.array.size, I * n * H * W),
                          fast):
            return None
        out = xp.empty((I, n, H, W), dtype=np.float32)
        _, _, *dims = src.args()  # dims: O, n, Hs, Ws, Hu, Wu
        # the switch offsets of this chunk's images only (signal t is image b0 + t // kc): 32-bit indices
        offsets = dummy(np.int32) if src.kind == bk.DENSE else src.switches.offsets[b0:b0 + n // kc]
        tc.launch(src.array, offsets, plan.layout("tensor cores", tc.weight_layout), out, O, I, *dims[1:], H, W, 0, kc,
                  src.pre or src.post, layer.kernel, layer.padding, src.pool, halo=self.halo, wide=self.wide)
        return out

    def forward(self, a, layer, plan, rect, config, fast):
        I, Bc, H, W = a.shape
        O = layer.out_channels
        kh, kw = layer.kernel
        oh, ow = layer.output_size((H, W))
        flipped = (kh - 1 - layer.padding[0], kw - 1 - layer.padding[1])
        if not self.takes(layer.kernel, layer.stride, flipped, None, I, O, (a.size, O * Bc * oh * ow), fast):
            return None
        out = xp.empty((O, Bc, oh, ow), dtype=np.float32)
        tc.launch(a, dummy(np.int32), plan.layout("tensor cores flipped", _flipped_layout), out, I, O, Bc, H, W, H, W,
                  oh, ow, 0, 1, rect, layer.kernel, flipped, None, plan.bias, halo=self.halo, wide=self.wide)
        return out


@dataclass(frozen=True)
class RowsDirect(Variant):
    """The direct transposed conv of a dense source with stride 1, ``px`` pixels of a row per thread."""

    px: int = dr.DIRECT_ROW_PIXELS
    name = "direct rows"

    def transposed(self, src, layer, plan, out_size, b0, kc, config, fast):
        if not (layer.in_channels <= config.direct_max_channels and src.kind == bk.DENSE and layer.stride == (1, 1)):
            return None
        O, I, kh, kw = layer.weight.shape
        n, Hs, Ws = src.array.shape[1:]
        H, W = out_size
        out = xp.empty((I, n, H, W), dtype=np.float32)
        launch(dr.direct_rows(I, kh, kw, *layer.padding, self.px), ceil_div(n * H * ceil_div(W, self.px), THREADS),
               THREADS, src.array.reshape(-1), plan.weight.reshape(-1), out.reshape(-1), O, n, Hs, Ws, H, W, src.pre)
        return out


@dataclass(frozen=True)
class EagerOffsets(Variant):
    """The sparse kernel behind a pool with each window's offset loaded ahead of its zero test."""

    name = "sparse eager"

    def transposed(self, src, layer, plan, out_size, b0, kc, config, fast):
        if src.kind == bk.DENSE or route(src, layer, config) != "sparse":
            return None
        out = xp.empty((layer.in_channels, src.array.shape[1], *out_size), dtype=np.float32)
        return sparse_transpose_conv(src, layer, plan, out, b0, kc, config, eo.sparse_transpose, eo.kernel_name)


# the benchmark's names for them (bench/methods_cuda.py: cuda-<name>, cuda-fast-<name>)
VARIANTS = {"rows": (RowsDirect(),), "eager": (EagerOffsets(),), "rows-eager": (RowsDirect(), EagerOffsets()),
            "tc": (TensorCores(),), "tc-wide": (TensorCores(wide=True),), "tc-halo": (TensorCores(halo=True),),
            "tc-halo-wide": (TensorCores(halo=True, wide=True),)}
