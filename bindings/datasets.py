"""Labelled image collections read in batches: what ``clearmaps explain DATASET`` reads.

Kinds of dataset (:func:`open_dataset` tells them apart):

- **ImageFolder tree**: a folder whose sub-folders are the classes (torchvision's ImageFolder convention,
  read without torchvision): ``ds/cat/1.png``, ``ds/dog/x/2.jpg`` (images anywhere below a class folder,
  sorted). A folder's name is a class name of the model (or, where the model's names are not used, its id).
- **glob**: a pattern such as ``'photos/**/*.jpg'`` (sorted); no labels.
- **CSV**: a header with the columns ``path`` and ``label`` (paths relative to the CSV's folder; a label
  is a class name or id, an empty cell an unknown label).
- **.npz** (the images under "images", "x" or "X", labels under "labels" or "y" when present) or **.npy**:
  read a batch at a time from the file, never whole (:mod:`clearmaps.dataset_arrays`).
- **files**: image files and flat folders of them, as the per-image command took them; no labels.

Every image goes through a :class:`Transform` (:mod:`clearmaps.dataset_transform`: the channels, an exact
resize or the shorter side resized and a centre crop, then mean/std). Memory stays flat: a dataset holds its
listing (a path and a label per image), never its pixels.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset_arrays import ArrayFile, _open_array_file
from .dataset_transform import Transform, _convert_channels, _geometry, _resize_planes
from .images import IMAGE_SUFFIXES, Preprocess, load_images
from .reference import ClearmapsError

GLOB_CHARS = "*?["


@dataclass
class Dataset:
    """A listing of images and labels, read a batch at a time with :meth:`read`. Its root and array file
    are absolute paths, so that workers with another working directory read the same files.

    Attributes
    ----------
    kind : "imagefolder", "glob", "csv", "npz" or "files"
    source : str
        What was given (a folder, a pattern, a file).
    names : list of str
        One name per image: its path relative to the dataset's root, or ``file.npz[i]``.
    labels : (N,) int64
        Class ids, -1 where unknown.
    skipped : list of str
        What was left out of the listing and why (``skip_bad``).
    """

    kind: str
    source: str
    names: list
    labels: np.ndarray
    root: Path | None = None
    array: ArrayFile | None = None
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    offset: int = 0  # the index of names[0] in the whole dataset (a slice sent to a worker)

    def slice(self, start: int, stop: int) -> "Dataset":
        """Images start..stop only (indices of the whole dataset stay valid in :meth:`read`): what one
        chunk's task carries to a worker, instead of the whole listing."""
        a, b = start - self.offset, stop - self.offset
        return Dataset(self.kind, self.source, self.names[a:b], self.labels[a:b], self.root, self.array,
                       offset=start)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).any())

    def identity(self) -> str:
        """A digest of the listing (names and labels; for arrays, shape, dtype and size): a rerun on another
        listing is another dataset."""
        h = hashlib.sha256()
        h.update(f"{self.kind}\0{len(self.names)}\0".encode())
        if self.array is not None:
            a = self.array
            h.update(f"{a.key}\0{a.header.shape}\0{a.header.dtype.str}\0{os.path.getsize(a.path)}".encode())
        else:
            for n in self.names:
                h.update(n.encode("utf-8", "surrogateescape") + b"\0")
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()

    def read(self, start: int, stop: int, transform: Transform, channels: int, size, skip_bad: bool = False):
        """Images ``start``..``stop`` (exclusive), transformed, as ((B, C, H, W) float64 in [0, 1], errors).

        ``size`` is the (H, W) every image must have (None: the first image's). ``errors`` has one entry per
        image: None, or why it could not be used (then its pixels are zeros) when ``skip_bad``; without
        ``skip_bad`` the first bad image raises :class:`ClearmapsError`.
        """
        if self.array is not None:
            where = f"{self.array.where} images {start}..{stop - 1}"
            batch = _convert_channels(self.array.rows(start, stop), transform.pre.mode, channels, where)
            images = []
            for i, a in enumerate(batch):
                name = f"{self.array.where} image {start + i}"
                if transform.pre.resize and a.shape[1:] != transform.pre.resize:
                    a = _resize_planes(a, *transform.pre.resize)
                images.append(_geometry(a, transform, name))
            errors = [None] * len(images)
        else:
            images, errors = [], []
            pre = Preprocess(mode=transform.pre.mode, resize=transform.pre.resize)
            for name in self.names[start - self.offset:stop - self.offset]:
                path = self.path_of(name)
                try:
                    items, _ = load_images([path], pre, channels, None)
                    images.append(_geometry(items[0].pixels, transform, f"image {str(path)!r}"))
                    errors.append(None)
                except ClearmapsError as exc:
                    if not skip_bad or "convert it with" in str(exc):  # a setting to fix, not a bad image
                        raise ClearmapsError(f"{exc}" + ("" if "convert it with" in str(exc) else
                                                         " (--skip-bad skips such images and lists them)")) from None
                    images.append(None)
                    errors.append(str(exc))
        want = tuple(size) if size and None not in size else next(
            (tuple(a.shape[1:]) for a in images if a is not None), None)
        out = np.zeros((len(images), channels) + (want or (1, 1)), dtype=np.float64)
        for i, a in enumerate(images):
            if a is None:
                continue
            if tuple(a.shape[1:]) != want:
                msg = (f"{self.names[start + i - self.offset]} is {a.shape[1]}x{a.shape[2]} after preprocessing but the run "
                       f"takes {want[0]}x{want[1]}; give --resize {want[0]}x{want[1]} or --short-side and --crop "
                       "so that every image comes out the same size.")
                if not skip_bad:
                    raise ClearmapsError(msg)
                errors[i] = msg
                continue
            out[i] = a
        return out, errors

    def path_of(self, name: str) -> Path:
        return Path(name) if self.root is None else self.root / name

    def first_size(self, transform: Transform, channels: int) -> tuple[int, int]:
        """(H, W) of the first readable image after ``transform`` (what the run's arrays are sized by when
        neither the model nor the transform fixes it)."""
        fixed = transform.output_size()
        if fixed:
            return fixed
        for start in range(min(len(self), 16)):
            pixels, errors = self.read(start, start + 1, transform, channels, None, skip_bad=True)
            if errors[0] is None:
                return tuple(pixels.shape[2:])
        raise ClearmapsError(f"the first {min(len(self), 16)} images of {self.source!r} could not be read.")


