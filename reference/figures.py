"""The paper's other pictures and its Table 1 masks (Section 4.2–4.3), as arrays.

heatmap        r(x|true) as "hot", and green where the strongest other class beats it (Figs. 3–4, II)
binary_map     red where the true class dominates, blue where another does (Fig. 4, III)
strong_feature_mask / keep_strong / remove_strong   the "strong features" of Table 1
"""

from __future__ import annotations

import numpy as np

from .colour import resolve_vmax, to_bytes
from .errors import ClearmapsError, check_array


def _true_and_other(responses, true_index):
    r = check_array(responses, "responses", 4, shape_hint=" of shape (B, K, H, W)").astype(np.float64)
    B, K = r.shape[:2]
    t = check_array(true_index, "true_index", 1, kinds="iu", finite=False, shape_hint=f" of shape ({B},)")
    if t.shape != (B,) or t.min() < 0 or t.max() >= K:
        raise ClearmapsError(f"true_index {t.tolist()} must hold one position in 0 .. {K - 1} per image "
                             f"(shape ({B},)).")
    true = r[np.arange(B), t]
    others = r.copy()
    others[np.arange(B), t] = -np.inf
    other = others.max(axis=1) if K > 1 else np.full_like(true, -np.inf)
    return true, other


def heatmap(responses, true_index, vmax=None) -> np.ndarray:
    """Heatmap of the paper's figures: uint8 (B, H, W, 3).

    The true class's response, normalised by the image's strongest response (or ``vmax``), is drawn with
    the "hot" colour map (black → red → yellow → white); where the strongest other class beats it, that
    response is drawn in green instead. ``true_index`` gives each image's true class as a position in K.
    """
    true, other = _true_and_other(responses, true_index)
    level = resolve_vmax(np.maximum(true, other), vmax).reshape(-1, 1, 1)
    scale = np.where(level > 0, level, 1.0)
    t = np.where(level > 0, np.clip(true, 0, scale) / scale, 0.0)
    o = np.where(level > 0, np.clip(other, 0, scale) / scale, 0.0)
    hot = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    green = np.stack([np.zeros_like(o), o, np.zeros_like(o)], axis=-1)
    against = (other > true) & (other > 0)
    return to_bytes(np.where(against[..., None], green, hot))


def binary_map(responses, true_index, threshold: float = 0.0) -> np.ndarray:
    """Binary map: uint8 (B, H, W, 3), red (255, 0, 0) where the true class dominates, blue (0, 0, 255) where
    another class does, black elsewhere. A pixel counts only where its dominant response exceeds
    ``threshold`` times the image's strongest response (0 = any positive response)."""
    if not 0 <= threshold < 1:
        raise ClearmapsError(f"threshold={threshold!r}; expected a fraction in [0, 1).")
    true, other = _true_and_other(responses, true_index)
    d = np.maximum(true, other)
    level = resolve_vmax(d).reshape(-1, 1, 1)
    active = (d > threshold * level) & (d > 0)
    out = np.zeros(d.shape + (3,), dtype=np.uint8)
    out[active & (true >= other), 0] = 255
    out[active & (other > true), 2] = 255
    return out


def strong_feature_mask(response, tau: float) -> np.ndarray:
    """M = r(x|true) > τ · max r(x|true), per image: bool (B, H, W). ``response`` is (B, H, W)."""
    r = check_array(response, "response", 3, shape_hint=" of shape (B, H, W)")
    if not isinstance(tau, (int, float, np.floating)) or not 0 <= tau < 1:
        raise ClearmapsError(f"tau={tau!r}; expected a fraction in [0, 1).")
    top = r.reshape(r.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    return (r > tau * top) & (top > 0)


def _fill(x, keep, background):
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    keep = check_array(keep, "mask", 3, kinds="b", finite=False, shape_hint=" of shape (B, H, W)")
    if keep.shape != (x.shape[0], *x.shape[2:]):
        raise ClearmapsError(f"mask has shape {keep.shape}; expected {(x.shape[0], *x.shape[2:])} to match x.")
    bg = check_array(background, "background", kinds="fiu").astype(x.dtype)
    if bg.ndim > 1 or (bg.ndim == 1 and bg.shape[0] != x.shape[1]):
        raise ClearmapsError(f"background has shape {bg.shape}; expected a number or one value per channel "
                             f"({x.shape[1]},).")
    bg = bg.reshape(1, -1, 1, 1) if bg.ndim == 1 else bg
    return np.where(keep[:, None], x, bg)


def keep_strong(x, mask, background=0.0) -> np.ndarray:
    """"With only strong features": x where ``mask``, ``background`` elsewhere."""
    return _fill(x, mask, background)


def remove_strong(x, mask, background=0.0) -> np.ndarray:
    """"Without strong features": ``background`` where ``mask``, x elsewhere."""
    mask = check_array(mask, "mask", 3, kinds="b", finite=False, shape_hint=" of shape (B, H, W)")
    return _fill(x, ~mask, background)
