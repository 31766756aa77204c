"""``clearmaps report RESULTS``: a static HTML report of a results store (opens from disk, no server).

    REPORT/index.html          the page (its script and style inline)
    REPORT/data.js             the per-image columns, the matrices and the settings, as one JS object
    REPORT/atlas/clear-00012.png, overlay-00012.png, input-00012.png
                               chunk 12's CLEAR maps, overlays and inputs as one picture each (a grid of
                               tiles): a page of the gallery loads a few pictures, not one file per image

What it shows: accuracy and the confusion matrix; the **CLEAR matrix**, for each true class the mean share
of its maps' positive dominant response D(x) that each class dominates (a row sums to 1; Eqs. 4-5), with how
often each class leads; and a gallery filterable by true class, predicted class and correctness, sortable
by confidence, true-class share and strong-feature fraction, a page at a time, so that 100,000 images stay
responsive (filtering and sorting run on typed arrays; only one page of cards is ever in the document).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .reference import ClearmapsError

ATLAS_COLUMNS = 16
DISPLAY_TILE = 96  # px a tile is shown at in the gallery (nearest-neighbour scaling for small maps)


def _tiles_to_atlas(tiles: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 → one (rows·h, cols·w, 3) picture, tile i at row i // cols, column i % cols."""
    n, h, w, _ = tiles.shape
    cols = min(ATLAS_COLUMNS, n)
    rows = -(-n // cols)
    atlas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        atlas[r * h:(r + 1) * h, c * w:(c + 1) * w] = tiles[i]
    return atlas


def _resize_rgb(images: np.ndarray, h: int, w: int) -> np.ndarray:
    if images.shape[1:3] == (h, w):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX)) for img in images])


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from .store import _fs, write_atomic

    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    fs, _ = _fs(str(path))
    write_atomic(fs, str(path), buf.getvalue())


def _palette(settings: dict, n: int) -> list[str]:
    """The colour of each class as the maps draw it when every class has a map (Eq. 6's default palette)."""
    from .reference import default_palette, palette_rgb

    rgb = palette_rgb(default_palette(n))
    return ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in np.asarray(rgb).reshape(n, 3)]


def _column(table, name, fill, dtype):
    col = table.column(name).to_numpy(zero_copy_only=False)
    if col.dtype == object:
        col = np.array([fill if v is None else v for v in col])
    return np.nan_to_num(col.astype(np.float64), nan=fill).astype(dtype)