def _class_id(token: str, class_names, where: str) -> int | None:
    """A label (a class name, or an id) → the class id; None when the model has no such class."""
    token = token.strip()
    if token in class_names:
        return list(class_names).index(token)
    if token.lstrip("-").isdigit() and 0 <= int(token) < len(class_names):
        return int(token)
    return None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _bad(skip_bad: bool, skipped: list, message: str) -> None:
    if not skip_bad:
        raise ClearmapsError(message + " (--skip-bad leaves these out and lists them)")
    skipped.append(message)


def _image_folder(root: Path, class_names, skip_bad: bool) -> Dataset:
    names, labels, skipped, notes = [], [], [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and _is_image(p)]
    if loose:
        notes.append(f"{len(loose)} image(s) at the top of {str(root)!r} are not in a class folder and are left out")
    for folder in folders:
        found = sorted(str(Path(dirpath, f).relative_to(root))
                       for dirpath, dirs, files in os.walk(folder, followlinks=True)
                       for f in files if _is_image(Path(f)))
        label = _class_id(folder.name, class_names, str(folder))
        if label is None:
            _bad(skip_bad, skipped, f"class folder {str(folder)!r} is not one of the model's classes "
                                    f"{list(class_names)[:20]}{' ...' if len(class_names) > 20 else ''}; "
                                    f"rename it or pass the model's --class-names")
            continue
        if not found:
            _bad(skip_bad, skipped, f"class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            continue
        names += found
        labels += [label] * len(found)
    if not names:
        raise ClearmapsError(f"{str(root)!r} holds no images in its class folders"
                             + (f" ({len(skipped)} folder(s) skipped: {skipped[0]})" if skipped else "") + ".")
    return Dataset("imagefolder", str(root), names, np.asarray(labels, dtype=np.int64), root=root.resolve(),
                   skipped=skipped, notes=notes)


def _csv(path: Path, class_names, skip_bad: bool) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise ClearmapsError(f"CSV {str(path)!r} has columns {columns}; it needs a header with the columns "
                                     f"'path' and 'label' (missing: {', '.join(repr(m) for m in missing)}).")
            rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ClearmapsError(f"CSV {str(path)!r} could not be read ({exc}).") from None
    names, labels, skipped = [], [], []
    for line, row in enumerate(rows, start=2):
        if not row["path"].strip():
            _bad(skip_bad, skipped, f"CSV {str(path)!r} line {line} has no path")
            continue
        label = -1
        if row["label"].strip():
            found = _class_id(row["label"], class_names, "")
            if found is None:
                _bad(skip_bad, skipped, f"CSV {str(path)!r} line {line}: label {row['label'].strip()!r} is not one "
                                        f"of the model's classes {list(class_names)[:20]}")
                continue
            label = found
        names.append(row["path"].strip())
        labels.append(label)
    if not names:
        raise ClearmapsError(f"CSV {str(path)!r} lists no images.")
    return Dataset("csv", str(path), names, np.asarray(labels, dtype=np.int64), root=path.parent.resolve(),
                   skipped=skipped)


def _glob(pattern: str) -> Dataset:
    found = sorted(p for p in globlib.glob(pattern, recursive=True) if Path(p).is_file() and _is_image(Path(p)))
    if not found:
        raise ClearmapsError(f"the pattern {pattern!r} matches no images ({', '.join(IMAGE_SUFFIXES)}).")
    return Dataset("glob", pattern, found, np.full(len(found), -1, dtype=np.int64), root=Path.cwd().resolve())


def _arrays(path: Path, class_names) -> Dataset:
    array, labels = _open_array_file(path.resolve())
    if labels is None:
        labels = np.full(array.count, -1, dtype=np.int64)
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < -1 or labels.max() >= len(class_names)):
        raise ClearmapsError(f"{str(path)!r}: labels run {labels.min()} .. {labels.max()}; the model has classes "
                             f"0 .. {len(class_names) - 1} (-1 for an unknown label).")
    if array.count == 0:
        raise ClearmapsError(f"{array.where} holds no images (shape {array.header.shape}).")
    names = [f"{path.name}[{i}]" for i in range(array.count)]
    return Dataset("npz", str(path), names, labels, array=array)


