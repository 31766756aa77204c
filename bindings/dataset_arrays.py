"""Image arrays of a dataset (.npz or .npy), read a batch at a time from the file, never whole.

An uncompressed ``np.savez`` member is read by seeking; a compressed one by decompressing forward, so
batches are best read in order. The images are under "images", "x" or "X" (or the only array), the labels
under "labels" or "y" when present.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reference import ClearmapsError

_NPZ_IMAGE_KEYS = ("images", "x", "X")
_NPZ_LABEL_KEYS = ("labels", "y")


@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple
    dtype: np.dtype
    offset: int  # where the data start in the member (or the .npy file)


def _read_header(f) -> _ArrayHeader:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
        raise ClearmapsError("the image array is stored in Fortran order; save it with np.savez from a C-ordered "
                             "array (np.ascontiguousarray).")
    if dtype.hasobject:
        raise ClearmapsError("the image array holds Python objects; expected uint8 pixels or floats in [0, 1].")
    return _ArrayHeader(tuple(shape), dtype, f.tell())


def _layout(shape: tuple, where: str) -> tuple[str, int]:
    """How a stacked image array's axes are read: "bhw", "bchw" or "bhwc", and its image count."""
    if len(shape) == 3:
        return "bhw", shape[0]
    if len(shape) == 4 and shape[1] in (1, 3):
        return "bchw", shape[0]
    if len(shape) == 4 and shape[-1] in (1, 3, 4):
        return "bhwc", shape[0]
    raise ClearmapsError(f"{where} holds images of shape {shape}; a dataset array is (B, H, W), (B, C, H, W) or "
                         "(B, H, W, C) with C = 1 or 3.")


class ArrayFile:
    """The image array of an .npz (or .npy), read ``rows`` at a time without loading the rest.

    An instance keeps its file open and reads forward: batches in order cost one pass over the file. It
    is re-opened in another process (it pickles as its path and key).
    """

    def __init__(self, path: Path, key: str | None):
        self.path, self.key = Path(path), key
        self._file = self._zip = None
        f = self._open()
        try:
            self.header = _read_header(f)
        except ClearmapsError as exc:
            raise ClearmapsError(f"{self.where}: {exc}") from None
        except ValueError as exc:
            raise ClearmapsError(f"{self.where} is not a NumPy array ({exc}).") from None
        self.layout, self.count = _layout(self.header.shape, self.where)
        if self.header.dtype.kind not in "fiub":
            raise ClearmapsError(f"{self.where} has dtype {self.header.dtype}; expected uint8 pixels or floats "
                                 "in [0, 1].")
        self.row_bytes = int(np.prod(self.header.shape[1:], dtype=np.int64)) * self.header.dtype.itemsize

    @property
    def where(self) -> str:
        return repr(str(self.path)) + (f" array {self.key!r}" if self.key else "")

    def _open(self):
        self.close()
        if self.key is None:
            self._file = open(self.path, "rb")
        else:
            self._zip = zipfile.ZipFile(self.path)
            self._file = self._zip.open(self.key + ".npy")
        return self._file

    def close(self):
        for handle in (self._file, self._zip):
            if handle is not None:
                handle.close()
        self._file = self._zip = None

    def __getstate__(self):
        return {"path": self.path, "key": self.key, "header": self.header, "layout": self.layout,
                "count": self.count, "row_bytes": self.row_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file = self._zip = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop as (B, C, H, W) float64 in [0, 1] (uint8 / 255; floats as given)."""
        f = self._file if self._file is not None else self._open()
        where = self.header.offset + start * self.row_bytes
        try:
            if f.tell() != where:
                f.seek(where)  # forward in a compressed member: decompresses up to there, once
            data = f.read((stop - start) * self.row_bytes)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ClearmapsError(f"{self.where} could not be read at images {start}..{stop - 1} ({exc}).") from None
        if len(data) != (stop - start) * self.row_bytes:
            raise ClearmapsError(f"{self.where} ends early: images {start}..{stop - 1} are missing (truncated file).")
        a = np.frombuffer(data, dtype=self.header.dtype).reshape((stop - start,) + self.header.shape[1:])
        if self.layout == "bhw":
            a = a[:, None]
        elif self.layout == "bhwc":
            a = a[..., :3].transpose(0, 3, 1, 2)
        if a.dtype == np.uint8:
            return a.astype(np.float64) / 255.0
        out = a.astype(np.float64)
        if a.dtype.kind in "iu":
            if out.size and (out.min() < 0 or out.max() > 255):
                raise ClearmapsError(f"{self.where} holds integers outside 0..255 in images {start}..{stop - 1}; "
                                     "expected 8-bit pixels.")
            return out / 255.0
        if not np.isfinite(out).all() or (out.size and (out.min() < -1e-6 or out.max() > 1 + 1e-6)):
            raise ClearmapsError(f"{self.where} holds floats outside [0, 1] (or NaN) in images {start}..{stop - 1}; "
                                 "float arrays hold pixels in [0, 1] (mean/std are applied by clearmaps).")
        return out


def _open_array_file(path: Path) -> tuple[ArrayFile, np.ndarray | None]:
    if path.suffix.lower() == ".npy":
        return ArrayFile(path, None), None
    try:
        with zipfile.ZipFile(path) as z:
            keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise ClearmapsError(f"{str(path)!r} could not be read as a NumPy .npz file ({exc}).") from None
    key = next((k for k in _NPZ_IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise ClearmapsError(f"{str(path)!r} holds arrays {keys}; put the images under 'images' (and the labels "
                             "under 'labels').")
    images = ArrayFile(path, key)
    labels = None
    lkey = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
    if lkey is not None:
        with np.load(path, allow_pickle=False) as data:
            labels = np.asarray(data[lkey]).ravel()
        if labels.dtype.kind not in "iu" or labels.shape[0] != images.count:
            raise ClearmapsError(f"{str(path)!r}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                                 f"expected {images.count} integer class ids.")
    return images, labels