def collect(results) -> dict:
    """Everything the page shows, from the store at ``results``: a dict ready for JSON (and the atlases'
    sources, as ``_store``)."""
    from .store import open_store

    store = open_store(str(results))
    s = store.settings
    names = list(s["model"]["class_names"])
    n = len(names)
    table = store.table()
    rows = table.num_rows
    label = _column(table, "label", -1, np.int64)
    ok = np.array([e is None for e in table.column("error").to_pylist()])
    predicted = np.where(ok, _column(table, "predicted", -1, np.int64), -1)
    prob = _column(table, "probability", -1, np.float64)
    share = _column(table, "true_share", -1, np.float64)
    strong = _column(table, "strong_fraction", -1, np.float64)
    index = table.column("index").to_numpy()
    labelled = (label >= 0) & ok

    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (label[labelled], predicted[labelled]), 1)
    # the CLEAR matrix: rows by true class (by predicted class when the set has no labels)
    by = np.where(labelled, label, -1) if labelled.any() else np.where(ok, predicted, -1)
    share_sum = np.zeros((n, n))
    leads = np.zeros((n, n), dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    class_share = store.array("class_share")
    done = sorted(store.done())
    for chunk in done:
        start, stop = store.bounds(chunk)
        cs = np.asarray(class_share[start:stop], dtype=np.float64)
        pos = np.searchsorted(index, np.arange(start, stop))
        rows_by = by[pos]
        keep = (rows_by >= 0) & (cs.sum(axis=1) > 0)
        np.add.at(share_sum, rows_by[keep], cs[keep])
        np.add.at(leads, (rows_by[keep], cs[keep].argmax(axis=1)), 1)
        np.add.at(counts, rows_by[keep], 1)
    clear_matrix = np.divide(share_sum, counts[:, None], out=np.zeros_like(share_sum), where=counts[:, None] > 0)

    correct = int(((predicted == label) & labelled).sum())
    has_thumbs = any(a["name"] == "thumbnails" for a in s["arrays"])
    h, w = s["size"]
    th, tw = next((a["shape"][:2] for a in s["arrays"] if a["name"] == "thumbnails"), (h, w))
    if not has_thumbs and max(h, w) > 128:
        from .dataset_chunk import thumbnail_size

        th, tw = thumbnail_size((h, w))
    return {
        "title": f"clearmaps report: {rows:,} images",
        "classNames": names, "palette": _palette(s, n), "paletteNote": (
            "colours are the classes' (every class has a map)" if s["explain"].get("classes") is None else
            f"maps were made for classes {s['explain']['classes']}: a colour is a position in that list"),
        "count": rows, "total": store.count, "labelled": int(labelled.sum()), "correct": correct,
        "bad": int((~ok).sum()),
        "accuracy": (correct / int(labelled.sum())) if labelled.any() else None,
        "confusion": confusion.tolist(), "clearMatrix": np.round(clear_matrix, 4).tolist(),
        "clearLeads": leads.tolist(), "clearCounts": counts.tolist(),
        "clearRowsBy": "true class" if labelled.any() else "predicted class (the set has no labels)",
        "settings": {"dataset": s["dataset"]["kind"], "backend": s["explain"]["backend"],
                     "method": s["explain"].get("method", "deconvnet"), "rectify": s["explain"]["rectify"],
                     "reduce": s["explain"]["reduce"], "tau": s["table"]["tau"], "model": s["model"]["identity"][:40],
                     "size": f"{h}x{w}"},
        "chunkSize": store.chunk_size, "atlasColumns": ATLAS_COLUMNS, "tile": [int(th), int(tw)],
        "display": DISPLAY_TILE, "views": ["clear", "overlay", "input"] if has_thumbs else ["clear"],
        "columns": {
            "index": index.tolist(), "file": table.column("file").to_pylist(),
            "label": label.tolist(), "predicted": predicted.tolist(),
            "prob": np.round(prob, 4).tolist(), "share": np.round(share, 4).tolist(),
            "strong": np.round(strong, 4).tolist(),
            "error": [e or "" for e in table.column("error").to_pylist()],
        },
        "_store": store, "_done": done, "_thumbs": has_thumbs,
    }


def write_atlases(data: dict, out: Path, progress=None) -> None:
    """The gallery's pictures: per chunk done, one atlas per view (see the module docstring)."""
    from . import render

    store = data["_store"]
    th, tw = data["tile"]
    rgb = store.array("rgb")
    thumbs = store.array("thumbnails") if data["_thumbs"] else None
    (out / "atlas").mkdir(parents=True, exist_ok=True)
    for chunk in data["_done"]:
        start, stop = store.bounds(chunk)
        clear = _resize_rgb(np.asarray(rgb[start:stop]), th, tw)
        _save_png(out / "atlas" / f"clear-{chunk:05d}.png", _tiles_to_atlas(clear))
        if thumbs is not None:
            t = np.asarray(thumbs[start:stop])
            inputs = np.repeat(t, 3, axis=-1) if t.shape[-1] == 1 else t[..., :3]
            over = np.stack([render.overlay(a, b) for a, b in zip(inputs, clear)])
            _save_png(out / "atlas" / f"input-{chunk:05d}.png", _tiles_to_atlas(inputs))
            _save_png(out / "atlas" / f"overlay-{chunk:05d}.png", _tiles_to_atlas(over))
        if progress is not None:
            progress(stop - start)


def write_report(results, out=None, page_size: int = 48, quiet: bool = True) -> tuple[Path, dict]:
    """Write the report of the store at ``results`` into ``out`` (default ``results/report``).

    Returns (the path of index.html, a few figures: images, accuracy)."""
    from .dataset_run import RunProgress
    from .report_page import PAGE

    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ClearmapsError(f"page_size={page_size!r}; expected a positive int (images per gallery page).")
    out = Path(out) if out is not None else Path(str(results)) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClearmapsError(f"cannot write the report to {str(out)!r} ({exc.strerror or exc}); choose another "
                             "with --out.") from None
    data = collect(results)
    bar = RunProgress(data["count"], 0, quiet)
    try:
        write_atlases(data, out, bar.update)
    finally:
        bar.close()
    public = {k: v for k, v in data.items() if not k.startswith("_")}
    public["pageSize"] = page_size
    script = "window.CLEARMAPS_REPORT = " + json.dumps(public, separators=(",", ":"), allow_nan=False) + ";\n"
    from .store import _fs, write_atomic

    fs, _ = _fs(str(out))
    write_atomic(fs, str(out / "data.js"), script.encode())
    write_atomic(fs, str(out / "index.html"), PAGE.replace("{{title}}", _html(data["title"])).encode())
    acc = "n/a (no labels)" if data["accuracy"] is None else f"{100 * data['accuracy']:.1f}%"
    return out / "index.html", {"images": data["count"], "accuracy": acc}


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
