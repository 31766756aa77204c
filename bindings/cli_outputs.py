"""The ``clearmaps`` command's files: output folders, progress bars, and every output of one image.

Per image, in DIR/<name>/: clear.png, overlay.png, heatmap.png, binary.png, legend.png, panel.png and
maps.npz, each written atomically, maps.npz last. maps.npz also records the settings it was made with, so
a rerun skips an image whose files are all there with the same settings (``is_done``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import render
from .images import Item, Preprocess
from .reference import ClearmapsError, binary_map, heatmap, palette_rgb

FILES = ("clear.png", "overlay.png", "heatmap.png", "binary.png", "legend.png", "panel.png", "maps.npz")


def prepare_out(path) -> Path:
    """Create the output folder and prove it can be written, before any work is done."""
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
    return out


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

    def settings(self, fingerprint: str, item: Item, true: int | None, scale: int) -> str:
        """Everything the image's outputs depend on, as the text maps.npz records."""
        pixels = hashlib.sha256(np.ascontiguousarray(item.pixels, dtype=np.float32).tobytes()).hexdigest()
        return json.dumps({"model": fingerprint, "source": item.source, "classes": self.classes, "true": true,
                           "scale": scale, "input": pixels, "preprocess": self.preprocess, "rectify": self.rectify,
                           "reduce": self.reduce, "vmax": self.vmax, "binary_threshold": self.binary_threshold},
                          sort_keys=True, default=str)


def _position(classes_row: np.ndarray, class_id: int | None) -> int | None:
    hit = np.flatnonzero(classes_row == class_id) if class_id is not None else []
    return int(hit[0]) if len(hit) else None


def write_outputs(folder: Path, item: Item, e, b: int, true: int | None, scale: int, settings: str,
                  binary_threshold: float = 0.1, invert: bool = False) -> dict:
    """Every output of image ``b`` of explanation ``e`` (see FILES), each written atomically; maps.npz last,
    as the 'done' mark. Returns the line the command prints about it, as a dict."""
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
    up = lambda a: render.upscale(a, scale)  # noqa: E731
    render.save_png(folder / "clear.png", up(clear))
    render.save_png(folder / "overlay.png", up(render.overlay(image, clear)))
    render.save_png(folder / "heatmap.png", up(heat))
    render.save_png(folder / "binary.png", up(binary))
    render.save_png(folder / "legend.png", render.pad(legend, 6))
    caption = (f"{item.name}: predicted {names[pred]} (p = {prob:.2f})"
               + (f", true {names[true]}" + (" - correct" if true == pred else " - MISCLASSIFIED")
                  if true is not None else ", true class unknown"))
    key = (f"heatmap: hot = response of class {names[ref]} ({ref_why}), green = another class beats it.  "
           f"binary map: red = for {names[ref]}, blue = against (where the dominant response is above "
           f"{binary_threshold:g} of the image's strongest).")
    tiles = render.hstack([render.titled(up(image), "input"), render.titled(up(clear), "CLEAR map"),
                           render.titled(up(render.overlay(image, clear)), "overlay"),
                           render.titled(up(heat), f"heatmap ({names[ref]})"),
                           render.titled(up(binary), f"binary map ({names[ref]})")], gap=8)
    panel = render.vstack([legend, render.text_block(caption, size=15, align="left", pad=1), tiles,
                           render.text_block(key, size=12, align="left", pad=1, colour=(70, 70, 70))], gap=6)
    render.save_png(folder / "panel.png", render.pad(panel, 10))
    arrays = dict(responses=e.responses[b].astype(np.float32), classes=classes_row,
                  dominant_class=e.dominant_class[b], dominant_response=e.dominant_response[b].astype(np.float32),
                  rgb=clear, logits=e.logits[b], probabilities=e.probabilities[b], palette=e.palette,
                  class_names=np.array(names), input=item.pixels.astype(np.float32),
                  true_class=np.int64(-1 if true is None else true), settings=np.array(settings))
    render.atomic_write(folder / "maps.npz", lambda f: np.savez_compressed(f, **arrays))
    return {"name": item.name, "source": item.source, "predicted": names[pred], "probability": round(prob, 4),
            "true": None if true is None else names[true]}


def is_done(folder: Path, settings: str) -> bool:
    """An image is done when all its files are there and maps.npz was made with the same settings."""
    if not all((folder / f).is_file() for f in FILES):
        return False
    try:
        with np.load(folder / "maps.npz", allow_pickle=False) as data:
            return str(data["settings"]) == settings
    except Exception:  # an unreadable or older file: redo it
        return False


def explain_items(net, fingerprint: str, items: list, trues: list, out: Path, options: ExplainOptions,
                  scale: int | None = None, force: bool = False, batch_size: int = 16,
                  quiet: bool = False) -> tuple[list, int, int]:
    """Explain ``items`` in batches and write their outputs under ``out``/<name>/, skipping those already
    done with the same settings unless ``force``. ``scale`` None picks one per image (longer side >= 224).
    Returns (records, explained now, skipped)."""
    from .explanation import explain

    todo, skipped, records = [], 0, []
    for item, true in zip(items, trues):
        item_scale = scale or render.auto_scale(*item.pixels.shape[1:])
        settings = options.settings(fingerprint, item, true, item_scale)
        if not force and is_done(out / item.name, settings):
            skipped += 1
            continue
        todo.append((item, true, settings, item_scale))
    bar = Progress(len(todo), "explaining", quiet)
    try:
        for start in range(0, len(todo), batch_size):
            by_shape: dict = {}
            for entry in todo[start:start + batch_size]:  # images of one batch must share a size
                by_shape.setdefault(entry[0].pixels.shape, []).append(entry)
            for group in by_shape.values():
                x = options.preprocess.normalise(np.stack([g[0].pixels for g in group]))
                e = explain(net, x, classes=options.classes, backend=options.backend, rectify=options.rectify,
                            reduce=options.reduce, vmax=options.vmax)
                for b, (item, true, settings, item_scale) in enumerate(group):
                    records.append(write_outputs(out / item.name, item, e, b, true, item_scale, settings,
                                                 options.binary_threshold, options.preprocess.invert))
                    bar.update()
    finally:
        bar.close()
    return records, len(todo), skipped
