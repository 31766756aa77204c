"""The one exception type clearmaps raises for bad input, and the checks that raise it.

Every public function validates its arguments here, before any arithmetic, so that a user sees one
message that says what was wrong and what was expected, never a traceback from deep inside NumPy.
"""

from __future__ import annotations

import numpy as np


class ClearmapsError(ValueError):
    """Bad input to clearmaps: the message says what was wrong, what was expected and how to fix it."""


def check_array(a, name: str, ndim: int | None = None, *, kinds: str = "f",
                finite: bool = True, shape_hint: str = "") -> np.ndarray:
    """Return ``a`` as a NumPy array after checking its rank, dtype kind and finiteness.

    ``kinds`` is a string of NumPy dtype kinds that are accepted ("f" float, "i"/"u" integers, "b" bool).
    """
    if a is None:
        raise ClearmapsError(f"{name} is missing (got None); expected an array{shape_hint}.")
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as exc:  # e.g. ragged lists
            raise ClearmapsError(f"{name} could not be read as an array ({exc}); "
                                 f"expected an array{shape_hint}.") from None
    if ndim is not None and a.ndim != ndim:
        raise ClearmapsError(f"{name} has shape {a.shape} (rank {a.ndim}); expected rank {ndim}{shape_hint}.")
    if a.dtype.kind not in kinds:
        want = {"f": "floating point", "i": "signed integer", "u": "unsigned integer",
                "b": "boolean"}
        expected = " or ".join(want.get(k, k) for k in kinds)
        raise ClearmapsError(f"{name} has dtype {a.dtype}; expected {expected}{shape_hint}.")
    if a.dtype.kind == "f" and a.dtype.itemsize < 4:
        raise ClearmapsError(f"{name} has dtype {a.dtype}; expected float32 or float64 "
                             "(convert half precision with .astype(np.float32)).")
    # an array with all strides 0 (a broadcast scalar, such as the CUDA backend's stand-in for a GPU array,
    # whose values it checks on the device) holds one value: test that one, not every copy of it
    values = a[(0,) * a.ndim] if a.size and not any(a.strides) else a
    if finite and a.dtype.kind == "f" and a.size and not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ClearmapsError(f"{name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)}); "
                             "expected finite values.")
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
