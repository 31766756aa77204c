"""One chunk of a dataset run: read, explained and summarised into the store's arrays and table rows.

:class:`RunOptions` says what every image is explained and summarised with; :func:`explain_chunk` does one
chunk, the same function in this process and on Dask workers (:mod:`clearmaps.distributed`), so both write
the same bytes; :func:`array_specs` and :func:`table_schema` are the shapes of what it returns.

Per image the table holds: file, label, predicted class and its probability, the top classes, the
**true-class share** (the share of the map's positive dominant response D(x) that lies where the true class
dominates: 1 when the true class dominates everywhere it responds) and the **strong-feature fraction** (the
share of pixels in the paper's strong-feature mask, r(x|c) > τ · max r(x|c), for the true class, else the
predicted one; Section 4.3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from .dataset_transform import Transform
from .datasets import Dataset
from .reference import ClearmapsError, Network

DEFAULT_TAU = 0.1  # the strong-feature threshold of clearmaps evaluate (paper.DEFAULT_TAU)
TOP_K = 5
THUMBNAIL_SIDE = 128  # longer side of a stored input thumbnail, at most


@dataclass(frozen=True)
class RunOptions:
    """What every image is explained and summarised with (all of it goes into the store's settings).

    backend, classes, rectify, reduce, vmax : as :func:`clearmaps.explain` takes them
    method : the response method, or None for explain's default (passed only when explain takes it)
    transform : :class:`clearmaps.datasets.Transform`
    tau : the strong-feature threshold (a fraction of the strongest response)
    top_k : how many top classes the table lists
    responses : also store the K response maps (N, K, H, W) float32
    thumbnails : also store the inputs as the model sees them (before mean/std), for the report
    skip_bad : an unreadable image is recorded (its row says why, its maps are zeros) instead of an error
    """

    backend: str = "auto"
    classes: object = None
    rectify: bool = True
    reduce: str = "sum"
    vmax: object = None
    method: str | None = None
    transform: Transform = field(default_factory=Transform)
    tau: float = DEFAULT_TAU
    top_k: int = TOP_K
    responses: bool = False
    thumbnails: bool = True
    skip_bad: bool = False

    def __post_init__(self):
        if not isinstance(self.transform, Transform):
            raise ClearmapsError(f"transform is a {type(self.transform).__name__}; expected a "
                                 "clearmaps.datasets.Transform.")
        if not isinstance(self.tau, (int, float)) or not 0 <= self.tau < 1:
            raise ClearmapsError(f"tau={self.tau!r}; expected a fraction of the strongest response in [0, 1).")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ClearmapsError(f"top_k={self.top_k!r}; expected a positive int.")

    def explain_kwargs(self) -> dict:
        kw = dict(classes=self.classes, backend=self.backend, rectify=self.rectify, reduce=self.reduce,
                  vmax=self.vmax)
        if self.method is not None:
            from .explanation import explain

            if "method" not in inspect.signature(explain).parameters:
                raise ClearmapsError(f"method={self.method!r}: this clearmaps's explain has no response methods "
                                     "yet; leave it out (the deconvnet).")
            kw["method"] = self.method
        return kw


def thumbnail_size(size) -> tuple[int, int]:
    h, w = size
    if max(h, w) <= THUMBNAIL_SIDE:
        return h, w
    s = THUMBNAIL_SIDE / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _n_maps(net: Network, classes) -> int:
    if classes is None:
        return net.num_classes
    if isinstance(classes, str):
        return int("".join(ch for ch in classes if ch.isdigit()))
    return len(classes) if isinstance(classes, (list, tuple)) else 1


def array_specs(net: Network, options: RunOptions, size, channels: int) -> list[dict]:
    h, w = size
    k, n = _n_maps(net, options.classes), net.num_classes
    specs = [("rgb", (h, w, 3), "uint8"), ("dominant_class", (h, w), "int16" if n < 32768 else "int32"),
             ("dominant_response", (h, w), "float32"), ("classes", (k,), "int32"), ("logits", (n,), "float32"),
             ("class_share", (n,), "float32")]
    if options.thumbnails:
        specs.append(("thumbnails", thumbnail_size(size) + (channels,), "uint8"))
    if options.responses:
        specs.append(("responses", (k, h, w), "float32"))
    return [{"name": a, "shape": list(s), "dtype": d} for a, s, d in specs]


def table_schema():
    import pyarrow as pa

    return pa.schema([
        ("index", pa.int64()), ("file", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
        ("predicted", pa.int32()), ("predicted_name", pa.string()), ("probability", pa.float32()),
        ("true_probability", pa.float32()), ("correct", pa.bool_()),
        ("top_classes", pa.list_(pa.int32())), ("top_probabilities", pa.list_(pa.float32())),
        ("true_share", pa.float32()), ("strong_fraction", pa.float32()), ("strong_class", pa.int32()),
        ("error", pa.string()),
    ])


def class_shares(dominant_class: np.ndarray, dominant_response: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, n): each class's share of the image's positive dominant response, sum over pixels of max(D, 0)
    where C(x) = c, divided by its sum over all pixels (a row of zeros where D ≤ 0 everywhere)."""
    b = dominant_class.shape[0]
    weight = np.maximum(np.asarray(dominant_response, dtype=np.float64), 0.0).reshape(b, -1)
    index = (np.asarray(dominant_class, dtype=np.int64).reshape(b, -1) + n_classes * np.arange(b)[:, None])
    mass = np.bincount(index.ravel(), weights=weight.ravel(), minlength=b * n_classes).reshape(b, n_classes)
    total = weight.sum(axis=1, keepdims=True)
    return np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)


