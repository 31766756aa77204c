"""The preprocessing of a dataset's images: :class:`Transform` and the geometry and channel steps it runs.

Every image of a dataset goes through a :class:`Transform`: the channels and exact ``resize`` of
:class:`clearmaps.images.Preprocess`, or the usual ``short_side`` resize (the shorter side to N, the aspect
kept: torchvision's ``Resize(N)``) followed by a centre ``crop`` (torchvision's ``CenterCrop``); then
8-bit / 255, and at explain time the Preprocess's invert and mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import Preprocess, parse_size
from .reference import ClearmapsError


@dataclass(frozen=True)
class Transform:
    """Preprocessing of a dataset's images: ``pre`` (channels, exact resize, invert, mean/std; see
    :class:`clearmaps.images.Preprocess`), then ``short_side`` (shorter side to N, aspect kept) and a centre
    ``crop`` (H, W). ``short_side`` and ``pre.resize`` exclude each other."""

    pre: Preprocess = Preprocess()
    short_side: int | None = None
    crop: tuple[int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.pre, Preprocess):
            raise ClearmapsError(f"pre is a {type(self.pre).__name__}; expected a clearmaps.images.Preprocess.")
        if self.short_side is not None:
            if isinstance(self.short_side, bool) or not isinstance(self.short_side, (int, np.integer)) \
                    or self.short_side < 1:
                raise ClearmapsError(f"short_side={self.short_side!r}; expected a positive int (the shorter "
                                     "side in pixels, the aspect kept).")
            if self.pre.resize is not None:
                raise ClearmapsError("give resize (an exact H×W) or short_side (the shorter side, aspect kept), "
                                     "not both.")
        if self.crop is not None:
            size = parse_size("x".join(str(v) for v in np.atleast_1d(self.crop)))
            object.__setattr__(self, "crop", size)

    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every image after this transform, when it fixes one."""
        return self.crop or self.pre.resize

    def describe(self, channels: int, size) -> str:
        text = self.pre.describe(channels, size)
        extra = []
        if self.short_side:
            extra.append(f"shorter side resized to {self.short_side} (bilinear, aspect kept)")
        if self.crop:
            extra.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        return text + ("; then " + ", ".join(extra) if extra else "")

    def settings(self) -> dict:
        p = self.pre
        return {"mode": p.mode, "resize": list(p.resize) if p.resize else None, "invert": p.invert,
                "mean": list(p.mean) if p.mean else None, "std": list(p.std) if p.std else None,
                "short_side": self.short_side, "crop": list(self.crop) if self.crop else None}


def _resize_planes(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, H, W) float → (C, h, w), bilinear on float32 planes (as :mod:`clearmaps.images` resizes)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(plane.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
                     for plane in a]).astype(np.float64)


def _geometry(a: np.ndarray, t: Transform, where: str) -> np.ndarray:
    """short_side and crop on one (C, H, W) image (exact resize is done by the reader)."""
    if t.short_side:
        h, w = a.shape[1:]
        s = t.short_side
        # torchvision's Resize(int): the shorter side becomes s, the longer is truncated in proportion
        nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if (nh, nw) != (h, w):
            a = _resize_planes(a, nh, nw)
    if t.crop:
        ch, cw = t.crop
        h, w = a.shape[1:]
        if h < ch or w < cw:
            raise ClearmapsError(f"{where} is {h}x{w}, smaller than the crop {ch}x{cw}; resize it first "
                                 f"(--short-side {max(ch, cw)}) or crop less.")
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        a = a[:, top:top + ch, left:left + cw]
    return a


def _convert_channels(batch: np.ndarray, mode: str | None, channels: int, where: str) -> np.ndarray:
    """(B, C, H, W) → the model's channels, only by the mode asked for (the same rules as images.py)."""
    c = batch.shape[1]
    if mode == "grayscale" and c == 3:
        batch = np.tensordot(np.array([0.299, 0.587, 0.114]), batch, axes=([0], [1]))[:, None]
    elif mode == "rgb" and c == 1:
        batch = np.repeat(batch, 3, axis=1)
    if batch.shape[1] != channels:
        what = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
        raise ClearmapsError(f"{where} is {what.get(batch.shape[1], f'{batch.shape[1]}-channel')} but the model "
                             f"takes {what.get(channels, f'{channels} channels')}; convert it with "
                             f"{'--grayscale' if channels == 1 else '--rgb'}.")
    return batch
