"""Image files and arrays → the float batches a network takes, with every preprocessing step explicit.

Sources: image files Pillow reads (PNG, JPEG, BMP, TIFF, ...), folders of them (sorted, not recursive),
``.npy`` arrays and ``.npz`` batches (the array under "images" or "x", or the only one; labels under
"labels" or "y" when present).

Preprocessing, in this order, and nothing else:
  1. channels: as read, or converted with ``mode="grayscale"`` (ITU-R 601 luma, Pillow's "L") or
     ``mode="rgb"`` (grey copied to R, G, B). Without a mode, an image whose channels differ from the
     model's is refused with a message naming the option that converts it.
  2. size: as read, or ``resize`` to H×W (bilinear). Without it, a size the model does not take is refused.
  3. scale: 8-bit pixels / 255 → [0, 1]; float arrays are taken as already in [0, 1].
  4. ``invert``: x → 1 − x (dark digits on a light page → MNIST's light digits on black).
  5. normalise: (x − mean) / std per channel, when given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .reference import ClearmapsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
ARRAY_SUFFIXES = (".npy", ".npz")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class Preprocess:
    """How images become network input (see the module docstring for the order of the steps).

    mode : None (keep the channels as read), "grayscale" or "rgb"
    resize : None or (H, W)
    invert : bool
    mean, std : None or one value per channel (or one value for all)
    """

    mode: str | None = None
    resize: tuple[int, int] | None = None
    invert: bool = False
    mean: tuple | None = None
    std: tuple | None = None

    def __post_init__(self):
        if self.mode not in (None, "grayscale", "rgb"):
            raise ClearmapsError(f"mode={self.mode!r}; expected None, 'grayscale' or 'rgb'.")
        if self.resize is not None:
            size = tuple(int(v) for v in self.resize)
            if len(size) != 2 or min(size) < 1:
                raise ClearmapsError(f"resize={self.resize!r}; expected a size H×W of positive ints.")
            object.__setattr__(self, "resize", size)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in np.atleast_1d(value))
                if not value or not all(np.isfinite(value)):
                    raise ClearmapsError(f"{name}={getattr(self, name)!r}; expected finite numbers.")
                object.__setattr__(self, name, value)
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
        parts.append("8-bit pixels / 255 -> [0, 1] (float arrays taken as already in [0, 1])")
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


@dataclass
class Item:
    """One input image. ``pixels`` is (C, H, W) float in [0, 1] after channel conversion and resizing
    (what is shown in figures); ``label`` is a class id from an .npz when it has labels."""

    name: str
    source: str
    pixels: np.ndarray
    label: int | None = None
    extra: dict = field(default_factory=dict)


def _fix_hint(pre: Preprocess, channels: int, size) -> str:
    flags = []
    if size and None not in size:
        flags.append(f"--resize {size[0]}" if size[0] == size[1] else f"--resize {size[0]}x{size[1]}")
    flags.append("--grayscale" if channels == 1 else "--rgb")
    return " ".join(flags)


def _convert_channels(a: np.ndarray, pre: Preprocess, channels: int, size, where: str) -> np.ndarray:
    """(C, H, W) float → the model's channels, by the mode asked for (never silently)."""
    c = a.shape[0]
    if pre.mode == "grayscale" and c == 3:
        a = (a * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(axis=0, keepdims=True)
    elif pre.mode == "rgb" and c == 1:
        a = np.repeat(a, 3, axis=0)
    c = a.shape[0]
    if c != channels:
        what = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
        raise ClearmapsError(f"{where} is {what.get(c, f'{c}-channel')} but the model takes "
                             f"{what.get(channels, f'{channels} channels')}; convert it with "
                             f"{'--grayscale' if channels == 1 else '--rgb'} (e.g. {_fix_hint(pre, channels, size)}).")
    return a


def _resize(a: np.ndarray, pre: Preprocess, channels: int, size, where: str) -> np.ndarray:
    from PIL import Image

    if pre.resize is not None and a.shape[1:] != pre.resize:
        h, w = pre.resize
        a = np.stack([np.asarray(Image.fromarray(plane.astype(np.float32)).resize(
            (w, h), Image.Resampling.BILINEAR)) for plane in a]).astype(np.float64)
    if size and None not in size and tuple(a.shape[1:]) != tuple(size):
        raise ClearmapsError(f"{where} is {a.shape[1]}x{a.shape[2]} but the model takes {size[0]}x{size[1]}; "
                             f"resize it with {_fix_hint(pre, channels, size)}.")
    return a


def _read_image_file(path: Path) -> np.ndarray:
    """(C, H, W) float in [0, 1], C = 1 or 3 as stored (alpha dropped, palettes expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _GREY_MODES:
                if mode in ("I", "I;16", "I;16B", "I;16L"):
                    arr = np.asarray(img, dtype=np.float64)
                    top = 65535.0 if arr.max() > 255 else 255.0
                    return (arr / top)[None]
                if mode == "F":
                    return np.clip(np.asarray(img, dtype=np.float64), 0, 1)[None]
                return np.asarray(img.convert("L"), dtype=np.float64)[None] / 255.0
            return np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    except FileNotFoundError:
        raise ClearmapsError(f"image {str(path)!r} does not exist.") from None
    except UnidentifiedImageError:
        raise ClearmapsError(f"image {str(path)!r} could not be read: not an image format Pillow knows "
                             f"(expected one of {', '.join(IMAGE_SUFFIXES)}, or .npy/.npz).") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ClearmapsError(f"image {str(path)!r} could not be read ({exc}); is it truncated or corrupt?") from None


def _array_images(a: np.ndarray, where: str) -> tuple[np.ndarray, str]:
    """An array in a recognised layout → (B, C, H, W) float in [0, 1], and how it was read."""
    if a.dtype.kind not in "fiub":
        raise ClearmapsError(f"{where} has dtype {a.dtype}; expected uint8 pixels or floats in [0, 1].")
    if a.ndim == 2:
        out, layout = a[None, None], "one grayscale image (H, W)"
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3):
        out, layout = a[..., :3].transpose(2, 0, 1)[None], "one colour image (H, W, C)"
    elif a.ndim == 3:
        out, layout = a[:, None], "a batch of grayscale images (B, H, W)"
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        out, layout = a, "a batch (B, C, H, W)"
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        out, layout = a[..., :3].transpose(0, 3, 1, 2), "a batch (B, H, W, C)"
    else:
        raise ClearmapsError(f"{where} has shape {a.shape}; expected (H, W), (B, H, W), (B, C, H, W) or "
                             "(B, H, W, C) with C = 1 or 3.")
    if out.shape[0] == 0:
        raise ClearmapsError(f"{where} holds no images (shape {a.shape}).")
    if a.dtype == np.uint8:
        return out.astype(np.float64) / 255.0, layout + ", uint8 / 255"
    out = out.astype(np.float64)
    if not np.isfinite(out).all():
        raise ClearmapsError(f"{where} contains NaN or Inf; expected pixels in [0, 1] or uint8.")
    if a.dtype.kind in "iu":
        if out.min() < 0 or out.max() > 255:
            raise ClearmapsError(f"{where} holds integers outside 0..255; expected 8-bit pixels.")
        return out / 255.0, layout + ", integers / 255"
    if out.min() < -1e-6 or out.max() > 1 + 1e-6:
        raise ClearmapsError(f"{where} holds floats in [{out.min():.3g}, {out.max():.3g}]; float arrays must "
                             "hold pixels in [0, 1] (normalisation is applied by --mean/--std, not before), "
                             "or be uint8 0..255.")
    return out, layout + ", floats as given"


def _read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ClearmapsError(f"array file {str(path)!r} does not exist.") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ClearmapsError(f"{str(path)!r} could not be read as a NumPy {path.suffix} file ({exc}).") from None
    labels = None
    if isinstance(data, np.ndarray):
        images = data
    else:
        with data:
            keys = list(data.files)
            key = next((k for k in ("images", "x", "X") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ClearmapsError(f"{str(path)!r} holds arrays {keys}; put the images under 'images' (and the "
                                     "labels under 'labels').")
            images = data[key]
            lkey = next((k for k in ("labels", "y") if k in keys), None)
            labels = data[lkey] if lkey else None
    batch, layout = _array_images(images, repr(str(path)))
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if labels.dtype.kind not in "iu" or labels.shape[0] != batch.shape[0]:
            raise ClearmapsError(f"{str(path)!r}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                                 f"expected {batch.shape[0]} integer class ids.")
    return batch, labels, layout


def expand_sources(sources) -> list[Path]:
    """Files and folders → the list of files to read, in order (folders sorted, not recursive)."""
    files = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            known = IMAGE_SUFFIXES + ARRAY_SUFFIXES
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in known)
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


def _unique(name: str, seen: set) -> str:
    base, n = name, 1
    while name in seen:
        n += 1
        name = f"{base}-{n}"
    seen.add(name)
    return name


def load_images(sources, pre: Preprocess, channels: int, size) -> tuple[list[Item], list[str]]:
    """Read every source into :class:`Item`s fitted to a model taking ``channels`` × ``size``.

    Returns the items and notes on how arrays were interpreted (for printing). Any problem raises one
    :class:`ClearmapsError` naming the file and the fix.
    """
    items, notes, seen = [], [], set()
    for path in expand_sources(sources):
        if path.suffix.lower() in ARRAY_SUFFIXES:
            batch, labels, layout = _read_array_file(path)
            notes.append(f"{path}: {batch.shape[0]} image(s), read as {layout}"
                         + (", with labels" if labels is not None else ""))
            for i, a in enumerate(batch):
                where = f"{str(path)!r} image {i}"
                a = _resize(_convert_channels(a, pre, channels, size, where), pre, channels, size, where)
                name = _unique(path.stem if batch.shape[0] == 1 else f"{path.stem}-{i:04d}", seen)
                items.append(Item(name, f"{path}[{i}]", a, None if labels is None else int(labels[i])))
        else:
            where = f"image {str(path)!r}"
            a = _read_image_file(path)
            a = _resize(_convert_channels(a, pre, channels, size, where), pre, channels, size, where)
            items.append(Item(_unique(path.stem, seen), str(path), a))
    return items, notes


def parse_size(text: str) -> tuple[int, int]:
    """"28" → (28, 28); "32x48" → (32, 48)."""
    try:
        parts = [int(p) for p in str(text).lower().replace("×", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ClearmapsError(f"--resize {text!r}; expected a size like 28 or 32x48 (H x W).")
    return parts[0], parts[1]
