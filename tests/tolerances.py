"""What "equal" means, in one place (docs/design.md, "Tests").

float64 reference vs the torch float64 oracle: relative error ≤ RTOL_F64.
float32 backends vs the float64 reference: ‖out − ref‖ / ‖ref‖ ≤ RTOL_F32; switches exactly equal; dominant
classes exactly equal on *decisive* pixels, those whose top two responses differ by more than
CLASS_MARGIN × the image's largest |response|. float32 responses carry a relative error of a few 1e-7 per
accumulation, far below that margin, so a class that differs there is a real bug, not rounding.
"""

from __future__ import annotations

import numpy as np

RTOL_F64 = 1e-10
RTOL_F32 = 1e-5
CLASS_MARGIN = 1e-4


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ (absolute error when ref is all zeros)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    diff = np.linalg.norm((out - ref).ravel())
    norm = np.linalg.norm(ref.ravel())
    return float(diff / norm) if norm > 0 else float(diff)


def first_mismatches(out, ref, bad, count: int = 5) -> str:
    idx = np.argwhere(bad)[:count]
    return "; ".join(f"{tuple(int(i) for i in ix)}: got {np.asarray(out)[tuple(ix)]!r}, "
                     f"want {np.asarray(ref)[tuple(ix)]!r}" for ix in idx)


def assert_close(out, ref, rtol: float, what: str = "output") -> None:
    """Relative error within ``rtol``; on failure, the first mismatching elements with their indices."""
    err = rel_err(out, ref)
    if not np.isfinite(np.asarray(out, dtype=np.float64)).all() or not err <= rtol:
        o, r = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        bad = ~np.isclose(o, r, rtol=rtol, atol=rtol * max(np.abs(r).max(initial=0.0), 1e-300))
        raise AssertionError(f"{what}: relative error {err:.3e} > {rtol:.0e}; first mismatches "
                             f"{first_mismatches(o, r, bad)}")


def assert_equal(out, ref, what: str = "output") -> None:
    """Exactly equal, reporting the first mismatching elements."""
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference shape {ref.shape}"
    bad = out != ref
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ; first "
                             f"{first_mismatches(out, ref, bad)}")


def decisive(responses, margin: float = CLASS_MARGIN) -> np.ndarray:
    """Pixels (B, H, W) whose dominant class is decided by more than float32 rounding: the top two of the
    reference's responses (B, K, H, W) differ by more than ``margin`` × the image's largest |response|."""
    r = np.asarray(responses, dtype=np.float64)
    if r.shape[1] == 1:
        return np.ones((r.shape[0], *r.shape[2:]), dtype=bool)
    top2 = np.sort(r, axis=1)[:, -2:]
    scale = np.abs(r).reshape(r.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    return (top2[:, 1] - top2[:, 0]) > margin * scale
