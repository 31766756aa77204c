"""Which module computes: the reference, the Numba CPU kernels or the CUDA kernels."""

from __future__ import annotations

import importlib

from .reference import ClearmapsError

BACKENDS = ("reference", "cpu", "cuda", "auto")

_MODULES = {
    "reference": "clearmaps.reference",
    "cpu": "clearmaps.kernels.cpu",
    "cuda": "clearmaps.kernels.cuda",
}
_HOW_TO_GET = {
    "cpu": "install Numba (pip install numba)",
    "cuda": "install the GPU extra (pip install 'clearmaps[cuda]') on a machine with an NVIDIA GPU",
}


def _load(name: str):
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise ClearmapsError(f"backend {name!r} is not available here ({exc}); {_HOW_TO_GET[name]}, "
                             "or use backend='reference'.") from None
    available = getattr(module, "is_available", lambda: True)
    if not available():
        raise ClearmapsError(f"backend {name!r} is installed but cannot run here "
                             f"({getattr(module, 'why_unavailable', lambda: 'no device')()}); "
                             "use backend='cpu' or 'auto'.")
    return module


def get_backend(name: str = "auto"):
    """The backend module for ``name``: "reference", "cpu", "cuda" or "auto" (CUDA if a GPU is usable,
    else the Numba CPU kernels, else the reference)."""
    if not isinstance(name, str) or name not in BACKENDS:  # an array would compare elementwise
        raise ClearmapsError(f"backend={name!r}; expected one of {BACKENDS}.")
    if name != "auto":
        return _load(name)
    for candidate in ("cuda", "cpu"):
        try:
            return _load(candidate)
        except ClearmapsError:
            continue
    return _load("reference")
