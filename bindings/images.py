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
import warnings
import zipfile
import zlib
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
    single safe path component (:func:`safe_name`)."""

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


# ---- image files ----------------------------------------------------------------------------------------

def _sample_scale(img, where: str) -> float:
    """What the stored samples are divided by to give [0, 1]: the file's bit depth decides, never the
    content (a 16-bit image of a dark scene is still / 65535)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return 65535.0
    if mode == "I":  # 32-bit container: Pillow uses it for 16-bit PGM/PPM (scaled to 0..65535) and int TIFFs
        raw = next((t.args for t in getattr(img, "tile", None) or ()), None)
        raw = raw[0] if isinstance(raw, tuple) and raw else raw
        if img.format == "PPM" or (isinstance(raw, str) and raw.startswith("I;16")):
            return 65535.0
        raise ClearmapsError(f"{where} holds 32-bit integer pixels, which have no agreed scale; save it with 8 or "
                             "16 bits per sample, or as a float image in [0, 1].")
    if mode == "F":
        return 1.0
    return 255.0


def _stored_planes(img, where: str) -> list[np.ndarray]:
    """The decoded image's samples as 2-D arrays, one per channel (1 or 3; alpha dropped, palettes and
    other colour modes converted to RGB by Pillow), in their stored type."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        plane = np.asarray(img)
        if mode == "F":
            bad = not np.isfinite(plane).all()
            lo, hi = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 0.0)
            if bad or lo < -1e-6 or hi > 1 + 1e-6:
                raise ClearmapsError(f"{where} holds float pixels " + ("with NaN or Inf" if bad else
                                     f"in [{lo:.3g}, {hi:.3g}]") + "; float images must hold pixels in [0, 1] "
                                     "(as float arrays must), or be saved with 8 or 16 bits per sample.")
            return [np.clip(plane, 0.0, 1.0)]  # rounding within 1e-6 of the range
        return [plane]
    if mode in _GREY_MODES:
        return [np.asarray(img.convert("L"))]
    rgb = img.convert("RGB")
    return [np.asarray(rgb.getchannel(band)) for band in "RGB"]


def _planes_as_float(planes, scale: float, pre: Preprocess, dtype) -> np.ndarray:
    """Stored planes → (C, H, W) in [0, 1] with the mode's channel conversion, block of rows by block of
    rows, so that a large image never exists as a whole in float64 beside its float32 copy. Each value is
    computed exactly as on the whole array (division, then the luma sum in the same order)."""
    c_in = len(planes)
    h, w = planes[0].shape
    c_out = _converted_channels(c_in, pre)
    out = np.empty((c_out, h, w), dtype)
    step = max(1, _ROWS_VALUES // max(w, 1))
    luma = np.array([0.299, 0.587, 0.114])[:, None, None]
    for r in range(0, h, step):
        block = np.stack([p[r:r + step] for p in planes]).astype(np.float64) / scale
        if c_out == 1 and c_in == 3:
            block = (block * luma).sum(axis=0, keepdims=True)
        out[:, r:r + step] = block  # c_in 1 -> c_out 3 broadcasts the grey plane to R, G and B
    return out


def _read_image_file(path: Path, pre: Preprocess = Preprocess(), channels: int | None = None,
                     size=None) -> np.ndarray:
    """(C, H, W) float in [0, 1] fitted to a model of ``channels`` × ``size``: its channels converted as
    ``pre`` asks and resized to ``pre.resize``. The header is checked before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    where = f"image {str(path)!r}"
    try:
        with warnings.catch_warnings():
            # Pillow warns about what it skips in a damaged file, and about decompression bombs, which our own
            # lower limit refuses: either warning would be a second line under the command's one message
            warnings.simplefilter("ignore")
            img = Image.open(path)
        with img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = img.size
            if w < 1 or h < 1:
                raise ClearmapsError(f"{where} has no pixels ({w}x{h}).")
            if w * h > MAX_PIXELS:
                raise ClearmapsError(f"{where} is {w}x{h} ({w * h / 1e6:.0f} megapixels); clearmaps decodes images "
                                     f"of at most {MAX_PIXELS / 1e6:.0f} megapixels (e.g. 8192x8192): shrink it "
                                     "first.")
            c = 1 if img.mode in _GREY_MODES else 3
            _check_fit(c, h, w, pre, channels, size, where)
            scale = _sample_scale(img, where)
            img.load()
            planes = _stored_planes(img, where)
            _check_channels(len(planes), pre, channels, size, where)  # in case decoding changed the mode
    except ClearmapsError:
        raise
    except FileNotFoundError:
        raise ClearmapsError(f"{where} does not exist.") from None
    except UnidentifiedImageError:
        raise ClearmapsError(f"{where} could not be read: not an image format Pillow knows "
                             f"(expected one of {', '.join(IMAGE_SUFFIXES)}, or .npy/.npz).") from None
    except Image.DecompressionBombError:
        raise ClearmapsError(f"{where} is larger than {MAX_PIXELS / 1e6:.0f} megapixels (its header says so); "
                             "shrink it first.") from None
    except MemoryError:
        raise ClearmapsError(f"{where} could not be decoded: not enough memory.") from None
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise ClearmapsError(f"{where} could not be read ({_one_line(exc) or type(exc).__name__}); is it "
                             "truncated or corrupt?") from None
    if pre.resize is not None and (h, w) != pre.resize:
        return _resize_planes(_planes_as_float(planes, scale, pre, np.float32), pre.resize)
    return _planes_as_float(planes, scale, pre, np.float64)


