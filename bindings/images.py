"""Image files and arrays → the float batches a network takes, with every preprocessing step explicit.

Sources: image files Pillow reads (PNG, JPEG, BMP, TIFF, ...), folders of them (sorted, not recursive),
``.npy`` arrays and ``.npz`` batches (the array under "images" or "x", or the only one; labels under
"labels" or "y" when present).

Preprocessing, in this order, and nothing else:
  1. channels: as read, or converted with ``mode="grayscale"`` (ITU-R 601 luma, Pillow's "L") or
     ``mode="rgb"`` (grey copied to R, G, B). Without a mode, an image whose channels differ from the
     model's is refused with a message naming the option that converts it.
  2. size: as read, or ``resize`` to H×W (bilinear). Without it, a size the model does not take is refused.
  3. scale: 8-bit pixels / 255 and 16-bit pixels / 65535 → [0, 1], by the file's bit depth (never by its
     content); float images and arrays are taken as already in [0, 1], and refused when they are not.
  4. ``invert``: x → 1 − x (dark digits on a light page → MNIST's light digits on black).
  5. normalise: (x − mean) / std per channel, when given.

Limits, checked from headers before anything is decoded or allocated, so that a small file cannot take a
large amount of memory: an image file is decoded only when its header says it has at most
:data:`MAX_PIXELS` pixels (and, without ``resize``, only when it has the model's size and channels); an
array file, or each array read from an ``.npz``, only when its header says it holds at most
:data:`MAX_ARRAY_VALUES` values and the file is long enough to hold them. Item names (the ``clearmaps``
command's output folders) are single, safe path components, unique within a run (:func:`safe_name`).
"""

from __future__ import annotations

import os
import re
import reprlib
import unicodedata
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .reference import ClearmapsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
ARRAY_SUFFIXES = (".npy", ".npz")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

