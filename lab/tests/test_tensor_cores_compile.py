"""The tensor-core kernels' GPU side (lab/tensor_cores.py), compiled without a GPU: every specialisation the
variant can ask for goes through NVRTC (the compiler CuPy's RawKernel uses) for the A100's and the H100's
compute capabilities.

Both kernels (the flat one and the halo one, on every patch that fits) are compiled. The CPU emulation
(lab/tests/test_tensor_cores.py) compiles the same source with its inline assembly swapped out; this is where the assembly itself, NVRTC's lack of host headers and CUDA's 48 KB of static
shared memory per block are checked. Needs NVRTC from pip: ``pip install 'nvidia-cuda-nvrtc>=13,<14'``."""

from __future__ import annotations

import re

import pytest

from lab import tensor_cores as tc


def _patches(k, bm):
    """The halo kernel's patches that fit for kernel k on tiles of bm channels."""
    return tuple(p for p in tc.PATCHES[tc.TILES[bm]["BN"]] if tc.halo_shared_bytes(*k[:2], bm, p) <= tc.SHARED_LIMIT)


# (kernel, pool, tile, full, bias, halo patch: None for the flat kernel); the halo kernel on each of its patches
# that fits for the presets' 3x3 convs, on its squarest for a non-square kernel
SPECS = [(k, pool, bm, full, bias, patch)
         for k in ((3, 3, 1, 1), (2, 3, 1, 0))
         for pool in (None, (2, 2, 2, 2, 0, 0), (2, 2, 3, 3, 1, 1))
         for bm in sorted(tc.TILES)
         for full, bias in ((True, False), (False, True))
         for patch in (None,) + (_patches(k, bm) if k == (3, 3, 1, 1) else _patches(k, bm)[:1])]


def _shared_bytes(ptx: str) -> int:
    return sum(int(n) for n in re.findall(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\S+\[(\d+)\]", ptx))


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_every_specialisation_compiles_with_nvrtc(cc):
    assert sum(spec[-1] is not None for spec in SPECS) > len(SPECS) / 2  # the halo kernel's are there
    for k, pool, bm, full, bias, patch in SPECS:
        ptx = tc.nvrtc_ptx(tc.source(*k, pool, bm, full, bias, patch), cc)
        assert ".entry tc_transpose" in ptx
        # the loop's mma tiles (unrolled), and the staging's rounding of the source to TF32
        assert ptx.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") >= 4 * tc.TILES[bm]["MI"] * 4
        assert "cvt.rna.tf32.f32" in ptx
        assert 0 < _shared_bytes(ptx) <= 48 << 10, (k, pool, bm, _shared_bytes(ptx))
        if patch is not None:  # what patch() counts on
            assert _shared_bytes(ptx) == tc.halo_shared_bytes(*k[:2], bm, patch), (k, bm, patch)


def test_nvrtc_errors_are_reported():
    """A negative control: the mma given one operand too few does not compile, and says so."""
    broken = tc.source(3, 3, 1, 1, None, 64, True).replace('"r"(b[0]), "r"(b[1]));', '"r"(b[0]));')
    with pytest.raises(RuntimeError, match="NVRTC could not compile"):
        tc.nvrtc_ptx(broken)
