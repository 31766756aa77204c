"""The one exception type clearmaps raises for bad input, and the checks that raise it.

Every public function validates its arguments here, before any arithmetic, so that a user sees one
message that says what was wrong and what was expected, never a traceback from deep inside NumPy.

The checks are written for any array module, so that every backend refuses the same mistake with the same
words: a NumPy array is checked as it is; a GPU array (one exporting ``__cuda_array_interface__`` with a
NumPy dtype, such as a CuPy array) is checked where it lives, through its shape, dtype and elementwise
operators, without being copied to the host and without this module importing its library.
"""

from __future__ import annotations

import numpy as np


class ClearmapsError(ValueError):
    """Bad input to clearmaps: the message says what was wrong, what was expected and how to fix it."""


def _is_device_array(a) -> bool:
    """A GPU array this module can check without a copy: it exports ``__cuda_array_interface__`` and has a
    NumPy dtype (CuPy; a torch CUDA tensor has torch dtypes and is converted by its caller)."""
    return hasattr(a, "__cuda_array_interface__") and isinstance(getattr(a, "dtype", None), np.dtype)


def first_nonfinite(a) -> tuple | None:
    """The index of the first NaN or Inf of the float array ``a`` in row-major order, or None.

    Array-module agnostic: x - x is 0 exactly for a finite x and NaN for NaN or ±Inf, so one subtraction and
    one comparison find them with any array type's own operators (on a GPU, on the GPU)."""
    with np.errstate(invalid="ignore"):
        bad = (a - a) != 0
    if not bool(bad.any()):
        return None
    flat = int(bad.reshape(-1).nonzero()[0][0])
    return tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape)))


def check_array(a, name: str, ndim: int | None = None, *, kinds: str = "f",
                finite: bool = True, shape_hint: str = ""):
    """Return ``a`` as an array after checking its rank, dtype kind and finiteness.

    ``kinds`` is a string of NumPy dtype kinds that are accepted ("f" float, "i"/"u" integers, "b" bool).
    A GPU array (CuPy) is returned as it is, checked on its device; anything else is read as a NumPy array.
    """
    if a is None:
        raise ClearmapsError(f"{name} is missing (got None); expected an array{shape_hint}.")
    if not isinstance(a, np.ndarray) and not _is_device_array(a):
        try:
            a = np.asarray(a)
        except Exception as exc:  # e.g. ragged lists
            raise ClearmapsError(f"{name} could not be read as an array ({exc}); "
                                 f"expected an array{shape_hint}.") from None
    shape = tuple(a.shape)
    if ndim is not None and a.ndim != ndim:
        raise ClearmapsError(f"{name} has shape {shape} (rank {a.ndim}); expected rank {ndim}{shape_hint}.")
    if a.dtype.kind not in kinds:
        want = {"f": "floating point", "i": "signed integer", "u": "unsigned integer",
                "b": "boolean"}
        expected = " or ".join(want.get(k, k) for k in kinds)
        raise ClearmapsError(f"{name} has dtype {a.dtype}; expected {expected}{shape_hint}.")
    if a.dtype.kind == "f" and a.dtype.itemsize < 4:
        raise ClearmapsError(f"{name} has dtype {a.dtype}; expected float32 or float64 "
                             "(convert half precision with .astype(np.float32)).")
    if finite and a.dtype.kind == "f" and a.size:
        bad = first_nonfinite(a)
        if bad is not None:
            raise ClearmapsError(f"{name} contains NaN or Inf (first at index {bad}); expected finite values.")
    return a


def check_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a pair."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise ClearmapsError(f"{name} is {value!r}; expected an int or a pair of ints.") from None
        if len(pair) != 2 or any(isinstance(v, bool) for v in value):
            raise ClearmapsError(f"{name} is {value!r}; expected an int or a pair of ints.")
    if min(pair) < minimum:
        raise ClearmapsError(f"{name} is {value!r}; each entry must be at least {minimum}.")
    return pair
