"""The CUDA backend's settings: one frozen :class:`CudaConfig`, passed as ``config=`` or taken from a default.

Every setting that can change how a call runs lives here, and nowhere else (no module globals, no
environment switches): the arithmetic (``precision``), how much GPU memory a call may plan to use, and the
routing choices GPU runs measured (which convs take the sparse kernel, its tile, how many GEMM columns
are built at once). A call takes ``config=None`` to mean the module default, which :func:`set_precision`
and :func:`set_memory_limit` change for the whole process::

    from clearmaps.kernels import cuda
    cuda.set_precision("tf32")                                   # every later call, or one call:
    cuda.clear_from_trace(net, trace, classes, config=cuda.CudaConfig(precision="tf32"))
    cuda.get_config().replace(memory_limit=2 << 30)              # a changed copy

Two more fields are hooks, empty by default: ``variants`` (objects that may run some convs their own way
instead of the default routes: the experiments of the repository's ``lab/`` folder, plugged in by the
benchmark) and ``profiler`` (a :class:`Profiler` told each step of a call: the benchmark's per-layer
timeline, and :func:`clearmaps.kernels.cuda.warm`'s recording of the kernels a network needs).

This module imports neither Numba nor CuPy: a configuration can be built on any machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ...reference import ClearmapsError

PRECISIONS = ("exact", "tf32")


class Profiler:
    """Told the steps of a call (``CudaConfig.profiler``). The base class does nothing; subclass what you need.

    ``mark(label)`` is called after each step of the forward pass and the back-projection (labels such as
    "forward 3 Conv" or "back 5 Conv sparse from switches"); ``sparse_launch(launch)`` before each launch of
    the sparse kernel with a :class:`clearmaps.kernels.cuda.convs.SparseLaunch`: returning True means the
    profiler handled it (it is not run; warm's recorder zero-fills the output instead)."""

    def mark(self, label: str) -> None:
        return None

    def sparse_launch(self, launch) -> bool:
        return False


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ClearmapsError(f"CudaConfig.{name} is {value!r}; expected a whole number of at least {minimum}.")
    return int(value)


@dataclass(frozen=True)
class CudaConfig:
    """How the CUDA backend runs a call. Frozen: change a copy with :meth:`replace`.

    Parameters
    ----------
    precision : "exact" or "tf32"
        "exact" (the default): float32 FMAs everywhere, within 1e-5 of the float64 reference. "tf32": the
        cuBLAS GEMMs round their inputs to TF32 on the tensor cores (faster, about 1e-3 relative error;
        :func:`clearmaps.kernels.cuda.agreement` reports the dominant-class agreement). A call's ``fast=``
        argument, when given, overrides it.
    memory_limit : int or None
        Bytes of GPU memory a call plans to use at most (None: 80% of what is free). Work that does not fit
        is split over images, then classes; the results are the same.
    sparse : bool
        Stride-1 convs on the tiled kernel that skips zeros (kernels/cuda/sparse_kernels.py), where
        ``dense_max_channels`` / ``dense_min_source_channels`` say it pays; False sends every conv of more
        than ``direct_max_channels`` output channels to columns + GEMM (the benchmark's "cuda-gemm").
    column_bytes : int
        Bytes of GEMM columns built at once (a conv's columns are kh*kw times its input). GPU run 6 tried
        128 MiB: vgg16-fcn's six GEMM layers took ~1 ms (6%) longer in all than with 256 MiB.
    direct_max_channels : int
        A transposed conv with at most this many output channels (the input layer: grey or RGB) runs as one
        direct kernel: as a GEMM its M would be 1-3 rows, all memory traffic and no arithmetic.
    dense_max_channels, dense_min_source_channels : int
        A stride-1 conv on a DENSE source takes the sparse kernel only with at most ``dense_max_channels``
        output channels, at least ``dense_min_source_channels`` source channels and more than one tap.
        Behind a pool the kernel skips ~7/8 of the multiply-adds and wins at any width; on a dense source
        only the rectified half, while a wide GEMM runs near the fp32 peak. GPU run 5 (H200): sparse for
        every dense conv was 3% slower on vgg16-fcn than the GEMM for its 128-512-channel layers, 1.3-2.5x
        faster for the 32-64-channel ones; the input convs (1 -> 32, 3 -> 64) ran 1.6-1.7x slower sparse,
        and the 1024 -> 10 1x1 head conv took 0.38 ms sparse against 0.02 ms as a GEMM.
    tile : (rows, cols)
        The sparse kernel's output tile, rounded down to multiples of the pool's stride. 8x8 lost to 4x8 by
        20% in run 5.
    max_channels_per_thread : 1 or 2
        The sparse kernel's output channels per thread, at most (it takes 2 from 64 channels on). One per
        thread lost by 4-6% in run 5.
    variants : tuple
        Objects with ``name``, ``transposed(...)`` and ``forward(...)`` that may run a conv instead of the
        default routes (:mod:`clearmaps.kernels.cuda.convs`); empty in the product. The lab's experiments
        plug in here (``lab/README.md`` in the repository).
    profiler : Profiler or None
        Told each step of a call (:class:`Profiler`); None costs nothing.
    """

    precision: str = "exact"
    memory_limit: int | None = None
    sparse: bool = True
    column_bytes: int = 256 << 20
    direct_max_channels: int = 4
    dense_max_channels: int = 64
    dense_min_source_channels: int = 16
    tile: tuple = (4, 8)
    max_channels_per_thread: int = 2
    variants: tuple = ()
    profiler: Profiler | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ClearmapsError(f"CudaConfig.precision is {self.precision!r}; expected one of {PRECISIONS}.")
        if self.memory_limit is not None:
            object.__setattr__(self, "memory_limit", _positive_int(self.memory_limit, "memory_limit"))
        if not isinstance(self.sparse, (bool, np.bool_)):
            raise ClearmapsError(f"CudaConfig.sparse is {self.sparse!r}; expected True or False.")
        object.__setattr__(self, "sparse", bool(self.sparse))
        for name in ("column_bytes", "dense_max_channels", "dense_min_source_channels"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        object.__setattr__(self, "direct_max_channels",
                           _positive_int(self.direct_max_channels, "direct_max_channels", 0))
        tile = self.tile
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2):
            raise ClearmapsError(f"CudaConfig.tile is {tile!r}; expected (rows, cols) of whole numbers.")
        object.__setattr__(self, "tile", tuple(_positive_int(v, "tile") for v in tile))
        if self.max_channels_per_thread not in (1, 2) or isinstance(self.max_channels_per_thread, bool):
            raise ClearmapsError(f"CudaConfig.max_channels_per_thread is {self.max_channels_per_thread!r}; "
                                 "expected 1 or 2.")
        if not isinstance(self.variants, tuple):
            raise ClearmapsError(f"CudaConfig.variants is a {type(self.variants).__name__}; expected a tuple.")
        for v in self.variants:
            if not all(hasattr(v, a) for a in ("name", "transposed", "forward")):
                raise ClearmapsError(f"CudaConfig.variants holds {v!r}; expected objects with name, transposed() "
                                     "and forward() (clearmaps.kernels.cuda.convs.Variant).")
        if self.profiler is not None and not (hasattr(self.profiler, "mark")
                                              and hasattr(self.profiler, "sparse_launch")):
            raise ClearmapsError(f"CudaConfig.profiler is {self.profiler!r}; expected a "
                                 "clearmaps.kernels.cuda.Profiler or None.")

    @property
    def fast(self) -> bool:
        """Whether the GEMMs may use TF32 (``precision == "tf32"``)."""
        return self.precision == "tf32"

    def replace(self, **changes) -> "CudaConfig":
        """A copy with ``changes`` (checked as the constructor checks them)."""
        return dataclasses.replace(self, **changes)

    def mark(self, label) -> None:
        """Tell the profiler, if any, that a step ended; ``label`` may be a callable (built only when told)."""
        if self.profiler is not None:
            self.profiler.mark(label() if callable(label) else label)


_DEFAULT = [CudaConfig()]


def get_config() -> CudaConfig:
    """The configuration calls use when given ``config=None``."""
    return _DEFAULT[0]


def set_config(config: CudaConfig) -> None:
    """Make ``config`` the default of every later call in this process."""
    if not isinstance(config, CudaConfig):
        raise ClearmapsError(f"config is a {type(config).__name__}; expected a clearmaps.kernels.cuda.CudaConfig.")
    _DEFAULT[0] = config


def set_precision(precision: str = "exact") -> None:
    """Choose the default arithmetic: "exact" (float32 FMA, the default) or "tf32" (tensor-core GEMMs with
    inputs rounded to TF32: faster, about 1e-3 relative error; check the dominant-class agreement with
    :func:`clearmaps.kernels.cuda.agreement`)."""
    if precision not in PRECISIONS:
        raise ClearmapsError(f"precision={precision!r}; expected one of {PRECISIONS}.")
    set_config(get_config().replace(precision=precision))


def get_precision() -> str:
    """The default precision, "exact" or "tf32"."""
    return get_config().precision


def set_memory_limit(limit_bytes: int | None = None) -> None:
    """Cap the GPU memory a call plans to use by default (None: 80% of what is free). Work that does not fit
    is split over images, then classes."""
    if limit_bytes is not None and (isinstance(limit_bytes, bool) or not isinstance(limit_bytes, (int, np.integer))
                                    or limit_bytes <= 0):
        raise ClearmapsError(f"limit_bytes={limit_bytes!r}; expected a positive int or None.")
    set_config(get_config().replace(memory_limit=limit_bytes))


def resolve(config, fast) -> tuple[CudaConfig, bool]:
    """(the call's configuration, whether its GEMMs may use TF32): ``config`` None means the default, and
    ``fast`` None the configuration's precision."""
    if config is None:
        config = get_config()
    elif not isinstance(config, CudaConfig):
        raise ClearmapsError(f"config is a {type(config).__name__}; expected a clearmaps.kernels.cuda.CudaConfig "
                             "or None (the default, get_config()).")
    if fast is None:
        return config, config.fast
    if not isinstance(fast, (bool, np.bool_)):
        raise ClearmapsError(f"fast={fast!r}; expected True, False or None (the configuration's precision).")
    return config, bool(fast)
