"""The CUDA methods: clearmaps ``cuda`` (exact fp32 and TF32 fast mode), plain torch on the GPU (fp32 with
TF32 off, and TF32), and Captum's Deconvolution on the GPU. All are timed with CUDA events on the default
stream (where CuPy, Numba and torch all launch), after a warm-up.

TF32 is switched OFF for every torch method but ``torch-cuda-tf32`` (torch allows it in cuDNN
convolutions by default, which would make an "fp32" baseline a TF32 one), and back to off after it.
"""

from __future__ import annotations

import gc
import importlib.util

import numpy as np

from .harness import Method, Output, Prepared, cuda_event_timer, register
from .methods_cpu import captum_setup, torch_setup


def _gpu_available():
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _clearmaps_cuda_available():
    why = _gpu_available()
    if why:
        return why
    from clearmaps.kernels import cuda

    return cuda.why_unavailable()


def _set_tf32(on: bool):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _LivePeak():
    """A CuPy memory hook (a context manager) that tracks the peak of bytes held by live arrays."""
    from cupy.cuda import memory_hook

    class LivePeak(memory_hook.MemoryHook):
        name = "clearmaps_live_peak"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]

    return LivePeak()


def _torch_peak(run):
    """Peak bytes torch's allocator held during one run()."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _torch_method(base_setup, tf32: bool):
    def setup(case) -> Prepared:
        _set_tf32(tf32)
        try:
            prepared = base_setup(case)
        finally:
            _set_tf32(False)

        def wrap(fn):
            def inner():
                _set_tf32(tf32)
                try:
                    return fn()
                finally:
                    _set_tf32(False)
            return inner

        run, check = wrap(prepared.run), wrap(prepared.check)
        return Prepared(run, check, sync=prepared.sync, timer=cuda_event_timer,
                        memory=lambda: {"composite_only_bytes": _torch_peak(run), "all_maps_bytes": None,
                                        "how": "torch.cuda.max_memory_allocated during one run"},
                        notes=prepared.notes + (", TF32" if tf32 else ", TF32 off"))
    return setup




def ways(direct_limit=None, sparse=None, tile_rows=None, dense_max=None, cpt=None, rows=None, dense_min=None,
         tensor=None, wide=None, eager=None, halo=None):
    """Context: transposed convs with at most ``direct_limit`` output channels run as the direct kernel;
    ``sparse`` False sends the stride-1 ones to columns + GEMM instead of the sparse kernel; ``tile_rows``
    sets the sparse kernel's tile height; ``dense_max`` the widest conv on a dense input it takes; ``cpt``
    its most output channels per thread; ``rows`` the row-blocked direct kernel for the last transposed conv;
    ``dense_min`` the fewest source channels of a dense conv it takes; ``tensor`` the fast mode's tensor-core
    kernel; ``wide`` its 128-channel tiles; ``halo`` its halo kernel (tensor_cores.HALO); ``eager`` the sparse
    kernel's offsets loaded before the zero test (sparse_kernels.EAGER_OFFSETS) (None: as set)."""
    import contextlib

    from clearmaps.kernels.cuda import backend, sparse_kernels, tensor_cores

    wanted = {(backend, "DIRECT_MAX_CHANNELS"): direct_limit, (backend, "SPARSE_TRANSPOSE"): sparse,
              (sparse_kernels, "TILE_ROWS"): tile_rows, (sparse_kernels, "DENSE_MAX_CHANNELS"): dense_max,
              (sparse_kernels, "MAX_CHANNELS_PER_THREAD"): cpt, (backend, "ROWS_DIRECT"): rows,
              (sparse_kernels, "DENSE_MIN_SOURCE_CHANNELS"): dense_min, (backend, "TENSOR_CORES"): tensor,
              (tensor_cores, "WIDE_TILES"): wide, (sparse_kernels, "EAGER_OFFSETS"): eager,
              (tensor_cores, "HALO"): halo}

    @contextlib.contextmanager
    def ctx():
        before = {(module, name): getattr(module, name) for module, name in wanted}
        for (module, name), value in wanted.items():
            if value is not None:
                setattr(module, name, value)
        try:
            yield
        finally:
            for (module, name), value in before.items():
                setattr(module, name, value)
    return ctx()