def _thumbnails(pixels: np.ndarray, size) -> np.ndarray:
    """(B, C, H, W) in [0, 1] → (B, h, w, C) uint8, round half up; downscaled (box filter) when large."""
    t = np.floor(np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    h, w = thumbnail_size(size)
    if (h, w) == tuple(t.shape[1:3]):
        return t
    from PIL import Image

    return np.stack([np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c])).resize(
        (w, h), Image.Resampling.BOX)) for c in range(img.shape[-1])], axis=-1) for img in t])


def explain_chunk(net: Network, dataset: Dataset, start: int, stop: int, options: RunOptions, size):
    """Read, explain and summarise images ``start``..``stop`` of ``dataset``.

    Returns (arrays, table): a dict of the store's per-image arrays for these images, and their table rows
    (a pyarrow Table). A bad image (``options.skip_bad``) has zeros in every array and its row says why.
    """
    import pyarrow as pa

    from .explanation import explain

    c = net.input_shape[0]
    pixels, errors = dataset.read(start, stop, options.transform, c, size, options.skip_bad)
    x = options.transform.pre.normalise(pixels)
    e = explain(net, x, **options.explain_kwargs())
    n = net.num_classes
    rgb, dom_c = np.asarray(e.rgb), np.asarray(e.dominant_class)
    dom_r, classes = np.asarray(e.dominant_response), np.asarray(e.classes)
    logits, probs = np.asarray(e.logits, dtype=np.float32), np.asarray(e.probabilities, dtype=np.float64)
    responses = np.asarray(e.responses)
    share = class_shares(dom_c, dom_r, n)
    labels = dataset.labels[start - dataset.offset:stop - dataset.offset]
    predicted = np.argmax(logits, axis=1)
    top = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :min(options.top_k, n)]
    ok = np.array([err is None for err in errors])
    names = net.class_names

    strong_fraction = np.full(len(ok), np.nan)
    strong_class = np.full(len(ok), -1)
    for b in range(len(ok)):
        ref = labels[b] if labels[b] >= 0 else predicted[b]
        pos = np.flatnonzero(classes[b] == ref)
        if not ok[b] or not len(pos):
            continue
        r = responses[b, pos[0]].astype(np.float64)
        top_r = r.max()
        # the paper's mask M = r > τ·max r; no positive response, no strong feature
        strong_fraction[b] = float(np.mean(r > options.tau * top_r)) if top_r > 0 else 0.0
        strong_class[b] = ref

    known = (labels >= 0) & ok
    rows = {
        "index": np.arange(start, stop, dtype=np.int64),
        "file": [dataset.names[i - dataset.offset] for i in range(start, stop)],
        "label": pa.array(labels.astype(np.int32), mask=labels < 0),
        "label_name": [names[v] if v >= 0 else None for v in labels],
        "predicted": pa.array(predicted.astype(np.int32), mask=~ok),
        "predicted_name": [names[p] if k else None for p, k in zip(predicted, ok)],
        "probability": pa.array(probs[np.arange(len(ok)), predicted].astype(np.float32), mask=~ok),
        "true_probability": pa.array(probs[np.arange(len(ok)), np.maximum(labels, 0)].astype(np.float32),
                                     mask=~known),
        "correct": pa.array(predicted == labels, mask=~known),
        "top_classes": [row.astype(np.int32).tolist() if k else None for row, k in zip(top, ok)],
        "top_probabilities": [probs[b, top[b]].astype(np.float32).tolist() if ok[b] else None
                              for b in range(len(ok))],
        # null, not 0, where the map has no positive response at all (as clearmaps.evidence.true_class_share)
        "true_share": pa.array(share[np.arange(len(ok)), np.maximum(labels, 0)].astype(np.float32),
                               mask=~known | (share.sum(axis=1) == 0)),
        "strong_fraction": pa.array(strong_fraction.astype(np.float32), mask=np.isnan(strong_fraction)),
        "strong_class": pa.array(strong_class.astype(np.int32), mask=strong_class < 0),
        "error": errors,
    }
    table = pa.table(rows, schema=table_schema())

    bad = ~ok
    arrays = {"rgb": rgb, "dominant_class": dom_c, "dominant_response": dom_r, "classes": classes,
              "logits": logits, "class_share": share}
    if options.thumbnails:
        arrays["thumbnails"] = _thumbnails(pixels, size)
    if options.responses:
        arrays["responses"] = responses
    if bad.any():  # whatever zeros gave, a bad image's maps are zeros
        arrays = {k: np.where(bad.reshape((-1,) + (1,) * (np.ndim(v) - 1)), 0, v) for k, v in arrays.items()}
    return arrays, table


def _bad_rows(table) -> list:
    """(file, why) of each image of a chunk's table that was skipped as bad."""
    errors = table.column("error").to_pylist()
    files = table.column("file").to_pylist()
    return [(f, e) for f, e in zip(files, errors) if e is not None]
