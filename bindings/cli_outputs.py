"""The ``clearmaps`` command's files: output folders, progress bars, and every output of one image.

Per image, in DIR/<name>/: clear.png, overlay.png, heatmap.png, binary.png, legend.png, panel.png and
maps.npz, each written atomically, then the record ``.clearmaps-done.json``: the settings the outputs were
made with and the size and SHA-256 of every file. A rerun skips an image only when its record says the
same settings and every file still has the recorded bytes (``is_done``); a file that is missing, truncated
or overwritten makes the image be redone.

What the command writes stays inside the output folder: each image's folder is its name made one safe path
component (:func:`clearmaps.images.safe_name`), unique without regard to case, and never a symbolic link.
Temp files that an interrupted run left (``kill -9``) are deleted when a later run visits their folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import render
from .images import Item, Preprocess, unique_name
from .reference import ClearmapsError, binary_map, heatmap, palette_rgb

FILES = ("clear.png", "overlay.png", "heatmap.png", "binary.png", "legend.png", "panel.png", "maps.npz")
RECORD = ".clearmaps-done.json"
_ROOT_FILES = ("figure3.png", "table1.csv", "table1.json")  # what the subcommands write beside the folders
MAX_NODE_VALUES = 1 << 27
"""Most values one node of the network may output per image (1 GiB in float64): a larger input would make
``explain`` allocate tens of gigabytes before it could fail."""
_MAX_RECORD_BYTES = 1 << 20


def prepare_out(path) -> Path:
    """Create the output folder and prove it can be written, before any work is done; delete the temp
    files an interrupted earlier run left in it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ClearmapsError(f"output folder {str(out)!r} is a file; choose another with --out.") from None
    except OSError as exc:
        raise ClearmapsError(f"cannot write to output folder {str(out)!r} ({exc.strerror or exc}); choose "
                             "another with --out.") from None
    render.remove_stale_temps(out, _ROOT_FILES)
    return out


def item_folder(out: Path, name: str) -> Path:
    """``out``/``name``, refused unless ``name`` is one plain path component (no separator, not "." or
    "..", not hidden) and the folder, if it exists, is a real folder and not a link elsewhere."""
    if not isinstance(name, str) or not name or name.strip(" .") != name or any(
            ch in name for ch in "/\\\0") or name != os.path.basename(name):
        raise ClearmapsError(f"output name {name!r} is not a plain folder name; make it one with "
                             "clearmaps.images.safe_name.")
    folder = Path(out) / name
    if folder.is_symlink():
        raise ClearmapsError(f"{str(folder)!r} is a symbolic link; clearmaps writes only inside the output folder: "
                             "remove the link or choose another --out.")
    if folder.exists() and not folder.is_dir():
        raise ClearmapsError(f"{str(folder)!r} exists and is not a folder; remove it or choose another --out.")
    return folder


class Progress:
    """A tqdm bar on stderr counting images, or nothing (``--quiet``, one image, or tqdm missing).

    ``disable=None`` makes tqdm draw only on a terminal, so logs and pipes stay clean.
    """

    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        if quiet or total < 2:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a dependency, but a bare environment should still work
            return
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr, dynamic_ncols=True,
                        leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class ExplainOptions:
    """What :func:`clearmaps.explain` and the pictures of :func:`write_outputs` are given for every image."""

    backend: str = "auto"
    classes: object = None  # None, "topK", or a list of ids / names (see clearmaps.explain)
    rectify: bool = True
    reduce: str = "sum"
    vmax: object = None
    preprocess: Preprocess = Preprocess()
    binary_threshold: float = 0.1
    method: str = "deconvnet"

    def settings(self, fingerprint: str, item: Item, true: int | None, scale: int, batch: str | None = None) -> str:
        """Everything the image's outputs depend on, as the text maps.npz and the record keep. ``batch``
        identifies the images explained together, for ``vmax="batch"``, whose scale they share."""
        pixels = hashlib.sha256(np.ascontiguousarray(item.pixels, dtype=np.float32).tobytes()).hexdigest()
        fields = {"model": fingerprint, "source": item.source, "classes": self.classes, "true": true,
                  "scale": scale, "input": pixels, "preprocess": self.preprocess, "rectify": self.rectify,
                  "reduce": self.reduce, "vmax": self.vmax, "binary_threshold": self.binary_threshold,
                  "method": self.method}
        if batch is not None:
            fields["vmax_batch"] = batch
        return json.dumps(fields, sort_keys=True, default=str)


def _position(classes_row: np.ndarray, class_id: int | None) -> int | None:
    hit = np.flatnonzero(classes_row == class_id) if class_id is not None else []
    return int(hit[0]) if len(hit) else None