def _clearmaps_setup(fast: bool, **knobs):
    """A clearmaps CUDA method run under ``ways(**knobs)``."""
    direct_limit, sparse, tile_rows, dense_max, cpt, rows, dense_min, tensor, wide, eager, halo = (
        knobs.get(k) for k in ("direct_limit", "sparse", "tile_rows", "dense_max", "cpt", "rows", "dense_min",
                               "tensor", "wide", "eager", "halo"))

    def setup(case) -> Prepared:
        import cupy as cp

        from clearmaps.kernels import cuda as kc

        net = case.net
        x = cp.asarray(case.x)            # the images start on the GPU, as for the torch methods
        classes = case.classes

        def run(keep=False):
            with ways(**knobs):
                trace = kc.forward(net, x, fast=fast)
                return kc.clear_from_trace(net, trace, classes, keep_responses=keep, fast=fast)

        def check():
            out = run(keep=True)
            return Output(cp.asnumpy(out.dominant_index), cp.asnumpy(out.dominant_response).astype(np.float64),
                          cp.asnumpy(out.rgb), cp.asnumpy(out.responses).astype(np.float64))

        def memory():
            pool = cp.get_default_memory_pool()
            out = {"how": "peak bytes of live CuPy arrays during one run (a CuPy memory hook; the input images "
                          "and the weights, uploaded anew, included): what torch.cuda.max_memory_allocated "
                          "counts for the torch methods. pool_*: what CuPy's pool held after the run (freed "
                          "blocks it keeps for reuse included: torch's memory_reserved, not compared)"}
            for key, keep in (("composite_only", False), ("all_maps", True)):
                cp.cuda.runtime.deviceSynchronize()
                pool.free_all_blocks()
                kc.backend._PLANS.clear()  # weights re-uploaded: counted, as torch's are
                gc.collect()  # no array made before the hook may be freed inside it (the count would dip)
                try:
                    hook = _LivePeak()
                    with hook:
                        result = run(keep)
                        cp.cuda.runtime.deviceSynchronize()
                    del result
                    out[f"{key}_bytes"] = int(hook.peak + x.nbytes)
                except (ImportError, AttributeError, TypeError) as exc:  # a CuPy whose hook API differs
                    out["hook_error"] = f"{type(exc).__name__}: {exc}"
                    out[f"{key}_bytes"] = int(pool.total_bytes())
                out[f"pool_{key}_bytes"] = int(pool.total_bytes())
            return out

        return Prepared(run, check, sync=cp.cuda.runtime.deviceSynchronize, timer=cuda_event_timer,
                        memory=memory, notes=("TF32 GEMMs" if fast else "fp32 (no TF32)") +
                        ", keep_responses=False, GPU arrays in and out" +
                        ("" if direct_limit is None else f", direct kernel up to {direct_limit} channels") +
                        (", columns + GEMM for every transposed conv" if sparse is False else "") +
                        ("" if tile_rows is None else f", sparse tiles of {tile_rows} rows") +
                        ("" if dense_max is None else f", sparse on dense inputs up to {dense_max} channels") +
                        ("" if cpt is None else f", at most {cpt} output channel(s) per thread") +
                        ("" if rows is None else f", row-blocked direct kernel {'on' if rows else 'off'}") +
                        ("" if dense_min is None else f", sparse on dense inputs from {dense_min} source channels") +
                        ("" if tensor is None else f", tensor-core kernel {'on' if tensor else 'off'}") +
                        ("" if wide is None else f", 128-channel tensor-core tiles {'on' if wide else 'off'}") +
                        ("" if eager is None else f", switch offsets loaded {'eagerly' if eager else 'in the branch'}") +
                        ("" if halo is None else f", tensor-core halo kernel {'on' if halo else 'off'}"))
    # the routing, for bench/device_warm.py (which compiles the kernels a method will use beforehand)
    setup.knobs = knobs
    setup.fast = fast
    return setup


def _captum_available():
    why = _gpu_available()
    if why:
        return why
    if importlib.util.find_spec("captum") is None:
        return "captum is not installed (pip install -e '.[bench]')"
    return None


register(Method("captum-cuda", "cuda", _torch_method(captum_setup("cuda"), False),
                "Captum Deconvolution on the GPU, looping over classes (float32, TF32 off)",
                available=_captum_available, baseline=True))
register(Method("torch-cuda", "cuda", _torch_method(torch_setup("cuda"), False),
                "plain-torch deconvnet on the GPU (cuDNN float32, TF32 off)", available=_gpu_available,
                baseline=True))
register(Method("torch-cuda-tf32", "cuda", _torch_method(torch_setup("cuda"), True),
                "plain-torch deconvnet on the GPU with TF32 (cuDNN and matmul)", available=_gpu_available,
                exact=False, baseline=True))
register(Method("cuda", "cuda", _clearmaps_setup(False), "clearmaps backend='cuda', exact fp32",
                available=_clearmaps_cuda_available))
