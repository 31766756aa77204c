"""Reading image files and NumPy array files into float pixels, checked from their headers before anything is
decoded or allocated (the limits and the preprocessing steps are :mod:`clearmaps.images`'s, which calls these
readers from :func:`clearmaps.images.load_images`)."""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .images import (_GREY_MODES, _ROWS_VALUES, _SIXTEEN_BIT_MODES, IMAGE_SUFFIXES, MAX_ARRAY_VALUES, MAX_PIXELS,
                     Preprocess, _check_channels, _check_fit, _converted_channels, _one_line, _resize_planes)
from .reference import ClearmapsError


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
                     size=None, keep_original: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(C, H, W) float in [0, 1] fitted to a model of ``channels`` × ``size``: its channels converted as
    ``pre`` asks and resized to ``pre.resize``; and, when it was resized and ``keep_original``, a uint8
    (H, W, 3) copy of it before (:func:`display_copy`), else None. The header is checked before anything is decoded."""
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
        full = _planes_as_float(planes, scale, pre, np.float32)
        return _resize_planes(full, pre.resize), display_copy(full) if keep_original else None
    return _planes_as_float(planes, scale, pre, np.float64), None


DISPLAY_SIDE = 1024
"""The longer side of the copy of a resized image kept to draw the overlay on (its own resolution, up to this)."""


def display_copy(planes: np.ndarray) -> np.ndarray:
    """(C, H, W) floats in [0, 1] → uint8 (H, W, 3) to draw on, shrunk (Lanczos) to at most
    :data:`DISPLAY_SIDE` on the longer side: what the user's image looks like before it was resized."""
    from PIL import Image

    c, h, w = planes.shape
    rgb = np.floor(np.clip(planes, 0, 1) * 255 + 0.5).astype(np.uint8)
    rgb = np.repeat(rgb, 3, axis=0) if c == 1 else rgb[:3]
    img = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
    if max(h, w) > DISPLAY_SIDE:
        f = DISPLAY_SIDE / max(h, w)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    return np.asarray(img)


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
