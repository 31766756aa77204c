"""Where the CUDA backend's arrays live, how its kernels are launched, and its one GEMM.

On a GPU the arrays are CuPy arrays and GEMMs go to cuBLAS (``cublasGemmEx`` through CuPy's binding, with
the compute type chosen here: never TF32 unless the caller asks for the fast mode). Under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``, set before Numba is imported) CuPy is not used at all: the arrays
are NumPy arrays, the same ``numba.cuda`` kernels run on the CPU, and the GEMM is ``numpy.matmul``. Every
other module of the backend goes through ``xp`` and the helpers here, so one code path serves both.
"""

from __future__ import annotations

import os

import numpy as np
from numba import config as _numba_config
from numba import cuda

SIMULATED = bool(int(getattr(_numba_config, "ENABLE_CUDASIM", 0) or 0))

if SIMULATED:
    cp = None
    xp = np
else:  # pragma: no cover - needs a GPU
    import cupy as cp

    xp = cp

# Sync and check after every launch (tests and correctness runs turn it on; timing runs leave it off,
# since a sync per launch would serialise the CPU's launch overhead with the GPU's work).
CHECK_LAUNCHES = os.environ.get("CLEARMAPS_CUDA_CHECK", "0") == "1"

# threads per block of the 1-D launches: 8 warps on a GPU (enough to hide latency, small enough to fill the
# SMs); one warp under the simulator, where every launched thread is a Python thread, idle or not
THREADS = 32 if SIMULATED else 256


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def is_device_array(a) -> bool:
    """True for a CuPy array (never under the simulator, where device arrays are NumPy arrays)."""
    return cp is not None and isinstance(a, cp.ndarray)


def on_device(a) -> bool:
    """True when ``a`` lives on a GPU: a CuPy array or any object exporting ``__cuda_array_interface__``
    or a CUDA DLPack capsule (a torch tensor on a GPU, a JAX array...)."""
    if cp is None:
        return False
    if isinstance(a, cp.ndarray) or hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def asdevice(a, dtype=None):
    """``a`` as a C-contiguous array of the backend (CuPy on a GPU, NumPy under the simulator)."""
    if cp is not None and not isinstance(a, cp.ndarray):
        if on_device(a):
            a = cp.from_dlpack(a) if hasattr(a, "__dlpack__") else cp.asarray(a)
        else:
            a = cp.asarray(np.asarray(a))
    a = xp.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))
    if cp is None and not a.flags.writeable:  # the simulator writes every kernel argument back
        a = a.copy()
    return a


def tohost(a):
    """A NumPy array holding ``a`` (a copy from the GPU, or ``a`` itself under the simulator)."""
    if a is None:
        return None
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def _arg(a):
    # Numba would import a CuPy array through __cuda_array_interface__ and synchronise on the stream it
    # names at every launch; the arrays here are all made on the stream the kernels run on (CuPy's
    # current stream, see launch_stream), so that synchronisation only costs time.
    if cp is not None and isinstance(a, cp.ndarray):
        return cuda.as_cuda_array(a, sync=False)
    return a


_STREAMS: dict = {}


def launch_stream():
    """The numba stream that is CuPy's current stream (None under the simulator).

    The backend's CuPy work (allocations, elementwise ops, cuBLAS GEMMs: CuPy's gemmEx binding sets the
    handle's stream to the current one) runs on CuPy's current stream, which bindings/interop.py makes
    torch's current stream. The numba kernels must run on that same stream: on the legacy default stream
    they would race with GEMMs on a torch side stream. Cached per stream pointer (0: the default stream)."""
    if cp is None:
        return None
    ptr = int(cp.cuda.get_current_stream().ptr)
    stream = _STREAMS.get(ptr)
    if stream is None:
        stream = cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)
        _STREAMS[ptr] = stream
    return stream


