"""Eq. 6: the CLEAR map as colour. Hue = the dominant class's palette entry, S = 1, V = normalised
dominant response; then HSV → RGB by the standard formula (``colorsys.hsv_to_rgb`` is its scalar oracle).
"""

from __future__ import annotations

import numpy as np

from .errors import ClearmapsError, check_array


def default_palette(num_classes: int) -> np.ndarray:
    """Evenly spaced pure hues: class k of K gets hue k/K (float64, (K,))."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ClearmapsError(f"num_classes={num_classes!r}; expected a positive int.")
    return np.arange(num_classes, dtype=np.float64) / num_classes


def check_palette(palette, num_classes: int | None) -> np.ndarray:
    """A palette of hues in [0, 1], one per class; None gives :func:`default_palette`."""
    if palette is None:
        if num_classes is None:
            raise ClearmapsError("no palette and no num_classes: pass palette=<K hues> or num_classes=K.")
        return default_palette(num_classes)
    p = check_array(palette, "palette", 1, shape_hint=" of K hues in [0, 1]").astype(np.float64)
    if p.size == 0 or p.min() < 0 or p.max() > 1:
        raise ClearmapsError(f"palette holds {p.tolist()}; expected K >= 1 hues in [0, 1].")
    if num_classes is not None and p.size != num_classes:
        raise ClearmapsError(f"palette has {p.size} hues for {num_classes} classes; give one hue per class.")
    return p


def hsv_to_rgb(h, s, v):
    """Vectorised ``colorsys.hsv_to_rgb``: the same six-sector formula, float64, (...,) → (..., 3)."""
    h, s, v = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (h, s, v)))
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    sector = i.astype(np.int64) % 6
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    grey = s == 0.0
    return np.stack([np.where(grey, v, r), np.where(grey, v, g), np.where(grey, v, b)], axis=-1)


def to_bytes(values) -> np.ndarray:
    """[0, 1] floats to uint8 by rounding 255·value half up."""
    return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resolve_vmax(response, vmax=None) -> np.ndarray:
    """The normalising level of each image, float64 (B,).

    vmax: None → each image's max of D; a positive number → that value for all; "batch" → the batch's max,
    shared so images compare; "pNN" (e.g. "p99") → each image's NN-th percentile of its positive D.
    An image whose level is ≤ 0 (no positive response) gets 0: it is drawn black.
    """
    d = np.asarray(response, dtype=np.float64)
    B = d.shape[0]
    if vmax is None:
        return np.maximum(d.reshape(B, -1).max(axis=1), 0.0)
    if isinstance(vmax, str):
        if vmax == "batch":
            return np.full(B, max(float(d.max()), 0.0))
        if vmax.startswith("p"):
            try:
                q = float(vmax[1:])
            except ValueError:
                q = -1.0
            if not 0 < q <= 100:
                raise ClearmapsError(f"vmax={vmax!r}; a percentile is written 'pNN' with 0 < NN <= 100, e.g. 'p99'.")
            out = np.zeros(B)
            for b in range(B):
                pos = d[b][d[b] > 0]
                out[b] = np.percentile(pos, q) if pos.size else 0.0
            return out
        raise ClearmapsError(f"vmax={vmax!r}; expected None, a positive number, 'batch' or a percentile 'pNN'.")
    if isinstance(vmax, bool) or not isinstance(vmax, (int, float, np.integer, np.floating)):
        raise ClearmapsError(f"vmax={vmax!r}; expected None, a positive number, 'batch' or a percentile 'pNN'.")
    try:
        level = float(vmax)  # a Python int beyond int64 has no np.isfinite
    except OverflowError:
        level = float("inf")
    if not np.isfinite(level) or level <= 0:
        raise ClearmapsError(f"vmax={vmax!r}; a number must be finite and positive.")
    return np.full(B, level)


def normalise(response, vmax=None) -> np.ndarray:
    """V of Eq. 6: clip(D, 0, vmax) / vmax per image, float64; 0 where vmax is 0."""
    d = np.asarray(response, dtype=np.float64)
    level = resolve_vmax(d, vmax).reshape(-1, *([1] * (d.ndim - 1)))
    safe = np.where(level > 0, level, 1.0)
    return np.where(level > 0, np.clip(d, 0.0, safe) / safe, 0.0)


def check_compose(class_index, response, palette, num_classes):
    """Validate :func:`compose`'s arguments: int positions and float responses of one shape (B, H, W), every
    position inside the palette. Returns (class_index, response, hues)."""
    index = check_array(class_index, "class_index", 3, kinds="iu", finite=False,
                        shape_hint=" of shape (B, H, W)")
    d = check_array(response, "response", 3, shape_hint=" of shape (B, H, W)")
    if index.shape != d.shape:
        raise ClearmapsError(f"class_index {index.shape} and response {d.shape} must have the same shape.")
    hues = check_palette(palette, num_classes)
    if index.size and (index.min() < 0 or index.max() >= hues.size):
        raise ClearmapsError(f"class_index holds {int(index.max()) if index.max() >= hues.size else int(index.min())}"
                             f"; the palette has {hues.size} entries (0 .. {hues.size - 1}).")
    return index, d, hues


def compose(class_index, response, palette=None, vmax=None, *, num_classes=None) -> np.ndarray:
    """The CLEAR map (Eq. 6): uint8 RGB (B, H, W, 3).

    Parameters
    ----------
    class_index : int array (B, H, W)
        Dominant class of each pixel, as a position into ``palette`` (the order of the chosen classes).
    response : float array (B, H, W)
        Dominant response D of each pixel. Pixels with D <= 0 are black.
    palette : (K,) hues in [0, 1], optional
        F of Eq. 6. Default: :func:`default_palette` of ``num_classes``.
    vmax : None, number, "batch" or "pNN"
        How D is normalised to V (see :func:`resolve_vmax`).
    """
    index, d, hues = check_compose(class_index, response, palette, num_classes)
    v = normalise(d, vmax)
    return to_bytes(hsv_to_rgb(hues[index], 1.0, v))


def palette_rgb(palette) -> np.ndarray:
    """The palette's colours at full value, uint8 (K, 3): what a legend shows."""
    hues = check_palette(palette, None)
    return to_bytes(hsv_to_rgb(hues, 1.0, 1.0))
