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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import pictures, render
from .images import Item, Preprocess, unique_name
from .reference import ClearmapsError

FILES = ("clear.png", "overlay.png", "heatmap.png", "binary.png", "legend.png", "panel.png", "maps.npz")
RECORD = ".clearmaps-done.json"
_ROOT_FILES = ("figure3.png", "table1.csv", "table1.json")  # what the subcommands write beside the folders
MAX_NODE_VALUES = 1 << 27
"""Most values one node of the network may output per image (1 GiB in float64): a larger input would make
``explain`` allocate tens of gigabytes before it could fail."""
_MAX_RECORD_BYTES = 1 << 20
PICTURES_VERSION = 2
"""Part of every image's settings: raised when the pictures change, so that a rerun redraws older outputs
(2: class colours by class id, the heatmap and binary map in managua, overlays at the image's resolution)."""


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


class CompileProgress:
    """The command's words for a first run (:mod:`clearmaps.firstrun`): a line before the CPU kernels compile,
    a line of progress on the terminal while they do (the count, the kernel, the time, redrawn every second),
    and a line when they are done. With ``quiet`` the two lines only."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self._stop = None

    def _say(self, text: str) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)  # keeps a progress bar on the terminal intact
        except ImportError:
            print(text, flush=True)
        sys.stdout.flush()

    def start(self, where: str) -> None:
        from .firstrun import ESTIMATE

        self._say(f"first run: compiling the CPU kernels for this machine, once ({ESTIMATE}); they are cached in "
                  f"{where}, so later runs start at once")
        if self.quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(desc="compiling kernel", disable=None, file=sys.stderr, leave=False, dynamic_ncols=True,
                        bar_format="{desc} {n}{postfix} [{elapsed}]")  # "compiling kernel 3, _gather_rows [00:09]"
        if self.bar.disable:  # not a terminal: the two lines say it all
            self.bar = None
            return
        import threading

        self._stop = threading.Event()

        def tick(bar=self.bar, stop=self._stop):  # redraw the elapsed time while one kernel compiles
            while not stop.wait(1.0):
                bar.refresh()

        threading.Thread(target=tick, daemon=True, name="clearmaps-compile-progress").start()

    def kernel(self, count: int, name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(name, refresh=True)

    def done(self, count: int, seconds: float, where: str) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._say(f"compiled {count} kernels in {seconds:.0f} s (cached for later runs)")


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
    palette: object = None  # None, "hues", "colorblind", or a tuple of hues (see clearmaps.explain)

    def settings(self, fingerprint: str, item: Item, true: int | None, scale: int, batch: str | None = None) -> str:
        """Everything the image's outputs depend on, as the text maps.npz and the record keep. ``batch``
        identifies the images explained together, for ``vmax="batch"``, whose scale they share."""
        pixels = hashlib.sha256(np.ascontiguousarray(item.pixels, dtype=np.float32).tobytes()).hexdigest()
        fields = {"model": fingerprint, "source": item.source, "classes": self.classes, "true": true,
                  "scale": scale, "input": pixels, "preprocess": self.preprocess, "rectify": self.rectify,
                  "reduce": self.reduce, "vmax": self.vmax, "binary_threshold": self.binary_threshold,
                  "method": self.method, "palette": self.palette or "hues", "pictures": PICTURES_VERSION}
        if batch is not None:
            fields["vmax_batch"] = batch
        return json.dumps(fields, sort_keys=True, default=str)


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
    dict. ``run`` identifies the run in the record.

    The overlay is drawn on the image as the user gave it, at its own resolution (before --resize, without
    --invert); the other pictures at the network's, upscaled by ``scale``."""
    v = pictures.view(e, b)
    names = v.names
    pred, prob = v.predicted, v.probability
    image = render.pixels_to_rgb(1.0 - item.pixels if invert else item.pixels)  # as the model sees it
    original = item.extra.get("original")  # uint8 (H, W, 3): the user's image before --resize
    if original is not None:
        shown = render.upscale(original, max(1, 224 // max(original.shape[:2])))  # its own size, unless tiny
    else:
        shown = render.upscale(render.pixels_to_rgb(item.pixels), scale)  # as the user gave it
    pics = pictures.pictures(v, image, true, binary_threshold, shown,
                             "as the model sees it" + (", inverted" if invert else ""), scale)
    if original is None:
        pics = replace(pics, overlay_note="on the input" + (" as given" if invert else ""))

    folder.mkdir(parents=True, exist_ok=True)
    try:  # the old record goes first: while the files are rewritten, nothing says they are done
        os.unlink(folder / RECORD)
    except FileNotFoundError:
        pass
    up = lambda a: render.upscale(a, scale)  # noqa: E731
    missing = np.zeros((*v.clear.shape[:2], 3), np.uint8)
    render.save_png(folder / "clear.png", up(v.clear))
    render.save_png(folder / "overlay.png", pics.overlay)
    render.save_png(folder / "heatmap.png", pics.heatmap if pics.heatmap is not None else up(missing))
    render.save_png(folder / "binary.png", pics.binary if pics.binary is not None else up(missing))
    render.save_png(folder / "legend.png", render.pad(pics.legend, 6))
    caption = pictures.caption_of(v, item.name, true)
    render.save_png(folder / "panel.png", pictures.panel(v, pics, scale, caption, binary_threshold))
    arrays = dict(responses=v.responses.astype(np.float32), classes=v.classes,
                  dominant_class=v.dominant_class, dominant_response=v.dominant_response.astype(np.float32),
                  rgb=v.clear, logits=np.asarray(e.logits[b]), probabilities=v.probabilities,
                  palette=np.asarray(e.palette), palette_by=np.array(e.palette_by), hues=v.hues,
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
                         reduce=options.reduce, vmax=options.vmax, method=options.method,
                         palette=list(options.palette) if isinstance(options.palette, tuple) else options.palette)
            for b, e in enumerate(group):
                records.append(write_outputs(e["folder"], e["item"], ex, b, e["true"], e["scale"], e["settings"],
                                             options.binary_threshold, options.preprocess.invert, run))
                bar.update()
    finally:
        bar.close()
    return records, len(records), skipped
