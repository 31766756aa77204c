"""First step of bench/device.sh: what is installed, what the GPU is, and whether the backend's pieces
work at all (a numba.cuda kernel on a CuPy array, the exact and TF32 GEMMs), each checked, in seconds."""

from __future__ import annotations

import importlib
import platform
import sys


def main() -> int:
    print("python", platform.python_version(), sys.executable)
    for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "captum", "hypothesis", "pytest", "llvmlite"):
        try:
            module = importlib.import_module(name)
            print(f"{name:12s} {getattr(module, '__version__', '?'):12s} {getattr(module, '__file__', '')}")
        except Exception as exc:
            print(f"{name:12s} MISSING ({type(exc).__name__}: {exc})")
    import numpy as np
    import torch

    print("torch sees", torch.cuda.device_count(), "GPU(s):",
          torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
    from clearmaps.kernels import cuda as kc

    print("clearmaps cuda available:", kc.is_available(), kc.why_unavailable() or "")
    if not kc.is_available():
        return 1
    import cupy as cp
    from numba import cuda

    from clearmaps.kernels.cuda.device import gemm_into, launch

    print("cupy device:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
          "free/total GiB:", [round(v / 2**30, 1) for v in cp.cuda.runtime.memGetInfo()])

    @cuda.jit
    def twice(a, out):
        i = cuda.grid(1)
        if i < a.size:
            out[i] = 2 * a[i]

    a = cp.arange(1000, dtype=cp.float32)
    out = cp.full(1000, cp.nan, dtype=cp.float32)
    launch(twice, 4, 256, a, out)
    cp.cuda.runtime.deviceSynchronize()
    ok_kernel = bool((out == 2 * a).all())
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(64, 2048)).astype(np.float32), rng.normal(size=(2048, 512)).astype(np.float32)
    want = A.astype(np.float64) @ B
    errs = {}
    for fast in (False, True):
        C = cp.full((64, 512), cp.nan, dtype=cp.float32)
        gemm_into(cp.asarray(A), cp.asarray(B), C, 0, fast)
        errs["tf32" if fast else "fp32"] = float(np.linalg.norm(cp.asnumpy(C) - want) / np.linalg.norm(want))
    print("numba.cuda kernel on CuPy arrays:", "ok" if ok_kernel else "WRONG")
    print("GEMM relative errors vs float64:", errs)
    tc_err = _tensor_cores(np, cp, False)
    print("LAB tensor-core kernel (NVRTC, mma.sync TF32) relative error vs float64:", tc_err)
    halo_err = _tensor_cores(np, cp, True)
    print("LAB tensor-core halo kernel relative error vs float64:", halo_err)
    return 0 if ok_kernel and errs["fp32"] < 1e-5 and errs["tf32"] < 1e-2 and max(tc_err, halo_err) < 1e-2 else 1


def _tensor_cores(np, cp, halo: bool) -> float:
    """One 3x3 transposed conv, 64 -> 64 channels on 16 signals of 14x14, through lab/tensor_cores.py (its
    flat kernel, or the halo kernel): its relative error against float64 (TF32: ~1e-3), or inf when it does
    not compile or run."""
    from lab import tensor_cores as tc

    why = tc.available()
    if why:
        print("tensor-core kernel unavailable:", why)
        return float("inf")
    rng = np.random.default_rng(1)
    src = rng.normal(size=(64, 16, 14, 14)).astype(np.float32)
    w = rng.normal(size=(64, 64, 3, 3)).astype(np.float32)
    out = cp.full((64, 16, 14, 14), cp.nan, dtype=cp.float32)
    try:
        tc.launch(cp.asarray(src), cp.zeros(1, cp.int32), cp.asarray(tc.weight_layout(w)), out,
                  64, 64, 16, 14, 14, 14, 14, 14, 14, 0, 1, False, (3, 3), (1, 1), None, halo=halo)
        cp.cuda.runtime.deviceSynchronize()
    except Exception as exc:  # what failed is the point of a preflight
        print("tensor-core kernel FAILED:", type(exc).__name__, str(exc)[:2000])
        return float("inf")
    # out[i, t, y, x] = sum w[o, i, ky, kx] src[o, t, y + 1 - ky, x + 1 - kx]
    pad = np.pad(src.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((64, 16, 14, 14))
    for ky in range(3):
        for kx in range(3):
            want += np.einsum("oi,otyx->ityx", w[:, :, ky, kx], pad[:, :, 2 - ky:16 - ky, 2 - kx:16 - kx])
    return float(np.linalg.norm(cp.asnumpy(out) - want) / np.linalg.norm(want))


if __name__ == "__main__":
    sys.exit(main())
