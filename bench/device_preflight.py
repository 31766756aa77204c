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
    return 0 if ok_kernel and errs["fp32"] < 1e-5 and errs["tf32"] < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