MAX_PIXELS = 1 << 26
"""Most pixels (H × W) an image file may have to be decoded, and a ``resize`` may ask for: 8192 × 8192. An
image at the limit takes at most about 25 bytes a pixel while it is read (1.7 GB for RGB)."""
MAX_ARRAY_VALUES = 1 << 28
"""Most values one array of a ``.npy``/``.npz`` file may hold (2 GiB once read as float64)."""
_NAME_BYTES = 120  # an output folder's name, in UTF-8 bytes: with "-NNNN" suffixes well within 255
_ROWS_VALUES = 1 << 20  # values per chunk when an image is converted row block by row block
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _one_line(text) -> str:
    """A foreign library's message as one short line (no newlines, no terminal escape codes)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text))
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Preprocess:
    """How images become network input (see the module docstring for the order of the steps).

    mode : None (keep the channels as read), "grayscale" or "rgb"
    resize : None, an int N (N × N) or (H, W); at most :data:`MAX_PIXELS` pixels
    invert : bool
    mean, std : None or one value per channel (or one value for all)
    """

    mode: str | None = None
    resize: tuple[int, int] | None = None
    invert: bool = False
    mean: tuple | None = None
    std: tuple | None = None

    def __post_init__(self):
        if not (self.mode is None or (isinstance(self.mode, str) and self.mode in ("grayscale", "rgb"))):
            raise ClearmapsError(f"mode={_short.repr(self.mode)}; expected None, 'grayscale' or 'rgb'.")
        if self.resize is not None:
            size = (self.resize, self.resize) if _is_int(self.resize) else self.resize
            ok = isinstance(size, (list, tuple, np.ndarray)) and len(size) == 2 and \
                all(_is_int(v) and v >= 1 for v in size)
            if not ok:
                raise ClearmapsError(f"resize={_short.repr(self.resize)}; expected a size H×W: an int N or a pair "
                                     "(H, W) of positive ints.")
            size = (int(size[0]), int(size[1]))
            _check_resize_pixels(size, f"resize={size!r}")
            object.__setattr__(self, "resize", size)
        if not isinstance(self.invert, (bool, np.bool_)):
            raise ClearmapsError(f"invert={_short.repr(self.invert)}; expected True or False.")
        object.__setattr__(self, "invert", bool(self.invert))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                values = [value] if isinstance(value, Real) else value
                ok = isinstance(values, (list, tuple, np.ndarray))
                if ok:
                    values = list(values)
                    ok = 1 <= len(values) <= 4096 and all(isinstance(v, Real) and not isinstance(v, bool)
                                                          and np.isfinite(float(v)) for v in values)
                if not ok:
                    raise ClearmapsError(f"{name}={_short.repr(value)}; expected finite numbers, one per channel "
                                         "(or one for all).")
                object.__setattr__(self, name, tuple(float(v) for v in values))
        if self.std is not None and min(self.std) <= 0:
            raise ClearmapsError(f"std={self.std!r}; every std must be positive.")

    def describe(self, channels: int, size) -> str:
        """One line saying exactly what is done to every image, for a model taking ``channels`` × ``size``."""
        parts = [{None: "channels as read", "grayscale": "converted to grayscale (ITU-R 601 luma)",
                  "rgb": "converted to RGB"}[self.mode]]
        if self.resize:
            parts.append(f"resized to {self.resize[0]}x{self.resize[1]} (bilinear)")
        else:
            parts.append("size as read" + (f" (the model takes {size[0]}x{size[1]})" if size and None not in size
                                           else ""))
        parts.append("8-bit pixels / 255 -> [0, 1] (16-bit / 65535; float images and arrays taken as already in "
                     "[0, 1])")
        if self.invert:
            parts.append("inverted (1 - x)")
        if self.mean is not None or self.std is not None:
            parts.append(f"normalised (x - {list(self.mean or (0.0,))}) / {list(self.std or (1.0,))}")
        else:
            parts.append("no mean/std normalisation")
        return f"preprocessing for a {channels}-channel model: " + ", ".join(parts)

    def per_channel(self, name: str, channels: int) -> np.ndarray:
        value = getattr(self, name)
        default = 0.0 if name == "mean" else 1.0
        v = np.asarray(value if value is not None else (default,), dtype=np.float64)
        if v.size == 1:
            return np.full(channels, v[0])
        if v.size != channels:
            raise ClearmapsError(f"--{name} has {v.size} values for a {channels}-channel model; give one value "
                                 f"or {channels}.")
        return v

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Steps 4–5 on (B, C, H, W) values in [0, 1]."""
        x = 1.0 - pixels if self.invert else pixels
        c = x.shape[1]
        return ((x - self.per_channel("mean", c)[:, None, None]) / self.per_channel("std", c)[:, None, None]
                ).astype(np.float32)

    def background(self, value: float, channels: int) -> np.ndarray:
        """A fill value given in pixel units [0, 1] (before inversion and normalisation), as network input."""
        bg = np.full((1, channels, 1, 1), float(value))
        return self.normalise(bg).reshape(channels).astype(np.float64)


def _check_resize_pixels(size, what: str) -> None:
    h, w = size
    if h * w > MAX_PIXELS:
        raise ClearmapsError(f"{what} asks for {h * w:,} pixels per image; at most {MAX_PIXELS:,} (e.g. 8192x8192) "
                             "are allowed.")


@dataclass
class Item:
    """One input image. ``pixels`` is (C, H, W) float in [0, 1] after channel conversion and resizing
    (what is shown in figures); ``label`` is a class id from an .npz when it has labels; ``name`` is a
    single safe path component (:func:`safe_name`); ``extra["original"]``, when the image was resized, is
    uint8 (H, W, 3): the image before, to draw the overlay on."""

    name: str
    source: str
    pixels: np.ndarray
    label: int | None = None
    extra: dict = field(default_factory=dict)


# ---- names --------------------------------------------------------------------------------------------

_NOT_IN_NAMES = set('/\\:*?"<>|')


