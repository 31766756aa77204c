"""Weight plans: each conv's weight on the device, in the layouts the kernels read, made once per network.

A :class:`ConvPlan` makes each layout on first use and keeps it: a layer reads two or three of them (its
forward route's, its back-projection route's, the bias), and holding all of them would cost the GPU memory
of several more copies of the network. :func:`network_plan` keeps one plan per :class:`Network` (Networks
are immutable), plus the folded head's kernels (kernels/fold.py).
"""

from __future__ import annotations

import weakref
from functools import cached_property

import numpy as np

from ...reference import Conv, Network
from ..fold import fold_head
from . import device as dv


class ConvPlan:
    """Device copies of a conv's weight, each made on first use:

    weight      (O, I, kh, kw)
    forward     (O, I*kh*kw + 1): weight rows with the bias as last column (forward columns + GEMM)
    transposed  (I, O*kh*kw): weight[o, i, ky, kx] at [i, (o*kh + ky)*kw + kx] (transposed columns + GEMM)
    sparse      (O, kh, kw, I): what sparse_kernels.sparse_transpose reads
    flipped     (I, kh, kw, O): weight[o, i, kh-1-ky, kw-1-kx] at [i, ky, kx, o] (the forward conv, sparse)
    bias        (O,)

    and, for kernels outside this package (a :class:`~clearmaps.kernels.cuda.CudaConfig` variant), any other
    layout through :meth:`layout`."""

    def __init__(self, layer: Conv):
        self._layer = layer  # (the Network's own: no host copy of the weights is kept)
        self._layouts = {}

    @property
    def host_weight(self) -> np.ndarray:
        """The weight (O, I, kh, kw) as float32 on the host (made anew: for building layouts)."""
        return self._layer.weight.astype(np.float32)

    @property
    def _b(self) -> np.ndarray:
        return self._layer.bias.astype(np.float32)

    @cached_property
    def weight(self):
        return dv.asdevice(self.host_weight)

    @cached_property
    def forward(self):
        w = self.host_weight
        return dv.asdevice(np.concatenate([w.reshape(w.shape[0], -1), self._b[:, None]], axis=1))

    @cached_property
    def transposed(self):
        w = self.host_weight
        return dv.asdevice(np.ascontiguousarray(w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)))

    @cached_property
    def sparse(self):
        return dv.asdevice(np.ascontiguousarray(self.host_weight.transpose(0, 2, 3, 1)))

    @cached_property
    def flipped(self):
        return dv.asdevice(np.ascontiguousarray(self.host_weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)))

    @cached_property
    def bias(self):
        return dv.asdevice(self._b)

    def layout(self, key, make):
        """The device array ``make(host_weight)`` (a host array), made on the first call with ``key`` and kept
        with the plan's other layouts."""
        if key not in self._layouts:
            self._layouts[key] = dv.asdevice(make(self.host_weight))
        return self._layouts[key]


_PLANS: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def network_plan(net: Network) -> dict:
    """{conv index: ConvPlan} of ``net``, and under "fold" the folded head: None, or (conv index j, its
    kernels for rectify=True, for rectify=False), each laid out (N, 2, I, kh, kw) as
    backproject_kernels.head_signal(folded=True) reads them. Made once per Network."""
    plan = _PLANS.get(net)
    if plan is None:
        plan = {i: ConvPlan(layer) for i, layer in enumerate(net.layers) if isinstance(layer, Conv)}
        folded = fold_head(net)
        plan["fold"] = None if folded is None else (folded[0], *(
            dv.asdevice(np.ascontiguousarray(v.transpose(0, 3, 4, 1, 2), dtype=np.float32)) for v in folded[1:]))
        _PLANS[net] = plan
    return plan


def forget_plans() -> None:
    """Drop every network's device weights (the benchmark counts their upload in a call's memory)."""
    _PLANS.clear()


def geometry(layer) -> tuple:
    """(kh, kw, sh, sw, ph, pw) of a Conv or MaxPool: what the kernel factories specialise on."""
    return (*layer.kernel, *layer.stride, *layer.padding)


_DUMMIES = {}


def dummy(dtype):
    """A one-element device array for a kernel argument a launch does not read (a dense source's switches, the
    back-projection's bias): the kernels' signatures still want an array of that dtype."""
    key = np.dtype(dtype).name
    if key not in _DUMMIES:
        _DUMMIES[key] = dv.xp.zeros(1, dtype=dtype)
    return _DUMMIES[key]
