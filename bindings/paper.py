"""The paper's protocols as plain functions: Fig. 3 and Table 1 (Kumar, Wong & Taylor 2017, Section 4).

    figure3(net, pixels, labels)        Fig. 3: per class a correctly classified and a misclassified example
                                        (image, heatmap, CLEAR map), the legend on top; its three steps are
                                        figure3_picks, figure3_example and figure3_layout
    table1(net, pixels, labels, taus)   Table 1: accuracy on full images, on only their strong features and
                                        without them (Section 4.3)
    classify(net, x)                    predicted class ids, for many images at once

``pixels`` are float (B, C, H, W) in [0, 1] as read; an optional :class:`clearmaps.images.Preprocess` turns
them into network input. Nothing heavy is imported at module level: the ``clearmaps`` command imports this
module while it checks its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import Preprocess
from .palettes import colormap_table, heatmap_rgb
from .reference import (ClearmapsError, Network, check_input, keep_strong, palette_rgb, remove_strong,
                        strong_feature_mask)

# The paper's Table 1 row for MNIST (its own network, the full test set, an unstated tau).
PAPER_TABLE1_MNIST = {"full": 99.26, "only_strong": 79.89, "without_strong": 43.45}
# tau = 0.1: an order-of-magnitude cut on r(x|true). On the built-in held-out digits the mask then covers
# 16.2% of the image, the closest of the sweep 0.05/0.1/0.2/0.5 to the digits' ink (13.4% of pixels > 0.5):
# "only strong features" keeps about as many pixels as a digit has. Chosen by that area, not by the
# accuracies (README shows the sweep).
DEFAULT_TAU = 0.1
TABLE1_COLUMNS = ("tau", "n", "full", "only_strong", "without_strong", "strong_pixels_pct", "strong_on_bright_pct")
# a pixel brighter than this (any channel) is "ink": for MNIST, the stroke
BRIGHT = 0.5


def classify(net: Network, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predicted class ids: the network's forward pass run by torch (float32).

    Used to classify many images quickly (the held-out set, the masked images of Table 1); the CLEAR maps
    themselves always come from :func:`clearmaps.explain` with the chosen backend.

    Parameters
    ----------
    net : Network
    x : float array (B, C, H, W)
        Network input (after any preprocessing).
    batch : int
        Images per forward pass.

    Returns
    -------
    int64 array (B,)
        The argmax of each image's logits.
    """
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ClearmapsError(f"batch={batch!r}; expected a positive int.")
    x = check_input(net, x)
    from .torch_forward import predict

    return predict(net, x, int(batch))


# ---- argument checks ----------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ClearmapsError(f"{name}={value!r}; expected an int >= {minimum}.")
    return int(value)


def _check_labels(labels, n: int | None, num_classes: int, name: str = "labels") -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim != 1 or a.dtype.kind not in "iu" or (n is not None and len(a) != n):
        want = f"({n},)" if n is not None else "(B,)"
        raise ClearmapsError(f"{name} has shape {a.shape} and dtype {a.dtype}; expected integer class ids of "
                             f"shape {want}.")
    if len(a) and (a.min() < 0 or a.max() >= num_classes):
        raise ClearmapsError(f"{name} run {a.min()} .. {a.max()}; the network has classes 0 .. {num_classes - 1}.")
    return a.astype(np.int64)


