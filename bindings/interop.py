"""Arrays in, arrays out: which framework and device the caller's arrays live in, and how they cross to the
backends and back without copies.

The backends compute on NumPy arrays (the reference, the Numba CPU kernels) or on CuPy arrays (the CUDA
kernels). A caller's array crosses once, through DLPack, as a view of the same memory:

    caller's array                 backend sees             results come back as
    NumPy ndarray                  itself                   NumPy arrays
    torch tensor on the CPU        np.from_dlpack view      torch.from_dlpack   (shared memory)
    JAX array on the CPU           np.from_dlpack view      jax.dlpack.from_dlpack (see below)
    CuPy ndarray                   itself                   CuPy arrays
    torch tensor on a CUDA GPU     cupy.from_dlpack view    torch.from_dlpack   (on torch's current stream)
    JAX array on a CUDA GPU        cupy.from_dlpack view    jax.dlpack.from_dlpack

JAX's CPU import shares a buffer only when it is 64-byte aligned (NumPy aligns to 16), else JAX copies it
once; in JAX's default 32-bit mode, float64 / int64 results (the reference's responses, class ids) arrive
as float32 / int32, as every JAX array does (``jax.enable_x64`` keeps them, and shares them).

Policy for images that cannot cross as they are (documented in the README, tested in test_interop.py):

- float32 and float64 cross as they are. Every other dtype is refused, with the conversion to write:
  float16 and bfloat16 (the kernels have no half-precision path; whether a float32 copy is worth it is
  the caller's call, ``x.float()``), integers (images must be preprocessed as the network was trained; a
  guessed ``/ 255`` would silently give wrong maps), bool and complex.
- non-contiguous images (a permuted or sliced tensor, channels_last) are made contiguous once, with a
  :class:`CopyWarning`: the kernels read NCHW rows.
- torch tensors that require grad are refused (CLEAR maps are not differentiable here); ``x.detach()``
  shares the memory and costs nothing. JAX tracers (inside ``jit``/``grad``/``vmap``) are refused.
- an array on a device the backend cannot use (a CUDA tensor with backend="cpu", a torch/JAX host array
  with backend="cuda"), or on a device clearmaps has no backend for (MPS, TPU, meta), is refused: nothing
  is moved between devices behind the caller's back. NumPy arrays (no device of their own) go to any
  backend; "cuda" copies them to the GPU and back, as the CLI does.

Streams: for torch CUDA tensors the backend runs with torch's current stream as CuPy's current stream, so
a backend must launch all its work on CuPy's current stream (``cupy.cuda.get_current_stream()``; for
numba.cuda kernels ``cuda.external_stream(cupy.cuda.get_current_stream().ptr)``), never on a fixed one.
- ``palette`` and ``classes`` given as arrays must be NumPy arrays, Python sequences, or arrays of the
  images' framework; another framework's array is refused (mixed frameworks). They are tiny and are read
  on the host.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from .backends import BACKENDS, get_backend
from .reference import ClearmapsError, check_input

FRAMEWORKS = ("numpy", "torch", "jax", "cupy")


class CopyWarning(UserWarning):
    """An input was copied once (converted to float32 or made contiguous) before crossing to a backend."""


# --- which framework an array comes from -------------------------------------------------------------------
# Detection never imports a framework: an array of a framework that was never imported cannot exist.

def _torch():
    return sys.modules.get("torch")


def _jax():
    return sys.modules.get("jax")


def _cupy():
    return sys.modules.get("cupy")


def _import_cupy():
    """CuPy, which every GPU path needs (the CUDA backend computes on CuPy arrays)."""
    try:
        import cupy
    except ImportError:
        raise ClearmapsError("the images are on a GPU, and clearmaps computes on GPU arrays through CuPy, "
                             "which is not installed: pip install 'clearmaps[cuda]' (or move the images to "
                             "the host with .cpu()).") from None
    return cupy


def framework_of(a) -> str | None:
    """"numpy", "torch", "jax" or "cupy" for an array of that framework; None for anything else (lists,
    scalars, None), which is read as NumPy."""
    if isinstance(a, np.ndarray):
        return "numpy"
    torch = _torch()
    if torch is not None and isinstance(a, torch.Tensor):
        return "torch"
    jax = _jax()
    if jax is not None and isinstance(a, jax.Array):  # tracers inside jit/grad are jax.Array too
        return "jax"
    cupy = _cupy()
    if cupy is not None and isinstance(a, cupy.ndarray):
        return "cupy"
    return None


def array_module(a):
    """numpy or cupy, whichever the backend array ``a`` belongs to."""
    cupy = _cupy()
    return cupy if cupy is not None and isinstance(a, cupy.ndarray) else np


def to_numpy(a) -> np.ndarray:
    """A small backend array (logits, class ids) on the host: the same array if it is NumPy, else a copy."""
    return a.get() if array_module(a) is not np else np.asarray(a)


_FRAMEWORK_NAMES = {"numpy": "a NumPy array", "torch": "a torch tensor", "jax": "a JAX array",
                    "cupy": "a CuPy array"}


def _describe(a, framework) -> str:
    if framework == "torch":
        return f"a torch {str(a.dtype).replace('torch.', '')} tensor on {a.device}"
    if framework == "jax":
        return f"a JAX {a.dtype} array"
    if framework == "cupy":
        return f"a CuPy {a.dtype} array on cuda:{a.device.id}"
    if not isinstance(a, np.ndarray):  # a list, None, ...: what the user passed, not an array yet
        return f"a {type(a).__name__}"
    return f"a NumPy {a.dtype} array"


# --- the caller ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    """Where the caller's images live: their framework and device. Moves arrays to the backend and back.

    Attributes
    ----------
    framework : "numpy", "torch", "jax" or "cupy"
    on_gpu : bool
        True when the images are on a CUDA GPU (the backend then computes on CuPy arrays).
    device : object
        The framework's own device object (torch.device, jax Device, CuPy device id), used to put results
        back where the images were.
    """

    framework: str
    on_gpu: bool
    device: object = None

    @property
    def where(self) -> str:
        return f"cuda:{self._gpu_index()}" if self.on_gpu else "the host (CPU)"

    def _gpu_index(self) -> int:
        if self.framework == "torch":
            return self.device.index if self.device.index is not None else _torch().cuda.current_device()
        if self.framework == "jax":
            hardware_id = getattr(self.device, "local_hardware_id", None)
            return self.device.id if hardware_id is None else hardware_id
        return int(self.device)

    # -- the images' dtype and layout policy (module docstring) --
    def conform(self, x, name: str = "x"):
        """``x`` as the backends take it: float32 or float64, and contiguous.

        A strided array is copied once to a contiguous one, with a :class:`CopyWarning`. Any other dtype is
        refused with the conversion to write: half precision (the kernels have no float16 path, and the
        user decides whether a float32 copy is worth it), integers (images must be preprocessed as the
        network was trained: a guessed ``/ 255`` would give wrong maps), bool and complex.
        """
        if self.framework == "numpy" and not isinstance(x, np.ndarray):
            if x is None:
                raise ClearmapsError(f"{name} is missing (got None); expected an array of shape (B, C, H, W).")
            try:
                x = np.asarray(x)  # lists and other array-likes: read as NumPy
            except Exception as exc:
                raise ClearmapsError(f"{name} could not be read as an array ({exc}); expected a float array "
                                     "of shape (B, C, H, W).") from None
        kind, bits = self._dtype_kind_bits(x)
        dtype = str(x.dtype).replace("torch.", "")
        what = f"{_FRAMEWORK_NAMES[self.framework]} on {self.where}"
        as_float32 = {"torch": f"{name}.float()", "jax": f"{name}.astype(jnp.float32)",
                      "cupy": f"{name}.astype(cupy.float32)"}.get(self.framework, f"{name}.astype(np.float32)")
        if kind != "f":
            hint = (f"convert and preprocess it as the network was trained (e.g. {as_float32} / 255 for 8-bit "
                    "images)" if kind in "iu" else "")
            raise ClearmapsError(f"{name} is {what} with dtype {dtype}; expected floating point images "
                                 f"(float32 or float64) of shape (B, C, H, W){': ' + hint if hint else ''}.")
        if bits < 32:
            raise ClearmapsError(f"{name} is {what} with dtype {dtype}; expected float32 or float64 (the "
                                 f"kernels have no half-precision path): convert it with {as_float32}.")
        if self.framework == "numpy" and not x.dtype.isnative:
            warnings.warn(f"{name} has non-native byte order {x.dtype}; it was converted once to native order.",
                          CopyWarning, stacklevel=3)
            x = x.astype(x.dtype.newbyteorder("="))
        if not self._is_contiguous(x):
            warnings.warn(f"{name} ({what}, shape {tuple(x.shape)}) is not contiguous (a transposed, sliced or "
                          f"channels_last array); it was copied once to a contiguous layout on {self.where}. "
                          "Pass a contiguous array to avoid the copy.", CopyWarning, stacklevel=3)
            x = self._contiguous(x)
        return x

    def _dtype_kind_bits(self, x):
        if self.framework == "torch":
            dt = x.dtype
            kind = "c" if dt.is_complex else "f" if dt.is_floating_point else "b" if dt == _torch().bool else "i"
            return kind, dt.itemsize * 8
        dt = np.dtype(x.dtype) if self.framework != "jax" else x.dtype
        if self.framework == "jax" and str(dt) == "bfloat16":  # ml_dtypes' bfloat16 has kind 'V'
            return "f", 16
        return dt.kind, dt.itemsize * 8

    def _is_contiguous(self, x) -> bool:
        if self.framework == "torch":
            return x.is_contiguous()
        if self.framework == "jax":
            return True  # a JAX array has no user-visible strides; DLPack exports it row-major
        return bool(x.flags.c_contiguous)

    def _contiguous(self, x):
        if self.framework == "torch":
            return x.contiguous()
        return array_module(x).ascontiguousarray(x)

    # -- crossing --
    def to_backend(self, a):
        """A view of the caller's array ``a`` as the backend's array: NumPy on the host, CuPy on a GPU.

        No copy: the view shares ``a``'s memory (DLPack). Call inside :meth:`computing` on a GPU, so that
        the exchange happens on the caller's stream.
        """
        if self.framework in ("numpy", "cupy"):
            return a
        if not self.on_gpu:
            return np.from_dlpack(a)
        return _import_cupy().from_dlpack(a)

    def to_caller(self, a):
        """The backend's array ``a`` (NumPy or CuPy; None passes) as the caller's framework's array, on the
        caller's device, sharing ``a``'s memory where the framework can (see the module docstring)."""
        if a is None:
            return None
        if self.on_gpu and array_module(a) is np:  # a small host result (e.g. the palette) of a GPU computation
            a = _import_cupy().asarray(a)
        elif not self.on_gpu and array_module(a) is not np:
            a = a.get()
        xp = array_module(a)
        if self.framework == "numpy":
            return np.asarray(a)
        if self.framework == "cupy":
            return a
        if not a.flags.c_contiguous or (xp is np and not a.flags.writeable):
            # torch aborts the process on negative strides, JAX refuses read-only buffers: copy those
            # (the backends' results are fresh contiguous arrays, so this only touches small odd ones)
            a = xp.array(a, order="C")
        if self.framework == "torch":
            return _torch().from_dlpack(a)
        import jax

        out = jax.dlpack.from_dlpack(a)
        return out if self.device is None or out.devices() == {self.device} else jax.device_put(out, self.device)

    @contextlib.contextmanager
    def computing(self):
        """Context in which the backend runs: on a GPU, the images' device and the caller's stream (torch's
        current stream for torch tensors, CuPy's current stream otherwise), so nothing synchronises."""
        if not self.on_gpu:
            yield
            return
        cupy = _import_cupy()
        with cupy.cuda.Device(self._gpu_index()):
            if self.framework == "torch":
                torch_stream = _torch().cuda.current_stream(self.device)
                with cupy.cuda.ExternalStream(torch_stream.cuda_stream, self._gpu_index()):
                    yield
            else:
                yield


def caller_of(x, name: str = "x", **others) -> Caller:
    """Inspect the images ``x`` (and the other array arguments, by name): their framework and device.

    Refuses, each with one :class:`ClearmapsError`: tensors that require grad, JAX tracers, arrays on a
    device clearmaps cannot compute on, arrays sharded over several devices, and other array arguments
    from a different framework than ``x`` (NumPy arrays and Python sequences are accepted with any).
    """
    framework = framework_of(x) or "numpy"
    for other, value in others.items():
        theirs = framework_of(value)
        if theirs not in (None, "numpy", framework):
            raise ClearmapsError(f"{name} is {_describe(x, framework)} but {other} is "
                                 f"{_describe(value, theirs)}: mixed frameworks in one call. Give {other} as "
                                 f"a list, a NumPy array or a {framework} array.")
    if framework == "numpy":
        return Caller("numpy", False)
    if framework == "torch":
        _refuse_grad(x, name)
        if x.device.type not in ("cpu", "cuda"):
            raise _unsupported_device(name, _describe(x, framework))
        return Caller("torch", x.device.type == "cuda", x.device)
    if framework == "jax":
        if _is_tracer(x):
            raise ClearmapsError(f"{name} is a JAX tracer: clearmaps.explain cannot run inside jax.jit, grad "
                                 "or vmap. Call it on concrete arrays, outside the transformed function.")
        devices = x.devices()
        if len(devices) != 1:
            raise ClearmapsError(f"{name} is a JAX array sharded over {len(devices)} devices; expected an "
                                 "array on one device (jax.device_put(x, device)).")
        device = next(iter(devices))
        if device.platform not in ("cpu", "gpu", "cuda"):
            raise _unsupported_device(name, f"a JAX array on {device.platform}")
        return Caller("jax", device.platform != "cpu", device)
    return Caller("cupy", True, x.device.id)


def _is_tracer(a) -> bool:
    return isinstance(a, getattr(_jax().core, "Tracer", ()))


def _refuse_grad(t, name):
    if t.requires_grad:
        raise ClearmapsError(f"{name} is a torch tensor that requires grad; CLEAR maps are not "
                             f"differentiable here. Pass {name}.detach() (it shares the memory, no copy).")


def _unsupported_device(name, what):
    return ClearmapsError(f"{name} is {what}; clearmaps computes on the CPU (NumPy) or on CUDA GPUs (CuPy). "
                          f"Move it with .cpu() or .cuda().")


def small_to_host(a, name: str):
    """A small array argument (palette, class ids) read on the host: NumPy arrays, sequences and scalars
    pass unchanged; a torch / JAX / CuPy array is copied to a NumPy array (a few values)."""
    framework = framework_of(a)
    if framework == "torch":
        return a.detach().cpu().numpy()
    if framework == "jax":
        if _is_tracer(a):
            raise ClearmapsError(f"{name} is a JAX tracer; give concrete values.")
        return np.asarray(a)
    if framework == "cupy":
        return a.get()
    return a


def backend_for(name: str, caller: Caller):
    """The backend module that computes for ``caller``'s images.

    A framework's array is computed on where it lives, and never moved behind the caller's back: GPU
    arrays need "cuda", torch/JAX arrays on the host need "reference" or "cpu". "auto" follows them (GPU →
    "cuda"; host → "cpu", else the reference). NumPy arrays have no device to keep: any backend takes them
    ("cuda" copies them to the GPU and its results back) and "auto" means what it means everywhere in
    clearmaps (:func:`clearmaps.get_backend`: CUDA if a GPU is usable, else the Numba CPU kernels, else the
    reference).
    """
    if not isinstance(name, str) or name not in BACKENDS:
        return get_backend(name)  # raises the one message listing the backends
    if caller.framework == "numpy":
        return get_backend(name)
    if name == "auto":
        if caller.on_gpu:
            return get_backend("cuda")
        try:
            return get_backend("cpu")
        except ClearmapsError:
            return get_backend("reference")
    if caller.on_gpu and name != "cuda":
        raise ClearmapsError(f"backend={name!r} computes on the host but the images are on {caller.where} "
                             f"({caller.framework}); use backend='cuda' (or 'auto'), or move them to the host "
                             "first (.cpu()).")
    if not caller.on_gpu and name == "cuda":
        move = "x.cuda()" if caller.framework == "torch" else "jax.device_put(x, jax.devices('gpu')[0])"
        raise ClearmapsError(f"backend='cuda' computes on a GPU but the images are "
                             f"{_FRAMEWORK_NAMES[caller.framework]} on the host; move them to the GPU first ({move}) to get GPU arrays back, or "
                             "use backend='cpu' or 'auto'.")
    return get_backend(name)


def check_images(net, x, name: str = "x"):
    """:func:`clearmaps.reference.check_input` for a backend array, NumPy or CuPy: one check for every backend
    (reference/errors.py checks a GPU array on its device, without a host copy)."""
    return check_input(net, x, name)
