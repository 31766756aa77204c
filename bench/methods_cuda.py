"""The CUDA methods: clearmaps ``cuda`` (exact fp32 and TF32 fast mode), plain torch on the GPU (fp32 with
TF32 off, and TF32), and Captum's Deconvolution on the GPU. All are timed with CUDA events on the default
stream (where CuPy, Numba and torch all launch), after a warm-up.

TF32 is switched OFF for every torch method but ``torch-cuda-tf32`` (torch allows it in cuDNN
convolutions by default, which would make an "fp32" baseline a TF32 one), and back to off after it.

Each clearmaps method is a ``CudaConfig`` (clearmaps.kernels.cuda): the product's routing choices as settings,
and the lab's experiments (lab/variants.py, ``lab=``) as the configuration's variants. Nothing is patched.
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


def configuration(fast: bool, lab: str | None = None, **settings):
    """The clearmaps.kernels.cuda.CudaConfig of a method: the precision, ``settings`` (CudaConfig fields) and,
    with ``lab``, the variants of lab/variants.py (VARIANTS[lab]; the repository's lab folder, not installed)."""
    from clearmaps.kernels.cuda import CudaConfig

    variants = ()
    if lab is not None:
        from lab.variants import VARIANTS

        variants = VARIANTS[lab]
    return CudaConfig(precision="tf32" if fast else "exact", variants=variants, **settings)


_SETTING_NOTES = {
    "direct_max_channels": "direct kernel up to {} channels", "sparse": "sparse kernel {}",
    "tile": "sparse tiles of {}", "dense_max_channels": "sparse on dense inputs up to {} channels",
    "dense_min_source_channels": "sparse on dense inputs from {} source channels",
    "max_channels_per_thread": "at most {} output channel(s) per thread", "lab": "lab variant {}"}


def _clearmaps_setup(fast: bool, lab: str | None = None, **settings):
    """A clearmaps CUDA method run with configuration(fast, lab, **settings). The configuration is built when
    the method is set up (a lab variant imports Numba): ``setup.config()`` builds it for bench/device_warm.py."""
    notes = ", ".join(_SETTING_NOTES[k].format(v) for k, v in dict(settings, lab=lab).items() if v is not None)

    def setup(case) -> Prepared:
        import cupy as cp

        from clearmaps.kernels import cuda as kc
        from clearmaps.kernels.cuda.plans import forget_plans

        config = configuration(fast, lab, **settings)
        net = case.net
        x = cp.asarray(case.x)            # the images start on the GPU, as for the torch methods
        classes = case.classes

        def run(keep=False):
            trace = kc.forward(net, x, config=config)
            return kc.clear_from_trace(net, trace, classes, keep_responses=keep, config=config)

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
                forget_plans()  # weights re-uploaded: counted, as torch's are
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
                        ", keep_responses=False, GPU arrays in and out" + (", " + notes if notes else ""))
    # the configuration, for bench/device_warm.py (which compiles the kernels a method will use beforehand)
    # and bench/device_bench.py's per-layer timeline
    setup.config = lambda: configuration(fast, lab, **settings)
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
register(Method("cuda-cpt1", "cuda", _clearmaps_setup(False, max_channels_per_thread=1),
                "clearmaps backend='cuda', exact fp32, sparse kernel with one output channel per thread",
                available=_clearmaps_cuda_available))
register(Method("cuda-8x8", "cuda", _clearmaps_setup(False, tile=(8, 8)),
                "clearmaps backend='cuda', exact fp32, sparse kernel on 8x8 tiles",
                available=_clearmaps_cuda_available))
# every stride-1 conv of more than one tap on the sparse kernel, however wide and whatever its source (the
# default, sparse_kernels.dense_pays, sends dense-input convs of more than 64 output channels or fewer than 16
# source channels to columns + GEMM); as run 5's cuda-sparse, the 1x1 convs aside
register(Method("cuda-sparse", "cuda",
                _clearmaps_setup(False, dense_max_channels=1 << 30, dense_min_source_channels=1),
                "clearmaps backend='cuda', exact fp32, sparse kernel for every stride-1 conv larger than 1x1",
                available=_clearmaps_cuda_available))
# run 2's experiment: transposed convs of <= 64 output channels on the direct kernel (lost by 1.5x)
register(Method("cuda-direct", "cuda", _clearmaps_setup(False, direct_max_channels=64, sparse=False),
                "clearmaps backend='cuda', exact fp32, direct kernel for <= 64 output channels",
                available=_clearmaps_cuda_available))
# LAB (lab/README.md, not in the product until a GPU run promotes it): the row-blocked direct kernel for the last
# transposed conv (lab/direct_rows.py)
register(Method("cuda-rows", "cuda", _clearmaps_setup(False, lab="rows"),
                "clearmaps backend='cuda', exact fp32, row-blocked direct kernel for the last transposed conv",
                available=_clearmaps_cuda_available))
# LAB: the sparse kernel behind a pool with each window's offset loaded beside its value, ahead of the zero test
# (lab/eager_offsets.py); same bits as cuda
register(Method("cuda-eager", "cuda", _clearmaps_setup(False, lab="eager"),
                "clearmaps backend='cuda', exact fp32, sparse kernel loading switch offsets ahead of the tests",
                available=_clearmaps_cuda_available))
# LAB: both exact-mode candidates together (the row-blocked last conv and the eager offsets), in the main table
# so that one run gives their ratios to Captum and torch in the same process, should they become the default
register(Method("cuda-rows-eager", "cuda", _clearmaps_setup(False, lab="rows-eager"),
                "clearmaps backend='cuda', exact fp32, row-blocked last conv and switch offsets loaded eagerly",
                available=_clearmaps_cuda_available))
register(Method("cuda-fast", "cuda", _clearmaps_setup(True), "clearmaps backend='cuda', TF32 GEMMs (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
# LAB: the fast mode with its stride-1 convs on the tensor-core implicit GEMM (lab/tensor_cores.py)
register(Method("cuda-fast-tc", "cuda", _clearmaps_setup(True, lab="tc"),
                "clearmaps backend='cuda', TF32, transposed convs on the tensor-core kernel (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
register(Method("cuda-fast-tc-wide", "cuda", _clearmaps_setup(True, lab="tc-wide"),
                "clearmaps backend='cuda', TF32, tensor-core kernel with 128-channel tiles on wide layers",
                available=_clearmaps_cuda_available, exact=False))
# LAB: the tensor-core halo kernel (the source staged once per output patch and chunk, every tap read from shared
# memory), with 64- and with 128-channel tiles on wide layers
register(Method("cuda-fast-tc-halo", "cuda", _clearmaps_setup(True, lab="tc-halo"),
                "clearmaps backend='cuda', TF32, tensor-core halo kernel (fast mode)",
                available=_clearmaps_cuda_available, exact=False))
register(Method("cuda-fast-tc-halo-wide", "cuda", _clearmaps_setup(True, lab="tc-halo-wide"),
                "clearmaps backend='cuda', TF32, tensor-core halo kernel with 128-channel tiles on wide layers",
                available=_clearmaps_cuda_available, exact=False))