def _check_set(net, pixels, labels, preprocess, backend: str, batch_size: int):
    """What figure3 and table1 share: the network, a labelled set of pixels, its preprocessing, the backend
    (its name only: the backend itself loads when explain first needs it) and the batch size."""
    from .backends import BACKENDS

    if not isinstance(net, Network):
        raise ClearmapsError(f"net is {type(net).__name__}; expected a clearmaps.Network (see "
                             "clearmaps.load_checkpoint and clearmaps.from_torch).")
    p = check_input(net, pixels, "pixels")  # shape, dtype, finiteness and a size the network takes
    if p.min() < 0 or p.max() > 1:
        raise ClearmapsError(f"pixels hold values in [{p.min():.3g}, {p.max():.3g}]; expected pixels in [0, 1] "
                             "before normalisation (divide uint8 images by 255, pass the rest as "
                             "preprocess=Preprocess(mean=..., std=...)).")
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise ClearmapsError(f"preprocess is {type(preprocess).__name__}; expected None or a "
                             "clearmaps.images.Preprocess.")
    if backend not in BACKENDS:
        raise ClearmapsError(f"backend={backend!r}; expected one of {BACKENDS}.")
    return (p.astype(np.float64), _check_labels(labels, len(p), net.num_classes), preprocess or Preprocess(),
            _check_int(batch_size, "batch_size", 1))


# ---- Fig. 3 -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figure3Example:
    """One example of Fig. 3: its position ``index`` in its set, the image, heatmap and CLEAR map (uint8 (H, W, 3))."""

    index: int
    true_class: int
    predicted: int
    probability: float
    image: np.ndarray
    heatmap: np.ndarray
    clear: np.ndarray


def figure3_picks(labels, predicted, num_classes: int, seed: int = 0) -> list:
    """Pick Fig. 3's examples: for each class a correctly classified and a misclassified one, at random.

    Parameters
    ----------
    labels, predicted : int array (B,)
        True and predicted class ids of the pool to draw from.
    num_classes, seed : int
        Classes 0 .. num_classes - 1 each get a row; the same seed picks the same examples.

    Returns
    -------
    list of (class_id, correct, misclassified)
        One tuple per class, in class order: the positions in the pool of a correctly classified and of a
        misclassified example of that class, or None where the pool has none.
    """
    n = _check_int(num_classes, "num_classes", 1)
    y = _check_labels(labels, None, n)
    p = _check_labels(predicted, len(y), n, "predicted")
    seed = _check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(n):
        chosen = []
        # correct first, then misclassified: the order the draws come from rng fixes which examples a seed gives
        for mask in ((y == c) & (p == c), (y == c) & (p != c)):
            where = np.flatnonzero(mask)
            chosen.append(int(rng.choice(where)) if where.size else None)
        picks.append((c, *chosen))
    return picks


def figure3_example(index: int, true_class: int, pixels, probabilities, classes, responses, rgb,
                    scale: int = 4) -> Figure3Example:
    """One Fig. 3 example from an image and its CLEAR maps (one row of an :class:`clearmaps.Explanation`).

    Parameters
    ----------
    index, true_class : int
        The example's position in its set (the caption's "#index") and its true class id; the heatmap is
        drawn for that class, so ``classes`` must include it.
    pixels : float array (C, H, W) in [0, 1]
        The image as shown.
    probabilities : float array (N,)
        The network's class probabilities; the prediction is their argmax.
    classes : int array (K,)
        Class ids of the K maps in ``responses``.
    responses : float array (K, H, W)
        Attentive responses r(x|c) of those classes.
    rgb : uint8 array (H, W, 3)
        The CLEAR map.
    scale : int
        The heatmap is drawn upscaled this many times (its hatching needs the room): Fig. 3's ``scale``.
    """
    from . import render

    probs = np.asarray(probabilities, dtype=np.float64)
    ids = np.asarray(classes)
    resp = np.asarray(responses, dtype=np.float64)
    if probs.ndim != 1 or ids.ndim != 1 or resp.ndim != 3 or len(ids) != len(resp):
        raise ClearmapsError(f"probabilities {probs.shape}, classes {ids.shape} and responses {resp.shape}; "
                             "expected (N,), (K,) and (K, H, W): one image's row of an Explanation.")
    where = np.flatnonzero(ids == true_class)
    if not where.size:
        raise ClearmapsError(f"the maps are of classes {ids.tolist()}, without the true class {true_class}; "
                             "explain with classes=None (all classes) for Fig. 3.")
    clear, image = np.asarray(rgb), np.asarray(pixels)
    if clear.shape != (*resp.shape[1:], 3) or clear.dtype != np.uint8 or image.shape[1:] != resp.shape[1:]:
        raise ClearmapsError(f"pixels {image.shape} and rgb {clear.shape} ({clear.dtype}); expected (C, H, W) and "
                             f"uint8 (H, W, 3) with (H, W) = {resp.shape[1:]} as the responses.")
    pred = int(np.argmax(probs))
    return Figure3Example(index=int(index), true_class=int(true_class), predicted=pred,
                          probability=float(probs[pred]), image=render.pixels_to_rgb(image),
                          heatmap=heatmap_rgb(resp[None], np.array([where[0]]), scale=_check_int(scale, "scale", 1))[0],
                          clear=clear)