def _sha256(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_outputs(folder: Path, item: Item, e, b: int, true: int | None, scale: int, settings: str,
                  binary_threshold: float = 0.1, invert: bool = False, run: str = "") -> dict:
    """Every output of image ``b`` of explanation ``e`` (see FILES), each written atomically, then the
    record of what was written (the 'done' mark, last). Returns the line the command prints about it, as a
    dict. ``run`` identifies the run in the record."""
    names = e.class_names
    classes_row = e.classes[b]
    pred = int(e.predicted[b])
    prob = float(e.probabilities[b, pred])
    # the heatmap and binary map are drawn against one class: the true one when known and among the maps,
    # else the prediction
    ref = true if _position(classes_row, true) is not None else pred
    pos = _position(classes_row, ref)
    if pos is None:
        ref, pos = int(classes_row[0]), 0
    ref_why = "true class" if ref == true else ("predicted class" if ref == pred else "first class shown")
    resp = e.responses[b:b + 1]
    heat = heatmap(resp, np.array([pos]))[0]
    binary = binary_map(resp, np.array([pos]), threshold=binary_threshold)[0]
    image = render.pixels_to_rgb(1.0 - item.pixels if invert else item.pixels)  # as the model sees it
    clear = e.rgb[b]
    colours = palette_rgb(e.palette)
    legend = render.legend(colours, [names[c] for c in classes_row],
                           highlight=(names[pred],) + ((names[true],) if true is not None else ()))

    folder.mkdir(parents=True, exist_ok=True)
    try:  # the old record goes first: while the files are rewritten, nothing says they are done
        os.unlink(folder / RECORD)
    except FileNotFoundError:
        pass
    label = render.label
    up = lambda a: render.upscale(a, scale)  # noqa: E731
    render.save_png(folder / "clear.png", up(clear))
    render.save_png(folder / "overlay.png", up(render.overlay(image, clear)))
    render.save_png(folder / "heatmap.png", up(heat))
    render.save_png(folder / "binary.png", up(binary))
    render.save_png(folder / "legend.png", render.pad(legend, 6))
    caption = (f"{label(item.name, 120)}: predicted {label(names[pred])} (p = {prob:.2f})"
               + (f", true {label(names[true])}" + (" - correct" if true == pred else " - MISCLASSIFIED")
                  if true is not None else ", true class unknown"))
    key = (f"heatmap: hot = response of class {label(names[ref])} ({ref_why}), green = another class beats it.  "
           f"binary map: red = for {label(names[ref])}, blue = against (where the dominant response is above "
           f"{binary_threshold:g} of the image's strongest).")
    tiles = render.hstack([render.titled(up(image), "input"), render.titled(up(clear), "CLEAR map"),
                           render.titled(up(render.overlay(image, clear)), "overlay"),
                           render.titled(up(heat), f"heatmap ({label(names[ref])})"),
                           render.titled(up(binary), f"binary map ({label(names[ref])})")], gap=8)
    panel = render.vstack([legend, render.text_block(caption, size=15, align="left", pad=1), tiles,
                           render.text_block(key, size=12, align="left", pad=1, colour=(70, 70, 70))], gap=6)
    render.save_png(folder / "panel.png", render.pad(panel, 10))
    arrays = dict(responses=e.responses[b].astype(np.float32), classes=classes_row,
                  dominant_class=e.dominant_class[b], dominant_response=e.dominant_response[b].astype(np.float32),
                  rgb=clear, logits=e.logits[b], probabilities=e.probabilities[b], palette=e.palette,
                  class_names=np.array(names), input=item.pixels.astype(np.float32),
                  true_class=np.int64(-1 if true is None else true), settings=np.array(settings))
    render.atomic_write(folder / "maps.npz", lambda f: np.savez_compressed(f, **arrays))
    files = {}
    for name in FILES:
        size, digest = _sha256(folder / name)
        files[name] = {"bytes": size, "sha256": digest}
    record = {"settings": settings, "files": files, "run": run, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    render.save_text(folder / RECORD, json.dumps(record, indent=1) + "\n")
    return {"name": item.name, "source": item.source, "predicted": names[pred], "probability": round(prob, 4),
            "true": None if true is None else names[true]}


def read_record(folder: Path) -> dict | None:
    """The record of ``folder`` (see :func:`write_outputs`), or None when there is none or it is unreadable."""
    path = Path(folder) / RECORD
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def is_done(folder: Path, settings: str) -> bool:
    """An image is done when its record says ``settings`` and every output still has the recorded size and
    SHA-256 (a file missing, cut short or overwritten since makes it not done)."""
    record = read_record(folder)
    files = record.get("files") if record else None
    if not isinstance(files, dict) or record.get("settings") != settings or set(files) != set(FILES):
        return False
    for name in FILES:
        path, want = Path(folder) / name, files[name]
        try:
            if path.is_symlink() or not path.is_file() or not isinstance(want, dict) or \
                    path.stat().st_size != want.get("bytes"):
                return False
            if _sha256(path) != (want.get("bytes"), want.get("sha256")):
                return False
        except OSError:
            return False
    return True


def check_network_size(net, size) -> None:
    """Refuse images of ``size`` (H, W) for which a node of ``net`` would output more than
    :data:`MAX_NODE_VALUES` values per image."""
    for shape, name in zip(net.shapes(tuple(size)), net.names):
        values = int(np.prod(shape, dtype=object))
        if values > MAX_NODE_VALUES:
            raise ClearmapsError(f"for {size[0]}x{size[1]} images, node {name} of the network outputs {shape} = "
                                 f"{values:,} values per image; clearmaps allows {MAX_NODE_VALUES:,}: use smaller "
                                 "images (--resize).")


def _groups(entries: list, batch_size: int) -> list:
    """The images explained together: consecutive runs of ``batch_size``, split by image size (one
    explain call takes images of one size)."""
    groups = []
    for start in range(0, len(entries), batch_size):
        by_shape: dict = {}
        for entry in entries[start:start + batch_size]:
            by_shape.setdefault(entry["item"].pixels.shape, []).append(entry)
        groups += by_shape.values()
    return groups


def explain_items(net, fingerprint: str, items: list, trues: list, out: Path, options: ExplainOptions,
                  scale: int | None = None, force: bool = False, batch_size: int = 16,
                  quiet: bool = False) -> tuple[list, int, int]:
    """Explain ``items`` in batches and write their outputs under ``out``/<name>/, skipping those already
    done with the same settings unless ``force``. ``scale`` None picks one per image (longer side >= 224).
    Returns (records, explained now, skipped).

    With ``vmax="batch"`` the images explained together share one brightness scale, so what is explained
    together is fixed by the order of ``items`` and ``batch_size`` alone, recorded in each image's
    settings, and a batch is redone whole when any of its images is not done.
    """
    from .explanation import explain

    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ClearmapsError(f"--batch-size {batch_size!r}; expected a positive integer.")
    if len(items) != len(trues):
        raise ClearmapsError(f"{len(items)} images but {len(trues)} true labels.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    render.remove_stale_temps(out)
    entries, seen, sizes = [], set(), set()
    for item, true in zip(items, trues):
        # names from clearmaps.images are safe and unique already; any other source's are made so here
        folder = item_folder(out, unique_name(item.name, seen))
        h, w = item.pixels.shape[1:]
        item_scale = render.check_scale(h, w, scale) if scale is not None else render.auto_scale(h, w)
        sizes.add((h, w))
        render.remove_stale_temps(folder, FILES)
        entries.append({"item": item, "true": true, "folder": folder, "scale": item_scale,
                        "settings": options.settings(fingerprint, item, true, item_scale)})
    for size in sorted(sizes):
        check_network_size(net, size)

    batch_vmax = isinstance(options.vmax, str) and options.vmax == "batch"
    if batch_vmax:
        todo = []
        for group in _groups(entries, batch_size):
            members = hashlib.sha256(json.dumps([e["settings"] for e in group]).encode()).hexdigest()
            for e in group:
                e["settings"] = options.settings(fingerprint, e["item"], e["true"], e["scale"], batch=members)
            if force or not all(is_done(e["folder"], e["settings"]) for e in group):
                todo.append(group)
        skipped = len(entries) - sum(len(g) for g in todo)
    else:
        pending = [e for e in entries if force or not is_done(e["folder"], e["settings"])]
        skipped = len(entries) - len(pending)
        todo = _groups(pending, batch_size)

    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"
    records = []
    bar = Progress(sum(len(g) for g in todo), "explaining", quiet)
    try:
        for group in todo:
            x = options.preprocess.normalise(np.stack([e["item"].pixels for e in group]))
            ex = explain(net, x, classes=options.classes, backend=options.backend, rectify=options.rectify,
                         reduce=options.reduce, vmax=options.vmax, method=options.method)
            for b, e in enumerate(group):
                records.append(write_outputs(e["folder"], e["item"], ex, b, e["true"], e["scale"], e["settings"],
                                             options.binary_threshold, options.preprocess.invert, run))
                bar.update()
    finally:
        bar.close()
    return records, len(records), skipped
