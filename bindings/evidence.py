"""Evidence for each response method: does its CLEAR map speak for the class, and does it explain the model?

The paper's CLEAR needs "class-specific responses computed in input space" and the deconvnet's are known to
reconstruct the image more than the class (Nie et al. 2018; Adebayo et al. 2018). Three measures, per method,
on a labelled set:

true_class_share   the fraction of a map's dominant response (its positive part, Eq. 5) lying on pixels whose
                   dominant class (Eq. 4) is the true class: 1 when the map speaks only for the true class.
                   Reported for correctly classified and misclassified images apart.
randomisation      Adebayo et al.'s cascading model randomisation: the weights re-drawn layer by layer from
                   the top down, and the Spearman rank correlation between each image's true-class map on the
                   trained model and on the randomised one. A method whose maps stay put when the model is
                   destroyed is not explaining the model (high correlation = fails the check).
table1             the paper's Table 1 (accuracy on full images, on only their strong features and without
                   them), with the method's r(x|true) choosing the strong features.

:func:`evaluate_methods` runs all three for each method; ``clearmaps evaluate --method all`` prints and writes
its table.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .reference import METHODS, ClearmapsError, Network, check_input, check_method


def _check_set(net, x, labels):
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    x = check_input(net, x)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= net.num_classes)):
        raise ClearmapsError(f"labels must be {x.shape[0]} class ids in 0 .. {net.num_classes - 1}, one per image; got "
                             f"shape {y.shape} and dtype {y.dtype}.")
    return x, y.astype(np.int64)


def _batches(n, size):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def true_class_share(net: Network, x, labels, method: str = "deconvnet", backend: str = "auto",
                     batch_size: int = 64) -> dict:
    """Per image: the share of the CLEAR map's positive dominant response on pixels whose dominant class is
    the true class (all classes compete, as in the default map).

    Returns
    -------
    dict
        ``share`` float (B,) (NaN where the map has no positive response), ``correct`` bool (B,), and the
        means ``correct_mean`` / ``misclassified_mean`` over the images of each kind that have a map.
    """
    from .explanation import explain

    x, y = _check_set(net, x, labels)
    method, _ = check_method(method)
    share = np.full(len(y), np.nan)
    correct = np.zeros(len(y), dtype=bool)
    for sl in _batches(len(y), batch_size):
        e = explain(net, x[sl], backend=backend, method=method, keep_responses=False)
        d = np.maximum(np.asarray(e.dominant_response, dtype=np.float64), 0)
        on_true = np.asarray(e.dominant_class) == y[sl, None, None]
        total = d.sum(axis=(1, 2))
        share[sl] = np.where(total > 0, (d * on_true).sum(axis=(1, 2)) / np.where(total > 0, total, 1), np.nan)
        correct[sl] = np.asarray(e.predicted) == y[sl]
    mean = lambda m: float(np.nanmean(share[m])) if np.isfinite(share[m]).any() else float("nan")  # noqa: E731
    return {"share": share, "correct": correct, "correct_mean": mean(correct), "misclassified_mean": mean(~correct)}


def _ranks(a):
    """Average ranks along the last axis (ties share the mean of their ranks), float64."""
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=-1)
    ranks = np.empty(a.shape, dtype=np.float64)
    for row in range(a.shape[0]):
        v = sorted_a[row]
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        ends = np.r_[starts[1:], v.size]
        avg = (starts + ends - 1) / 2.0
        ranks[row, order[row]] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a, b) -> np.ndarray:
    """Spearman's rank correlation of each row of a and b (N, M), ties given their average rank (NaN where
    a row is constant)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def _weighted_nodes(net: Network):
    """Nodes with learned weights (Conv, Linear), from the output back to the input: the cascade's order."""
    return [i for i in range(len(net.layers) - 1, -1, -1) if type(net.layers[i]).__name__ in ("Conv", "Linear")]