# ---- array files ----------------------------------------------------------------------------------------

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
    if min(out.shape[2:]) == 0:
        raise ClearmapsError(f"{where} has shape {a.shape}: its images have no pixels.")
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


def _npy_header(f, where: str, available: int) -> None:
    """Read a .npy header from ``f`` and refuse, before any array is allocated, an object dtype, more than
    MAX_ARRAY_VALUES values, or fewer bytes left (``available``, counted from the start) than it declares."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, _, dtype = fmt._read_array_header(f, version)  # 3.0: utf-8 field names
    except Exception as exc:  # ValueError for a bad magic string or header, EOFError, ...
        raise ClearmapsError(f"{where} is not a valid NumPy array ({_one_line(exc)}).") from None
    if dtype.hasobject:
        raise ClearmapsError(f"{where} holds Python objects (dtype {dtype}); expected uint8 pixels or floats in "
                             "[0, 1] (objects are never unpickled).")
    count = 1
    for n in shape:  # Python ints: a hostile header cannot overflow the product
        count *= int(n)
    values = count * (dtype.itemsize // max(1, dtype.base.itemsize) if dtype.shape else 1)
    if values > MAX_ARRAY_VALUES:
        raise ClearmapsError(f"{where} declares shape {tuple(shape)} ({values:,} values); clearmaps reads arrays of "
                             f"at most {MAX_ARRAY_VALUES:,} values: split it into several files.")
    need = f.tell() + count * dtype.itemsize
    if need > available:
        raise ClearmapsError(f"{where} is truncated: its header declares shape {tuple(shape)} {dtype} "
                             f"({need:,} bytes) but it has {available:,}.")


_ARRAY_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
                      NotImplementedError, RuntimeError, MemoryError)


def _read_npy(path: Path) -> np.ndarray:
    where = repr(str(path))
    try:
        with open(path, "rb") as f:
            _npy_header(f, where, os.fstat(f.fileno()).st_size)
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except ClearmapsError:
        raise
    except _ARRAY_READ_ERRORS as exc:
        raise ClearmapsError(f"{where} could not be read as a NumPy .npy file ({_one_line(exc)}).") from None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    where = repr(str(path))
    try:
        with zipfile.ZipFile(path) as z:
            members = {}
            for info in z.infolist():
                if info.filename.endswith(".npy"):
                    members[info.filename[:-4]] = info
            keys = list(members)
            key = next((k for k in ("images", "x", "X") if k in members), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ClearmapsError(f"{where} holds arrays {keys}; put the images under 'images' (and the "
                                     "labels under 'labels').")
            lkey = next((k for k in ("labels", "y") if k in members), None)

            def read(k):
                info = members[k]
                with z.open(info) as f:
                    _npy_header(f, f"{where} array {k!r}", info.file_size)
                with z.open(info) as f:
                    return np.lib.format.read_array(f, allow_pickle=False)

            return read(key), (read(lkey) if lkey else None)
    except ClearmapsError:
        raise
    except _ARRAY_READ_ERRORS as exc:
        raise ClearmapsError(f"{where} could not be read as a NumPy .npz file ({_one_line(exc)}); is it "
                             "truncated or corrupt?") from None


def _read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise ClearmapsError(f"array file {str(path)!r} does not exist.") from None
    except OSError as exc:
        raise ClearmapsError(f"array file {str(path)!r} could not be read ({exc.strerror or exc}).") from None
    if magic.startswith(b"\x93NUMPY"):
        images, labels = _read_npy(path), None
    elif magic.startswith(b"PK"):
        images, labels = _read_npz(path)
    else:
        raise ClearmapsError(f"{str(path)!r} is not a NumPy .npy or .npz file (it does not start like one).")
    batch, layout = _array_images(images, repr(str(path)))
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if labels.dtype.kind not in "iu" or labels.shape[0] != batch.shape[0]:
            raise ClearmapsError(f"{str(path)!r}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                                 f"expected {batch.shape[0]} integer class ids.")
    return batch, labels, layout


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


def load_images(sources, pre: Preprocess, channels: int, size) -> tuple[list[Item], list[str]]:
    """Read every source into :class:`Item`s fitted to a model taking ``channels`` × ``size`` (``size``
    None or (None, None): any size).

    Returns the items and notes on how arrays were interpreted (for printing). Any problem raises one
    :class:`ClearmapsError` naming the file and the fix. Item names are unique and safe as folder names.
    """
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
                a = _resize(_convert_channels(a, pre, channels, size, where), pre, channels, size, where)
                name = unique_name(path.stem if batch.shape[0] == 1 else f"{path.stem}-{i:04d}", seen)
                items.append(Item(name, f"{path}[{i}]", a, None if labels is None else int(labels[i])))
        else:
            a = _read_image_file(path, pre, channels, size)
            items.append(Item(unique_name(path.stem, seen), str(path), a))
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
