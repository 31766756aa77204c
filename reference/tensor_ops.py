"""The operations that join, split, reduce and move data between the layers that compute: residual sums and
products (Add, Mul, Div), concatenations and slices (Cat, Slice), means and sums over axes (Reduce), and pure
data movement (Reshape, Permute, Expand, Pad). Like every layer (:mod:`clearmaps.reference.layers`), each is a
small frozen record that says which inputs it takes and what shape it gives; :mod:`clearmaps.reference.rules`
says what it computes and how a signal goes back through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ClearmapsError
from .layer_base import _set, broadcast_shape


@dataclass(frozen=True)
class Reduce:
    """Mean (or sum) over some per-image axes (1 = the first axis after the batch), as ``x.mean(dims)``."""

    dims: tuple
    kind: str = "mean"
    keepdim: bool = False

    def __post_init__(self):
        dims = tuple(sorted({int(d) for d in self.dims}))
        if not dims or dims[0] < 1:
            raise ClearmapsError(f"Reduce.dims {self.dims!r}; expected per-image axes >= 1 (0 is the batch).")
        if self.kind not in ("mean", "sum"):
            raise ClearmapsError(f"Reduce.kind {self.kind!r}; expected 'mean' or 'sum'.")
        _set(self, dims=dims, keepdim=bool(self.keepdim))

    arity = 1

    def output_shape(self, shape):
        if self.dims[-1] > len(shape):
            raise ClearmapsError(f"Reduce over axes {self.dims} of a tensor of shape (B, {', '.join(map(str, shape))}).")
        return tuple(1 if i + 1 in self.dims else n for i, n in enumerate(shape)
                     if self.keepdim or i + 1 not in self.dims)

    def __repr__(self) -> str:
        return f"{self.kind}(dims={self.dims}{', keepdim' if self.keepdim else ''})"


@dataclass(frozen=True)
class Add:
    """alpha[0] · a + alpha[1] · b, broadcasting (a residual connection; ``a - b`` has alpha (1, -1))."""

    alpha: tuple = (1.0, 1.0)

    def __post_init__(self):
        a = tuple(float(v) for v in self.alpha)
        if len(a) != 2 or not all(math.isfinite(v) for v in a):
            raise ClearmapsError(f"Add.alpha {self.alpha!r}; expected two finite numbers.")
        _set(self, alpha=a)

    arity = 2

    def output_shape(self, a, b):
        return broadcast_shape(a, b, "Add")

    def __repr__(self) -> str:
        return "Add()" if self.alpha == (1.0, 1.0) else f"Add(alpha={self.alpha})"


@dataclass(frozen=True)
class Mul:
    """a · b elementwise, broadcasting (a squeeze-and-excitation gate)."""

    arity = 2

    def output_shape(self, a, b):
        return broadcast_shape(a, b, "Mul")

    def __repr__(self) -> str:
        return "Mul()"


@dataclass(frozen=True)
class Div:
    """a / b elementwise, broadcasting."""

    arity = 2

    def output_shape(self, a, b):
        return broadcast_shape(a, b, "Div")

    def __repr__(self) -> str:
        return "Div()"


@dataclass(frozen=True)
class Cat:
    """Concatenation of its inputs along one per-image axis (``torch.cat(xs, dim)``; dim 1 = channels)."""

    dim: int = 1
    arity = None  # any number of inputs, at least one

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise ClearmapsError(f"Cat.dim is {self.dim!r}; expected a per-image axis >= 1 (0 is the batch).")

    def output_shape(self, *shapes):
        d = self.dim - 1
        first = shapes[0]
        for s in shapes:
            if len(s) != len(first) or d >= len(s) or any(x != y for i, (x, y) in enumerate(zip(s, first)) if i != d):
                raise ClearmapsError(f"Cat along axis {self.dim} of shapes {[(None, *s) for s in shapes]}: they must "
                                     "agree on every other axis.")
        return tuple(sum(s[d] for s in shapes) if i == d else n for i, n in enumerate(first))

    def __repr__(self) -> str:
        return f"Cat(dim={self.dim})"


@dataclass(frozen=True)
class Slice:
    """x[..., start:stop:step, ...] along one per-image axis (a split, a chunk, or ``x[:, a:b]``)."""

    dim: int
    start: int
    stop: int
    step: int = 1

    def __post_init__(self):
        if min(self.dim, self.start, self.stop - self.start, self.step - 1) < 0 or self.dim < 1:
            raise ClearmapsError(f"Slice(dim={self.dim}, {self.start}:{self.stop}:{self.step}); expected a per-image "
                                 "axis >= 1, 0 <= start <= stop and step >= 1.")

    arity = 1

    def output_shape(self, shape):
        d = self.dim - 1
        if d >= len(shape) or self.stop > shape[d] or self.stop == self.start:
            raise ClearmapsError(f"{self!r} does not fit a tensor of shape (B, {', '.join(map(str, shape))}).")
        return tuple(len(range(self.start, self.stop, self.step)) if i == d else n for i, n in enumerate(shape))

    def __repr__(self) -> str:
        return f"Slice(dim={self.dim}, {self.start}:{self.stop}{'' if self.step == 1 else f':{self.step}'})"


@dataclass(frozen=True)
class Reshape:
    """A view of each image under another shape (``view``, ``flatten``, ``squeeze``): data do not move."""

    shape: tuple

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if min(shape, default=1) < 1:
            raise ClearmapsError(f"Reshape.shape {self.shape!r}; expected positive sizes (no batch axis, no -1).")
        _set(self, shape=shape)

    arity = 1

    def output_shape(self, shape):
        if math.prod(shape) != math.prod(self.shape):
            raise ClearmapsError(f"Reshape to (B, {', '.join(map(str, self.shape))}) of a tensor of shape "
                                 f"(B, {', '.join(map(str, shape))}): the sizes differ. (A network captured by "
                                 "from_torch takes the image size it was captured at.)")
        return self.shape

    def __repr__(self) -> str:
        return f"Reshape{self.shape}"


@dataclass(frozen=True)
class Permute:
    """A reordering of the per-image axes (``permute``, ``transpose``); ``perm`` names the per-image axes
    1 .. n (the batch stays first)."""

    perm: tuple

    def __post_init__(self):
        perm = tuple(int(p) for p in self.perm)
        if sorted(perm) != list(range(1, len(perm) + 1)):
            raise ClearmapsError(f"Permute.perm {self.perm!r}; expected a permutation of 1 .. n.")
        _set(self, perm=perm)

    arity = 1

    def output_shape(self, shape):
        if len(shape) != len(self.perm):
            raise ClearmapsError(f"{self!r} of a tensor of shape (B, {', '.join(map(str, shape))}).")
        return tuple(shape[p - 1] for p in self.perm)

    def __repr__(self) -> str:
        return f"Permute{self.perm}"


@dataclass(frozen=True)
class Expand:
    """Broadcast to a larger shape (``expand``); the signal comes back summed."""

    shape: tuple

    def __post_init__(self):
        _set(self, shape=tuple(int(s) for s in self.shape))

    arity = 1

    def output_shape(self, shape):
        if broadcast_shape(shape, self.shape, "Expand") != self.shape:
            raise ClearmapsError(f"{self!r} of a tensor of shape (B, {', '.join(map(str, shape))}).")
        return self.shape

    def __repr__(self) -> str:
        return f"Expand{self.shape}"


@dataclass(frozen=True)
class Pad:
    """Constant padding as torch's ``F.pad``: ``pad`` = (left, right, top, bottom, ...) from the last axis
    backwards; negative entries crop."""

    pad: tuple
    value: float = 0.0

    def __post_init__(self):
        pad = tuple(int(p) for p in self.pad)
        if not pad or len(pad) % 2:
            raise ClearmapsError(f"Pad.pad {self.pad!r}; expected pairs (before, after) from the last axis back.")
        _set(self, pad=pad, value=float(self.value))

    arity = 1

    def widths(self, rank) -> list:
        """(before, after) for each per-image axis."""
        pairs = [(0, 0)] * rank
        for i in range(len(self.pad) // 2):
            pairs[rank - 1 - i] = (self.pad[2 * i], self.pad[2 * i + 1])
        return pairs

    def output_shape(self, shape):
        if len(self.pad) // 2 > len(shape):
            raise ClearmapsError(f"{self!r} pads more axes than a tensor of shape (B, {', '.join(map(str, shape))}) has.")
        out = tuple(n + a + b for n, (a, b) in zip(shape, self.widths(len(shape))))
        if min(out) < 1:
            raise ClearmapsError(f"{self!r} crops a tensor of shape (B, {', '.join(map(str, shape))}) to nothing.")
        return out

    def __repr__(self) -> str:
        return f"Pad({self.pad}{'' if self.value == 0 else f', value={self.value:g}'})"