def randomised(net: Network, count: int, seed: int = 0) -> Network:
    """``net`` with its top ``count`` weighted layers re-drawn (Gaussian weights with each layer's own standard
    deviation, zero biases), Adebayo et al.'s cascading randomisation."""
    rng = np.random.default_rng(seed)
    layers = list(net.layers)
    for i in _weighted_nodes(net)[:count]:
        layer = layers[i]
        w = np.asarray(layer.weight)
        bias = None if layer.bias is None else np.zeros_like(np.asarray(layer.bias))
        layers[i] = dataclasses.replace(layer, weight=rng.normal(0, max(float(w.std()), 1e-12), w.shape), bias=bias)
    return Network(layers, net.class_names, net.input_shape, net.inputs, net.names)


def randomisation(net: Network, x, labels, method: str = "deconvnet", backend: str = "auto",
                  batch_size: int = 64, seed: int = 0) -> list:
    """Adebayo et al.'s cascading randomisation check: for k = 1 .. (weighted layers), the mean over images of
    the Spearman correlation between |r(x|true)| on the trained model and on the model with its top k weighted
    layers re-drawn (and of the signed maps). Returns one dict per step: layers, spearman_abs, spearman."""
    from .explanation import explain

    x, y = _check_set(net, x, labels)
    method, _ = check_method(method)

    def maps(model):
        out = np.empty((len(y), x.shape[2] * x.shape[3]))
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            for sl in _batches(len(idx), batch_size):
                e = explain(model, x[idx[sl]], classes=[int(c)], backend=backend, method=method)
                out[idx[sl]] = np.asarray(e.responses, dtype=np.float64)[:, 0].reshape(len(idx[sl]), -1)
        return out

    trained = maps(net)
    rows = []
    for k in range(1, len(_weighted_nodes(net)) + 1):
        other = maps(randomised(net, k, seed))
        rows.append({"layers": k, "spearman_abs": float(np.nanmean(spearman(np.abs(trained), np.abs(other)))),
                     "spearman": float(np.nanmean(spearman(trained, other)))})
    return rows


def evaluate_methods(net: Network, pixels, labels, methods=METHODS, preprocess=None, backend: str = "auto",
                     tau: float = 0.1, background: float = 0.0, sanity_images: int = 100, batch_size: int = 64,
                     progress=None) -> list:
    """Every measure of this module for each method: one dict per method with Table 1's accuracies (full /
    only strong / without strong, at ``tau``), the true-class share (correct / misclassified), the
    randomisation check's Spearman correlations (after the top layer, and after all layers, on the first
    ``sanity_images`` images, evenly spaced) and the seconds the method's maps took per image here."""
    from . import paper
    from .images import Preprocess

    pre = preprocess or Preprocess()
    methods = [check_method(m)[0] for m in ([methods] if isinstance(methods, str) else methods)]
    if not methods:
        raise ClearmapsError("methods is empty; give one or more of " + ", ".join(METHODS) + ".")
    x = pre.normalise(np.asarray(pixels))
    x, y = _check_set(net, x, labels)
    pick = np.unique(np.linspace(0, len(y) - 1, min(sanity_images, len(y))).round().astype(int))
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        share = true_class_share(net, x, y, method, backend, batch_size)
        seconds = (time.perf_counter() - t0) / len(y)
        t1 = paper.table1(net, pixels, labels, taus=[tau], background=background, preprocess=pre, backend=backend,
                          batch_size=batch_size, method=method)[0]
        sanity = randomisation(net, x[pick], y[pick], method, backend, batch_size)
        rows.append({"method": method, "full": t1["full"], "only_strong": t1["only_strong"],
                     "without_strong": t1["without_strong"], "strong_pixels_pct": t1["strong_pixels_pct"],
                     "share_correct": share["correct_mean"], "share_misclassified": share["misclassified_mean"],
                     "spearman_top_layer": sanity[0]["spearman_abs"], "spearman_all_layers": sanity[-1]["spearman_abs"],
                     "randomisation": sanity, "ms_per_image": 1000 * seconds, "n": int(len(y))})
        if progress is not None:
            progress(method)
    return rows