def figure3_layout(rows, palette, class_names, scale: int = 4, source: str = "held-out set", noun: str = "digit"):
    """The paper's Fig. 3 layout: per class a correctly classified and a misclassified example, each as
    (I) image, (II) heatmap, (III) CLEAR map; the colour legend on top.

    Parameters
    ----------
    rows : sequence of (class_id, Figure3Example or None, Figure3Example or None)
        One row per class: its correctly classified and misclassified example; None draws a grey box
        saying that the set has no such example.
    palette : float array (N,)
        The hue of each class, in class order (``Explanation.palette`` when all classes were explained).
    class_names : sequence of str
        The N class names.
    scale, source, noun : int, str, str
        Screen pixels per image pixel (nearest neighbour); what the examples were drawn from, for the grey
        boxes ("no ... example in the <source>"); what a class is called in the row labels ("digit 3").

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image

    from . import render

    names = [str(n) for n in class_names]
    colours = palette_rgb(palette)
    if len(colours) != len(names):
        raise ClearmapsError(f"palette has {len(colours)} hues for {len(names)} class names; give one per class.")
    scale = _check_int(scale, "scale", 1)
    rows = list(rows)
    examples = [ex for row in rows for ex in row[1:] if ex is not None]
    if not rows or not examples:
        raise ClearmapsError("rows hold no example; expected (class_id, correct, misclassified) tuples with at "
                             "least one Figure3Example.")
    h, w = examples[0].image.shape[:2]
    for row in rows:
        if len(row) != 3 or not 0 <= int(row[0]) < len(names):
            raise ClearmapsError(f"row {row!r}; expected (class_id in 0 .. {len(names) - 1}, correct, "
                                 "misclassified).")
    if any(ex.image.shape[:2] != (h, w) for ex in examples):
        raise ClearmapsError("the examples have different sizes; Fig. 3 lays out images of one size.")
    cell_h, cell_w = h * scale, w * scale
    set_width = 3 * cell_w + 2 * 4

    def example_set(ex, kind):
        if ex is None:
            box = render.placeholder(set_width, cell_h, f"no {kind} example of this {noun}\nin the {source}")
            return render.vstack([box, render.text_block("", set_width, 12)], gap=2)
        heat = ex.heatmap if ex.heatmap.shape[:2] == (cell_h, cell_w) else \
            np.asarray(Image.fromarray(ex.heatmap).resize((cell_w, cell_h), Image.Resampling.NEAREST))
        cells = render.hstack([render.upscale(ex.image, scale), heat, render.upscale(ex.clear, scale)], gap=4)
        caption = f"#{ex.index}: predicted {names[ex.predicted]} (p = {ex.probability:.2f})"
        return render.vstack([cells, render.text_block(caption, set_width, 12, pad=1)], gap=2)

    label_w = 60
    head = render.hstack([render.text_block("", label_w), render.text_block("correctly classified", set_width, 15),
                          render.text_block("misclassified", set_width, 15)], gap=24)
    sub = render.text_block("(I) image   (II) heatmap   (III) CLEAR map", set_width, 12, colour=(70, 70, 70))
    body = [head, render.hstack([render.text_block("", label_w), sub, sub], gap=24)]
    for c, good, bad in rows:
        body.append(render.hstack([render.text_block(f"{noun}\n{names[int(c)]}", label_w, 14),
                                   example_set(good, "correctly classified"), example_set(bad, "misclassified")],
                                  gap=24, valign="top"))
    width = label_w + 2 * set_width + 48
    legend = render.legend(colours, names, max_width=width,
                           title="(III) CLEAR map: colour = the class whose response is largest at the pixel, "
                                 "brightness = how large, black = none")
    looks = "white digit on black, as the model sees them" if noun == "digit" else "as the model sees them"
    from .pictures import hatched_swatch

    bar = render.to_image(np.repeat(colormap_table()[None], 10, axis=0))
    heat_key = render.hstack([render.text_block("(II) heatmap:", size=12, align="left", pad=1),
                              render.text_block("0", size=12, pad=1), bar,
                              render.text_block("strongest", size=12, pad=1),
                              render.text_block(f"solid = the true {noun}'s response,", size=12, pad=1),
                              hatched_swatch(12, 4 * scale),
                              render.text_block("hatched = another class's, where larger", size=12, pad=1)], gap=6,
                             valign="center")
    key = (f"(II) heatmap, colour map bone (no hue, so that no colour reads as a class): solid = the response of the "
           f"true {noun}'s kernel where it is the largest, hatched = the strongest other kernel's where it beats the "
           f"true one, black = none. Images: {looks}.")
    return render.pad(render.vstack([legend, heat_key] + body + [render.text_block(
        render.wrap(key, width, 12), size=12, align="left", pad=1, colour=(70, 70, 70))], gap=6), 12)


def figure3(net: Network, pixels, labels, seed: int = 0, backend: str = "auto", preprocess=None,
            rectify: bool = True, reduce: str = "sum", batch_size: int = 16, scale: int = 4,
            source: str = "held-out set", noun: str = "digit", method: str = "deconvnet", palette=None):
    """The paper's Fig. 3 in one call: classify a labelled set, pick a correctly classified and a
    misclassified example of every class, explain them and lay them out.

    Parameters
    ----------
    net : Network
    pixels, labels : float array (B, C, H, W) in [0, 1], int array (B,)
        The labelled set: images before ``preprocess`` (shown as they are) and their true class ids.
    seed : int
        Which examples are picked (see :func:`figure3_picks`).
    backend, rectify, reduce, batch_size, method, palette :
        As in :func:`clearmaps.explain`, ``batch_size`` images per call (every class is explained; the palette
        is None, "hues", "colorblind" or N hues).
    preprocess : Preprocess, optional
        Turns pixels into network input (default: none).
    scale, source, noun :
        As in :func:`figure3_layout`.

    Returns
    -------
    figure : PIL.Image.Image
    rows : list of (class_id, Figure3Example or None, Figure3Example or None)
        What the figure shows; ``Figure3Example.index`` is the position in ``pixels``. The picks come
        from :func:`classify`; an example's ``predicted`` comes from the chosen backend.
    """
    from .explanation import explain

    p, y, pre, batch_size = _check_set(net, pixels, labels, preprocess, backend, batch_size)
    seed = _check_int(seed, "seed", 0)
    x = pre.normalise(p)
    picks = figure3_picks(y, classify(net, x), net.num_classes, seed)
    chosen = sorted({i for _, good, bad in picks for i in (good, bad) if i is not None})
    shown = 1.0 - p if pre.invert else p  # as the model sees them
    examples, palette = {}, None
    for s in range(0, len(chosen), batch_size):
        idx = chosen[s:s + batch_size]
        e = explain(net, x[idx], backend=backend, rectify=rectify, reduce=reduce, method=method, palette=palette)
        palette = e.palette
        for b, i in enumerate(idx):
            examples[i] = figure3_example(i, y[i], shown[i], e.probabilities[b], e.classes[b], e.responses[b],
                                          e.rgb[b], scale)
    rows = [(c, examples.get(good), examples.get(bad)) for c, good, bad in picks]
    return figure3_layout(rows, palette, net.class_names, scale, source, noun), rows


# ---- Table 1 ------------------------------------------------------------------------------------------

def table1(net: Network, pixels, labels, taus=(DEFAULT_TAU,), background: float = 0.0, preprocess=None,
           backend: str = "auto", batch_size: int = 16, progress=None, method: str = "deconvnet") -> list:
    """Table 1 (Section 4.3): accuracy on full images, on only their strong features, and without them.

    Strong features of an image are M = r(x|true) > tau * max r(x|true), r from :func:`clearmaps.explain`
    with only the true class (rectified, channels summed). "Only strong features" keeps M and fills the
    rest with ``background``; "without" fills M. The full images' predictions come from the explanation,
    the masked images' from :func:`classify`.

    Parameters
    ----------
    net : Network
    pixels, labels : float array (B, C, H, W) in [0, 1], int array (B,)
        The labelled set: images before ``preprocess`` and their true class ids.
    taus : sequence of float in [0, 1)
        Thresholds, each a fraction of the image's strongest response; one row each.
    background : float in [0, 1]
        The fill, in pixel units before ``preprocess`` (0 = black as for MNIST, 0.5 = grey).
    preprocess : Preprocess, optional
        Turns pixels into network input (default: none).
    backend, batch_size : str, int
        Where the attentive responses are computed, and how many images per :func:`clearmaps.explain` call.
    progress : callable, optional
        Called with the number of images just explained, after each batch.
    method : str
        The response method of r(x|true) (:func:`clearmaps.explain`); the paper's is the deconvnet.

    Returns
    -------
    list of dict
        One row per tau with the keys of ``TABLE1_COLUMNS``: tau, n, the three accuracies in percent,
        strong_pixels_pct (the share of the images in M) and strong_on_bright_pct (the share of M on
        pixels brighter than 0.5).
    """
    from .explanation import explain

    p, y, pre, batch_size = _check_set(net, pixels, labels, preprocess, backend, batch_size)
    taus = [taus] if _is_number(taus) else list(taus)
    if not taus or not all(_is_number(t) and 0 <= t < 1 for t in taus):
        raise ClearmapsError(f"taus={taus!r}; expected one or more fractions of the strongest response, in [0, 1).")
    if not (_is_number(background) and 0 <= background <= 1):
        raise ClearmapsError(f"background={background!r}; expected pixel units in [0, 1] (0 = black, 0.5 = grey), "
                             "before preprocessing.")
    if progress is not None and not callable(progress):
        raise ClearmapsError(f"progress is {type(progress).__name__}; expected None or a callable taking a count.")
    x = pre.normalise(p)
    bg = pre.background(background, x.shape[1])
    n = len(y)
    r_true = np.zeros((n, *x.shape[2:]))
    full_pred = np.zeros(n, dtype=np.int64)
    for c in np.unique(y):  # explain takes one class list per batch: group the images by their true class
        idx = np.flatnonzero(y == c)
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            e = explain(net, x[b], classes=[int(c)], backend=backend, vmax=None, method=method)
            r_true[b] = np.asarray(e.responses)[:, 0]
            full_pred[b] = np.asarray(e.predicted)
            if progress is not None:
                progress(len(b))
    ink = p.max(axis=1) > BRIGHT
    rows = []
    for tau in taus:
        mask = strong_feature_mask(r_true, float(tau))
        only = classify(net, keep_strong(x.astype(np.float64), mask, bg))
        without = classify(net, remove_strong(x.astype(np.float64), mask, bg))
        rows.append({"tau": tau, "n": n, "full": 100 * float(np.mean(full_pred == y)),
                     "only_strong": 100 * float(np.mean(only == y)),
                     "without_strong": 100 * float(np.mean(without == y)),
                     "strong_pixels_pct": 100 * float(mask.mean()),
                     "strong_on_bright_pct": 100 * float((mask & ink).sum() / max(mask.sum(), 1))})
    return rows