def safe_name(text) -> str:
    """A name derived from ``text`` that is one safe path component on every common file system.

    Path separators, control characters and the characters Windows forbids (``\\ / : * ? " < > |``) become
    "_"; leading and trailing dots and spaces are dropped (so "." and ".." cannot result, and nothing is
    hidden or clashes with clearmaps' own dot files); the name is cut to 120 UTF-8 bytes; an empty result is
    "image". Names that are already safe are kept as they are.
    """
    name = unicodedata.normalize("NFC", str(text))
    name = "".join("_" if ch in _NOT_IN_NAMES or unicodedata.category(ch)[0] == "C" else ch for ch in name)
    name = name.strip(" .")
    name = name.encode("utf-8")[:_NAME_BYTES].decode("utf-8", "ignore").rstrip(" .")
    return name or "image"


def unique_name(name: str, seen: set) -> str:
    """``name`` made safe and unique among ``seen`` (compared without case: "A" and "a" are one folder on
    case-insensitive file systems)."""
    base = safe_name(name)
    name, n = base, 1
    while name.casefold() in seen:
        n += 1
        name = f"{base}-{n}"
    seen.add(name.casefold())
    return name


# ---- fitting an image to the model ----------------------------------------------------------------------

def _fix_hint(pre: Preprocess, channels: int, size) -> str:
    flags = []
    if size and None not in size:
        flags.append(f"--resize {size[0]}" if size[0] == size[1] else f"--resize {size[0]}x{size[1]}")
    flags.append("--grayscale" if channels == 1 else "--rgb")
    return " ".join(flags)


def _converted_channels(c: int, pre: Preprocess) -> int:
    if pre.mode == "grayscale" and c == 3:
        return 1
    if pre.mode == "rgb" and c == 1:
        return 3
    return c


def _check_channels(c: int, pre: Preprocess, channels: int | None, size, where: str) -> None:
    c = _converted_channels(c, pre)
    if channels is not None and c != channels:
        what = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
        raise ClearmapsError(f"{where} is {what.get(c, f'{c}-channel')} but the model takes "
                             f"{what.get(channels, f'{channels} channels')}; convert it with "
                             f"{'--grayscale' if channels == 1 else '--rgb'} (e.g. {_fix_hint(pre, channels, size)}).")


def _check_size(h: int, w: int, pre: Preprocess, channels: int | None, size, where: str) -> None:
    if pre.resize is not None:
        h, w = pre.resize
    if size and None not in size and (h, w) != tuple(size):
        raise ClearmapsError(f"{where} is {h}x{w} but the model takes {size[0]}x{size[1]}; "
                             f"resize it with {_fix_hint(pre, channels, size)}.")


def _check_fit(c: int, h: int, w: int, pre: Preprocess, channels: int | None, size, where: str) -> None:
    """Refuse an image of ``c`` channels and ``h`` × ``w`` pixels that the preprocessing cannot fit to the
    model, before anything is converted: channels first, then size."""
    _check_channels(c, pre, channels, size, where)
    _check_size(h, w, pre, channels, size, where)


def _convert_channels(a: np.ndarray, pre: Preprocess, channels: int, size, where: str) -> np.ndarray:
    """(C, H, W) float → the model's channels, by the mode asked for (never silently)."""
    _check_channels(a.shape[0], pre, channels, size, where)
    c = a.shape[0]
    if pre.mode == "grayscale" and c == 3:
        a = (a * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(axis=0, keepdims=True)
    elif pre.mode == "rgb" and c == 1:
        a = np.repeat(a, 3, axis=0)
    return a


def _resize_planes(planes, size) -> np.ndarray:
    """float32 planes (each (H, W)) → (C, h, w) float64, each resized bilinearly by Pillow in float mode."""
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(
        (w, h), Image.Resampling.BILINEAR)) for p in planes]).astype(np.float64)


