"""What every layer record shares: frozen fields set once, shapes checked, the output sizes of sliding
windows and of broadcasting (:mod:`clearmaps.reference.layers`, :mod:`clearmaps.reference.tensor_ops`)."""

from __future__ import annotations

import numpy as np

from .errors import ClearmapsError, check_array


def _frozen(a, name, ndim=None, hint=""):
    a = check_array(a, name, ndim, shape_hint=hint).copy()
    a.flags.writeable = False
    return a


def _set(obj, **values):
    for k, v in values.items():
        object.__setattr__(obj, k, v)


def _need_rank(shape, rank, what):
    if len(shape) != rank:
        raise ClearmapsError(f"{what} takes a tensor of rank {rank + 1} (batch first); it gets one of shape "
                             f"(B, {', '.join(map(str, shape))}).")


def window_output_size(n, kernel, stride, padding, dilation=1, ceil_mode=False, what="window"):
    """torch's output size of a sliding window (conv or pool) along one axis, ``ceil_mode`` included: a
    window that would start in the right padding is dropped."""
    span = dilation * (kernel - 1) + 1
    top = n + 2 * padding - span + ((stride - 1) if ceil_mode else 0)
    out = top // stride + 1
    if ceil_mode and (out - 1) * stride >= n + padding:
        out -= 1
    if out < 1:
        raise ClearmapsError(f"{what} with kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}"
                             f" has no output for an input of size {n}; the input is too small for this network.")
    return out


def broadcast_shape(a, b, what):
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise ClearmapsError(f"{what}: shapes (B, {', '.join(map(str, a))}) and (B, {', '.join(map(str, b))}) "
                             "do not broadcast.") from None
