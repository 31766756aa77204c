"""LAB (not in the product; lab/README.md): the sparse kernel with its switch offsets loaded eagerly.

What it computes: exactly the product's sparse kernel (clearmaps.kernels.cuda.sparse_kernels.sparse_transpose,
the transposed conv of :func:`clearmaps.reference.conv_transpose2d` on an unpooled plane), the same FMAs in
the same order (same bits). Only the walk over the staged windows differs: behind a pool, each window's
offset d is loaded beside its value, before the zero test, and the test reads it, so that the compiler
cannot sink the load into the branch. The test ``d >= 0`` always holds; the compiler cannot know it.

Why. GPU run 7 put the kernels reading through switches at ~1.6x their model wherever a thread does two
channels; the sm_90 SASS of the lazy walk has a shared load -> compare -> branch chain per nonzero window
(~30 cycles each), the eager one two 128-bit loads per four windows ahead of their tests, at 126 registers
instead of 117 at two channels per thread (72 instead of 64 at one). Bench method cuda-eager.

How: the product generator's source, with each window's lazy walk rewritten (:func:`eager_source`); a dense
source has no offsets and keeps the product's kernel. Plugged into a run by lab.variants.EagerOffsets.
"""

from __future__ import annotations

import re
from functools import lru_cache

from clearmaps.kernels.cuda import sparse_kernels as sk

# the product's walk of one window behind a pool: the offset loaded inside the branch
_LAZY = re.compile(r"^( +)if s != zero:\n\1    d = soff\[_ix\(sb \+ (\d+)\)\]\n", re.M)


def eager_source(code: str) -> str:
    """The sparse kernel's generated ``code`` with every window's offset loaded ahead of its zero test."""
    return _LAZY.sub(lambda m: f"{m[1]}d = soff[_ix(sb + {m[2]})]\n{m[1]}if (s != zero) & (d >= 0):\n", code)


def kernel_name(kh, kw, ph, pw, pool, threads, bias, tile, cpt) -> str:
    """The product's name of the specialisation, marked ``_eager`` behind a pool (a dense source's kernel is
    the product's own)."""
    return sk.kernel_name(kh, kw, ph, pw, pool, threads, bias, tile, cpt) + ("_eager" if pool is not None else "")


@lru_cache(maxsize=None)
def sparse_transpose(kh, kw, ph, pw, pool, threads, bias, tile, cpt=1):
    """sparse_kernels.sparse_transpose with the eager walk (same arguments, same launch)."""
    if pool is None:
        return sk.sparse_transpose(kh, kw, ph, pw, pool, threads, bias, tile, cpt)
    tile = tuple(tile)
    sk.check_specialisation(kh, kw, ph, pw, pool, threads, tile)
    code = eager_source(sk.kernel_source(kh, kw, ph, pw, pool, threads, bias, tile, cpt))
    return sk.jit_source(code, kernel_name(kh, kw, ph, pw, pool, threads, bias, tile, cpt))