def launch(kernel, grid, block, *args):
    """Launch a ``numba.cuda`` kernel on CuPy's current stream (:func:`launch_stream`).

    ``grid`` and ``block`` are ints or tuples. Launch errors raise at once; with
    ``CLEARMAPS_CUDA_CHECK=1`` the device is synchronised after each launch so that a fault is reported
    by the launch that caused it.
    """
    grid = tuple(int(g) for g in grid) if isinstance(grid, tuple) else int(grid)
    block = tuple(int(b) for b in block) if isinstance(block, tuple) else int(block)
    if (min(grid) if isinstance(grid, tuple) else grid) <= 0:
        return  # nothing to do (an empty block of columns)
    args = tuple(_arg(a) if isinstance(a, np.ndarray) or is_device_array(a) else a for a in args)
    if cp is None:
        kernel[grid, block](*args)
    else:
        kernel[grid, block, launch_stream()](*args)
    if CHECK_LAUNCHES:
        synchronize()


def synchronize():
    if cp is not None:
        # CuPy checks the status: a kernel that faulted raises CUDARuntimeError here
        cp.cuda.runtime.deviceSynchronize()


def free_bytes() -> int:
    """Device memory this process can still use: the driver's free memory plus CuPy's cached blocks.

    Under the simulator there is no device; 2 GiB stands in (tests set a limit to force splitting)."""
    if cp is None:
        return 2 << 30
    free, _total = cp.cuda.runtime.memGetInfo()
    return int(free) + int(cp.get_default_memory_pool().free_bytes())


# ----------------------------------------------------------------------------------------------- GEMM

_CUBLAS_COMPUTE_32F = 68            # plain fp32 FMA: the exact mode
_CUBLAS_COMPUTE_32F_FAST_TF32 = 77  # inputs rounded to TF32 on the tensor cores: the fast mode
_CUBLAS_GEMM_DEFAULT = -1
_CUDA_R_32F = 0
_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)


def gemm_into(a, b, out, col0: int = 0, fast: bool = False):
    """out[:, col0:col0 + b.shape[1]] = a @ b, in float32.

    a (M, K) and b (K, N) are C-contiguous float32; ``out`` is a C-contiguous (M, N_total) float32
    array of which a block of columns is written, so that a layer's output can be filled block by block
    without a copy. ``fast`` allows TF32 tensor cores (about 3 significant digits); otherwise cuBLAS
    is told CUBLAS_COMPUTE_32F, whatever CUPY_TF32 or CuPy's own compute-type setting say.
    """
    M, K = a.shape
    K2, N = b.shape
    if K2 != K or out.shape[0] != M or col0 < 0 or col0 + N > out.shape[1]:
        raise ValueError(f"gemm_into: a {a.shape} @ b {b.shape} does not fit out {out.shape} at column {col0}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gemm_into: operands must be C-contiguous")
    if N == 0 or M == 0:
        return out
    if cp is None:
        if K == 0:
            out[:, col0:col0 + N] = 0
        else:
            out[:, col0:col0 + N] = np.matmul(a, b, dtype=np.float32)
        return out
    from cupy_backends.cuda.libs import cublas  # pragma: no cover - needs a GPU

    # cuBLAS is column-major: the row-major product out = a @ b is, read column-major,
    # out^T (N x M, leading dim N_total) = b^T (N x K, ld N) @ a^T (K x M, ld K).
    handle = cp.cuda.device.get_cublas_handle()
    cublas.gemmEx(handle, 0, 0, N, M, K, _ONE.ctypes.data,
                  b.data.ptr, _CUDA_R_32F, N,
                  a.data.ptr, _CUDA_R_32F, K,
                  _ZERO.ctypes.data,
                  out.data.ptr + 4 * col0, _CUDA_R_32F, out.shape[1],
                  _CUBLAS_COMPUTE_32F_FAST_TF32 if fast else _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    if CHECK_LAUNCHES:
        synchronize()
    return out