def _resize(a: np.ndarray, pre: Preprocess, channels: int, size, where: str) -> np.ndarray:
    if pre.resize is not None and a.shape[1:] != pre.resize:
        a = _resize_planes(a, pre.resize)
    _check_size(a.shape[1], a.shape[2], pre, channels, size, where)
    return a


# ---- sources --------------------------------------------------------------------------------------------

def expand_sources(sources) -> list[Path]:
    """Files and folders → the list of files to read, in order (folders sorted, not recursive; in a folder
    only regular files with a known suffix, so a FIFO or a device is never opened)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(sources, (bytes, dict)) or not hasattr(sources, "__iter__"):
        raise ClearmapsError(f"inputs are {_short.repr(sources)}; expected a list of file or folder names.")
    files = []
    for s in sources:
        if not isinstance(s, (str, os.PathLike)):
            raise ClearmapsError(f"input {_short.repr(s)} is not a path; expected file or folder names.")
        p = Path(s)
        if p.is_dir():
            known = IMAGE_SUFFIXES + ARRAY_SUFFIXES
            try:
                found = sorted(q for q in p.iterdir() if q.suffix.lower() in known and q.is_file())
            except OSError as exc:
                raise ClearmapsError(f"folder {str(p)!r} could not be listed ({exc.strerror or exc}).") from None
            if not found:
                raise ClearmapsError(f"folder {str(p)!r} holds no images ({', '.join(known)}).")
            files += found
        elif p.is_file():
            files.append(p)
        elif not p.exists():
            raise ClearmapsError(f"input {str(p)!r} does not exist.")
        else:
            raise ClearmapsError(f"input {str(p)!r} is neither a file nor a folder.")
    return files


def load_images(sources, pre: Preprocess, channels: int, size, keep_original: bool = False
                ) -> tuple[list[Item], list[str]]:
    """Read every source into :class:`Item`s fitted to a model taking ``channels`` × ``size`` (``size``
    None or (None, None): any size).

    Returns the items and notes on how arrays were interpreted (for printing). Any problem raises one
    :class:`ClearmapsError` naming the file and the fix. Item names are unique and safe as folder names. A
    resized image keeps a uint8 copy of itself before resizing in ``extra["original"]`` (at most 1,024 px a
    side), to draw the overlay on, when ``keep_original``.
    """
    from .image_files import _read_array_file, _read_image_file, display_copy

    if not isinstance(pre, Preprocess):
        raise ClearmapsError(f"pre is a {type(pre).__name__}; expected a clearmaps.images.Preprocess.")
    items, notes, seen = [], [], set()
    for path in expand_sources(sources):
        if path.suffix.lower() in ARRAY_SUFFIXES:
            batch, labels, layout = _read_array_file(path)
            notes.append(f"{path}: {batch.shape[0]} image(s), read as {layout}"
                         + (", with labels" if labels is not None else ""))
            for i, a in enumerate(batch):
                where = f"{str(path)!r} image {i}"
                converted = _convert_channels(a, pre, channels, size, where)
                a = _resize(converted, pre, channels, size, where)
                extra = {"original": display_copy(converted)} if keep_original and a.shape != converted.shape else {}
                name = unique_name(path.stem if batch.shape[0] == 1 else f"{path.stem}-{i:04d}", seen)
                items.append(Item(name, f"{path}[{i}]", a, None if labels is None else int(labels[i]), extra))
        else:
            a, original = _read_image_file(path, pre, channels, size, keep_original)
            items.append(Item(unique_name(path.stem, seen), str(path), a,
                              extra={"original": original} if original is not None else {}))
    return items, notes


def parse_size(text: str) -> tuple[int, int]:
    """"28" → (28, 28); "32x48" → (32, 48); at most :data:`MAX_PIXELS` pixels."""
    try:
        parts = [int(p) for p in str(text).lower().replace("×", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ClearmapsError(f"--resize {text!r}; expected a size like 28 or 32x48 (H x W).")
    _check_resize_pixels(parts, f"--resize {text}")
    return parts[0], parts[1]