def is_dataset(inputs) -> bool:
    """True when ``inputs`` name a dataset that only this module reads: one ImageFolder tree (a folder with
    sub-folders), one glob pattern, or one CSV file."""
    if len(inputs) != 1:
        return False
    text = str(inputs[0])
    p = Path(text)
    if p.is_file():
        return p.suffix.lower() == ".csv"
    if p.is_dir():
        return any(q.is_dir() and not q.name.startswith(".") for q in p.iterdir())
    return any(ch in text for ch in GLOB_CHARS)


def open_dataset(inputs, class_names, skip_bad: bool = False) -> Dataset:
    """The dataset named by ``inputs`` (a list of command-line inputs; see the module docstring).

    ``class_names`` are the model's: ImageFolder folder names and CSV labels are looked up in them (a name,
    else an id). Problems raise one :class:`ClearmapsError`; with ``skip_bad`` a bad class folder or CSV row
    is left out and listed in ``Dataset.skipped`` instead (a bad image is found when it is read).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise ClearmapsError("no dataset given; pass a folder of class folders, a glob, a CSV (path,label) or an "
                             ".npz.")
    if len(inputs) == 1:
        text = inputs[0]
        p = Path(text)
        if p.is_file() and p.suffix.lower() == ".csv":
            return _csv(p, class_names, skip_bad)
        if p.is_file() and p.suffix.lower() in (".npz", ".npy"):
            return _arrays(p, class_names)
        if p.is_dir() and any(q.is_dir() and not q.name.startswith(".") for q in p.iterdir()):
            return _image_folder(p, class_names, skip_bad)
        if not p.exists() and any(ch in text for ch in GLOB_CHARS):
            return _glob(text)
        if not p.exists():
            raise ClearmapsError(f"input {text!r} does not exist.")
    names = []
    for text in inputs:
        p = Path(text)
        if p.suffix.lower() in (".npz", ".npy", ".csv") and len(inputs) > 1:
            raise ClearmapsError(f"{text!r} is a dataset of its own; give it alone (one .npz, .csv, folder or glob "
                                 "per run).")
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and _is_image(q))
            if not found:
                raise ClearmapsError(f"folder {text!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            names += found
        elif p.is_file():
            names.append(str(p))
        else:
            raise ClearmapsError(f"input {text!r} does not exist.")
    return Dataset("files", ", ".join(inputs), names, np.full(len(names), -1, dtype=np.int64),
                   root=Path.cwd().resolve())