# the design before the sparse kernel (every transposed conv of > 4 channels as columns + GEMM): which of the
# two wins, per network, is what a GPU run tells (bench/GPU_NOTES.md)
register(Method("cuda-gemm", "cuda", _clearmaps_setup(False, sparse=False),
                "clearmaps backend='cuda', exact fp32, columns + GEMM instead of the sparse kernel",
                available=_clearmaps_cuda_available))
# the sparse kernel with 8x8 tiles instead of 4x8 (fewer windows per FMA), and with one output channel per
# thread where the default takes two (64 instead of ~117 registers: more warps per SM to hide the shared-load
# latency); which wins is for a GPU run to tell
register(Method("cuda-cpt1", "cuda", _clearmaps_setup(False, cpt=1),
                "clearmaps backend='cuda', exact fp32, sparse kernel with one output channel per thread",
                available=_clearmaps_cuda_available))
register(Method("cuda-8x8", "cuda", _clearmaps_setup(False, tile_rows=8),
                "clearmaps backend='cuda', exact fp32, sparse kernel on 8x8 tiles",
                available=_clearmaps_cuda_available))
# every stride-1 conv of more than one tap on the sparse kernel, however wide and whatever its source (the
# default, sparse_kernels.dense_pays, sends dense-input convs of more than 64 output channels or fewer than 16
# source channels to columns + GEMM); as run 5's cuda-sparse, the 1x1 convs aside
register(Method("cuda-sparse", "cuda", _clearmaps_setup(False, dense_max=1 << 30, dense_min=1),
                "clearmaps backend='cuda', exact fp32, sparse kernel for every stride-1 conv larger than 1x1",
                available=_clearmaps_cuda_available))
# run 2's experiment: transposed convs of <= 64 output channels on the direct kernel (lost by 1.5x)
register(Method("cuda-direct", "cuda", _clearmaps_setup(False, direct_limit=64, sparse=False),
                "clearmaps backend='cuda', exact fp32, direct kernel for <= 64 output channels",
                available=_clearmaps_cuda_available))
# the row-blocked direct kernel for the last transposed conv (backend.ROWS_DIRECT, off until timed)
register(Method("cuda-rows", "cuda", _clearmaps_setup(False, rows=True),
                "clearmaps backend='cuda', exact fp32, row-blocked direct kernel for the last transposed conv",
                available=_clearmaps_cuda_available))
# the sparse kernel behind a pool with each window's offset loaded beside its value, ahead of the zero test
# (sparse_kernels.EAGER_OFFSETS, off until timed); same bits as cuda
register(Method("cuda-eager", "cuda", _clearmaps_setup(False, eager=True),
                "clearmaps backend='cuda', exact fp32, sparse kernel loading switch offsets ahead of the tests",
                available=_clearmaps_cuda_available))
# both exact-mode candidates together (the row-blocked last conv and the eager offsets), in the main table so
# that one run gives their ratios to Captum and torch in the same process, should they become the default
register(Method("cuda-rows-eager", "cuda", _clearmaps_setup(False, rows=True, eager=True),
                "clearmaps backend='cuda', exact fp32, row-blocked last conv and switch offsets loaded eagerly",
                available=_clearmaps_cuda_available))
register(Method("cuda-fast", "cuda", _clearmaps_setup(True), "clearmaps backend='cuda', TF32 GEMMs (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
# the fast mode with its stride-1 transposed convs on the tensor-core implicit GEMM (backend.TENSOR_CORES, off
# until a GPU run has checked and timed it)
register(Method("cuda-fast-tc", "cuda", _clearmaps_setup(True, tensor=True),
                "clearmaps backend='cuda', TF32, transposed convs on the tensor-core kernel (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
register(Method("cuda-fast-tc-wide", "cuda", _clearmaps_setup(True, tensor=True, wide=True),
                "clearmaps backend='cuda', TF32, tensor-core kernel with 128-channel tiles on wide layers",
                available=_clearmaps_cuda_available, exact=False))
# the tensor-core halo kernel (tensor_cores.HALO: the source staged once per output patch and chunk, every tap
# read from shared memory), with 64- and with 128-channel tiles on wide layers
register(Method("cuda-fast-tc-halo", "cuda", _clearmaps_setup(True, tensor=True, halo=True),
                "clearmaps backend='cuda', TF32, tensor-core halo kernel (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
register(Method("cuda-fast-tc-halo-wide", "cuda", _clearmaps_setup(True, tensor=True, wide=True, halo=True),
                "clearmaps backend='cuda', TF32, tensor-core halo kernel with 128-channel tiles on wide layers",
                available=_clearmaps_cuda_available, exact=False))
