"""clearmaps.kernels.cuda: the CUDA backend — numba.cuda kernels, cuBLAS GEMMs through CuPy.

Same names and signatures as :mod:`clearmaps.reference` (the backend contract, kernels/__init__.py), in
float32 on the GPU:

    forward, clear_from_trace, backproject          the pipeline (pipeline.py): the paper's chain with the
                                                    deconvnet on fused kernels, every other network and
                                                    response method (``method=``) on the graph path (graph.py)
    conv2d, conv_transpose2d, max_pool_with_switches, unpool, reduce_channels, dominant, compose
                                                    single operators (ops.py)
    CudaConfig, get_config, set_config              the settings, one frozen object (config.py): every
                                                    function above takes ``config=`` (None: the default)
    set_precision("exact" | "tf32"), agreement      the exact default and the fast mode
    set_memory_limit                                cap on the GPU memory a call plans to use
    warm(net, x)                                    compile a network's kernels beforehand, in parallel

Modules: config.py (CudaConfig, Profiler), pipeline.py, graph.py (any graph, any method: the reference's walk
with device primitives), routing.py (which kernel runs each conv), convs.py (the conv executors), memory.py
(budgets and splitting), plans.py (weights in the kernels' layouts), validation.py (arguments and traces),
ops.py, warmup.py. Kernel files: graph_kernels.py (the graph path's convs with groups and dilation, pools with
switches, average pools and their transposes, erf), sparse_kernels.py (stride-1 convs,
forward and transposed, as a tiled kernel that skips zeros and reads an unpooled plane through the
switches), forward_kernels.py (columns, max pool with switches), backproject_kernels.py (G_L^c z_L, the fused
unpool + rectify + transposed-conv gather, the direct transposed conv), epilogue.py (channel reduction +
argmax + max + HSV), device.py (CuPy or, under ``NUMBA_ENABLE_CUDASIM=1``, NumPy; the GEMM).

Importing this package is cheap and never fails: ``is_available()`` says whether the backend can run here
and ``why_unavailable()`` why not. Under Numba's CUDA simulator the backend runs (slowly) on the CPU with
NumPy arrays; that is how CI tests the kernels. The configuration names need neither.
"""

from __future__ import annotations

import importlib
import os

_STATUS: dict = {}

_PUBLIC = {
    "forward": "pipeline", "clear_from_trace": "pipeline", "backproject": "pipeline", "agreement": "pipeline",
    "CudaTrace": "validation", "warm": "warmup",
    "conv2d": "ops", "conv_transpose2d": "ops", "max_pool_with_switches": "ops", "unpool": "ops",
    "reduce_channels": "ops", "dominant": "ops", "compose": "ops",
}

# the settings: importable without a GPU or Numba (a benchmark builds configurations on any machine)
_SETTINGS = ("CudaConfig", "Profiler", "get_config", "set_config", "set_precision", "get_precision",
             "set_memory_limit")

__all__ = ["is_available", "why_unavailable", "simulated", *_SETTINGS, *_PUBLIC]


def simulated() -> bool:
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` before Numba was imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def why_unavailable() -> str | None:
    """None when the backend can run here, else the reason (no numba-cuda, no CuPy, no GPU...)."""
    if "reason" in _STATUS:
        return _STATUS["reason"]
    reason = None
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken (e.g. a NumPy it does not support)
        reason = f"numba.cuda cannot be imported ({type(exc).__name__}: {exc}); pip install numba-cuda"
    else:
        if not simulated():
            try:
                import cupy
            except Exception as exc:
                reason = f"CuPy cannot be imported ({type(exc).__name__}: {exc}); pip install cupy-cuda13x"
            else:
                try:
                    count = cupy.cuda.runtime.getDeviceCount()
                except Exception as exc:
                    count, reason = 0, f"no usable CUDA driver or GPU ({type(exc).__name__}: {exc})"
                if count == 0 and reason is None:
                    reason = "no CUDA GPU is visible"
                if reason is None:
                    try:
                        if not cuda.is_available():
                            reason = "numba.cuda sees no usable GPU (driver or NVVM missing)"
                    except Exception as exc:
                        reason = f"numba.cuda cannot use the GPU ({type(exc).__name__}: {exc})"
    _STATUS["reason"] = reason
    return reason


def is_available() -> bool:
    """True when a CUDA GPU, CuPy and numba-cuda are usable (or the CUDA simulator is on)."""
    return why_unavailable() is None


def __getattr__(name):
    if name in _SETTINGS:
        return getattr(importlib.import_module(f"{__name__}.config"), name)
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not is_available():
        from ...reference import ClearmapsError

        raise ClearmapsError(f"the CUDA backend cannot run here: {why_unavailable()}.")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
