"""The public entry point: ``explain(net, x)`` → CLEAR maps and everything that goes with them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from . import interop
from .firstrun import compile_notice
from .palettes import resolve_palette
from .reference import REDUCTIONS, ClearmapsError, Network, check_method


@dataclass(frozen=True, eq=False, repr=False)
class Explanation:
    """CLEAR maps of a batch.

    Every array is of the images' framework (NumPy, torch, JAX or CuPy) and on their device.

    Attributes
    ----------
    responses : (B, K, H, W) float or None
        Attentive response r(x|c) of each chosen class (None when ``keep_responses=False``).
    classes : (B, K) int64
        The class ids of the K maps of each image (the same row for every image unless top-k was asked).
    dominant_class : (B, H, W) int64
        Class id dominating each pixel (Eq. 4).
    dominant_response : (B, H, W) float
        Its response (Eq. 5).
    rgb : (B, H, W, 3) uint8
        The CLEAR map (Eq. 6).
    logits, probabilities : (B, N)
        Global average of z_L, and its softmax.
    palette : (N,) or (K,) float64
        The hues: with ``palette_by == "class"`` (the default) class c is drawn in hue palette[c], whatever
        was chosen; with "position", classes[b, k] is drawn in hue palette[k] (a K-hue palette was given).
        :meth:`class_hues` gives one image's.
    class_names : tuple of str
        The network's N class names.
    palette_by : "class" or "position"
    images : the ``x`` given to :func:`explain`, or None
        A reference to the images (not a copy), for :meth:`plot` and the notebook display.
    method : str
        The response method.

    In a notebook an Explanation shows itself as a picture of its first image; ``e.plot(i)`` is a matplotlib
    figure of image i (``pip install "clearmaps[plot]"``) and ``e.panel(i)`` the same picture the
    ``clearmaps`` command writes (Pillow).
    """

    responses: np.ndarray | None
    classes: np.ndarray
    dominant_class: np.ndarray
    dominant_response: np.ndarray
    rgb: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    palette: np.ndarray
    class_names: tuple
    palette_by: str = "class"
    images: object = None
    method: str = "deconvnet"

    @property
    def predicted(self):
        """Predicted class id of each image, (B,), in the logits' framework."""
        logits = self.logits if hasattr(self.logits, "argmax") else np.asarray(self.logits)
        return logits.argmax(axis=1)

    def __len__(self) -> int:
        return int(self.rgb.shape[0])

    def class_hues(self, i: int = 0) -> np.ndarray:
        """The hues (K,) of image ``i``'s K classes, in the order of ``classes[i]`` (float64, NumPy)."""
        from .palettes import hues_of

        i = _index(self, i)
        return hues_of(interop.to_numpy(self.palette), self.palette_by, interop.to_numpy(self.classes)[i])

    def __repr__(self) -> str:
        from .pictures import summary

        return summary(self)

    def plot(self, i: int = 0, **options):
        """Image ``i`` as a matplotlib figure: input, CLEAR map with its legend, overlay, heatmap (and with
        ``binary=True`` the binary map). See :func:`clearmaps.plot.plot` for the options; save it with
        ``fig.savefig("x.png")`` (or .pdf, .svg)."""
        from .plot import plot

        return plot(self, i, **options)

    def show(self, i: int = 0, **options) -> None:
        """Draw :meth:`plot` of image ``i``: inline in a notebook, in a window otherwise."""
        from .plot import show

        show(self, i, **options)

    def panel(self, i: int = 0, **options):
        """Image ``i``'s panel as a PIL image: the picture ``clearmaps explain`` writes as panel.png (legend,
        input, CLEAR map, overlay, heatmap, binary map, and a key to every colour). Needs no matplotlib. See
        :func:`clearmaps.pictures.panel` for the options."""
        from .pictures import panel_of

        return panel_of(self, i, **options)

    def _repr_png_(self) -> bytes:
        from .pictures import png_bytes

        return png_bytes(self.panel(0, scale=4))

    def _repr_html_(self) -> str:
        from .pictures import html

        return html(self)


def _index(e: Explanation, i) -> int:
    n = int(e.rgb.shape[0])
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
        raise ClearmapsError(f"i={i!r}; the explanation holds {n} image(s): give an index 0 .. {n - 1}.")
    return int(i) % n


_TOP_K = re.compile(r"^top-?(\d+)$", re.IGNORECASE)


def resolve_classes(classes, net: Network, logits: np.ndarray) -> np.ndarray:
    """Turn the user's ``classes`` into class ids (B, K).

    None → all N classes; "topK" / "top-K" → each image's K largest logits, largest first; an int, a name,
    or a list of ids and/or names → those classes in that order, for every image; an int array (B, K) →
    each image's own K classes.
    """
    B, N = logits.shape
    if classes is None:
        return np.broadcast_to(np.arange(N, dtype=np.int64), (B, N))
    if isinstance(classes, str) and _TOP_K.match(classes.strip()):
        k = int(_TOP_K.match(classes.strip()).group(1))
        if not 1 <= k <= N:
            raise ClearmapsError(f"classes={classes!r} asks for the top {k}; the network has {N} classes "
                                 f"(use 1 .. {N}).")
        # stable sort of -logits: equal logits keep the lower class id first
        return np.argsort(-np.asarray(logits, dtype=np.float64), axis=1, kind="stable")[:, :k].astype(np.int64)
    if isinstance(classes, np.ndarray) and classes.ndim == 2:
        # per-image class ids (B, K), as Explanation.classes gives them back
        if classes.shape[0] != B or classes.dtype.kind not in "iu":
            raise ClearmapsError(f"classes has shape {classes.shape} and dtype {classes.dtype}; a 2-D classes "
                                 f"array holds integer class ids, one row per image: shape ({B}, K).")
        rows = [resolve_classes(list(row), net, logits[b:b + 1])[0] for b, row in enumerate(classes)]
        return np.stack(rows)
    if isinstance(classes, (set, frozenset, dict)):
        raise ClearmapsError(f"classes is a {type(classes).__name__}; give a list or tuple: the order of the classes "
                             "decides their hues, and a set has none.")
    if isinstance(classes, (float, np.floating)):
        raise ClearmapsError(f"classes={classes!r}; expected class ids (ints), names, a list of them, None or "
                             "'top5'.")
    if isinstance(classes, np.ndarray) and classes.ndim > 2:
        raise ClearmapsError(f"classes has shape {classes.shape}; expected (K,) or (B, K).")
    if not isinstance(classes, (str, int, np.integer, np.ndarray, list, tuple, range)):
        raise ClearmapsError(f"classes is a {type(classes).__name__}; expected class ids (ints), names, a list of "
                             "them, None or 'top5'.")
    items = [classes] if isinstance(classes, (str, int, np.integer)) else \
        list(classes.ravel()) if isinstance(classes, np.ndarray) else list(classes)
    if not items:
        raise ClearmapsError("classes is empty; give at least one class id or name, None for all, or 'top5'.")
    ids = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise ClearmapsError(f"classes holds {item!r}; expected class ids (ints) or names.")
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < N:
                raise ClearmapsError(f"class id {int(item)} is out of range; the network has classes 0 .. {N - 1}.")
            ids.append(int(item))
        elif isinstance(item, str):
            if item not in net.class_names:
                raise ClearmapsError(f"unknown class name {item!r}; the network's classes are "
                                     f"{list(net.class_names)}.")
            ids.append(net.class_names.index(item))
        else:
            raise ClearmapsError(f"classes holds {item!r} ({type(item).__name__}); expected class ids or names.")
    if len(set(ids)) != len(ids):
        raise ClearmapsError(f"classes {items} name a class twice; each class may appear once.")
    return np.broadcast_to(np.asarray(ids, dtype=np.int64), (B, len(ids)))


def explain(net: Network, x, classes=None, backend: str = "auto", rectify: bool = True,
            reduce: str = "sum", palette=None, vmax=None, keep_responses: bool = True,
            method: str = "deconvnet") -> Explanation:
    """CLEAR maps of a batch of images, returned in the images' framework and on their device.

    Parameters
    ----------
    net : Network
        The classifier (see :func:`clearmaps.from_torch` and :func:`clearmaps.load_checkpoint`).
    x : float array (B, C, H, W)
        Images, preprocessed as the network was trained: a NumPy array, a torch tensor (CPU or CUDA), a JAX
        array or a CuPy array. It reaches the backend through DLPack without a copy; a non-contiguous array is
        copied once, with a :class:`clearmaps.interop.CopyWarning`; other dtypes (half precision, integers)
        and tensors that require grad are refused (see :mod:`clearmaps.interop`).
    classes : None, "topK", int, str, or a list (or 1-D array) of ids and names
        Which classes get maps (None: all).
    backend : "auto" (default), "reference", "cpu" or "cuda"
        "auto" follows ``x``: the CUDA kernels for GPU arrays, the Numba CPU kernels for host arrays.
        "reference" is the float64 NumPy oracle (slow on purpose), "cpu" the Numba kernels, "cuda" the GPU.
    rectify : bool
        Rectify at every ReLU on the way back (the deconvnet; default). False gives Eq. 2 literally
        (method "deconvnet" only).
    reduce : "sum", "max" or "norm"
        How R(x|c) is reduced over the input channels to one map per class.
    palette : None, "hues", "colorblind", or hues in [0, 1]
        The colour of each class (Eq. 6's F), fixed by class id: "hues" (default) gives class c of N the
        hue c/N; "colorblind" keeps every pair of classes apart for colour-blind readers (N <= 10; see
        :mod:`clearmaps.palettes`); N hues give each class id its own. K hues (K < N) colour the chosen
        classes by their position in ``classes`` instead (with "topK": by rank).
    vmax : None, a number, "batch" or "pNN"
        How the dominant response is normalised to brightness (default: each image's maximum).
    keep_responses : bool
        False skips storing the (B, K, H, W) maps (fast backends then never materialise them).
    method : "deconvnet" (default), "guided", "gradient" or "input_x_gradient" ("input×gradient")
        The class-specific response in input space that feeds Eqs. 4–6 (docs/design.md, "Response
        methods"): the paper's deconvnet (rectify at every ReLU on the way back), guided backpropagation
        (rectify and keep only where the forward ReLU was open), the plain gradient of E_c (signed), or the
        gradient times the image (signed). All start from the same seed, E_c = ½·Σ z_L[c]².

    Returns
    -------
    Explanation
        Its arrays are of ``x``'s framework, on ``x``'s device (NumPy for lists), sharing the memory the
        backend wrote; float arrays have the backend's dtype (the reference: float64; cpu, cuda: float32).
    """
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network: convert a torch "
                             "module with clearmaps.from_torch(module) or load one with clearmaps.load_checkpoint.")
    method = check_options(reduce, rectify, method, keep_responses)
    caller = interop.caller_of(x, "x", classes=classes, palette=palette)
    impl = interop.backend_for(backend, caller)
    check_support(net, impl, method)
    x = caller.conform(x)
    with caller.computing(), compile_notice(impl):
        images = interop.check_images(net, caller.to_backend(x))  # a view of x: NumPy on the host, CuPy on a GPU
        chunk = _images_per_chunk(net, images, classes, impl)
        if chunk >= images.shape[0]:
            trace = _forward(impl, net, images, method)
            return explain_from_trace(net, trace, impl, caller, classes=classes, rectify=rectify, reduce=reduce,
                                      palette=palette, vmax=vmax, keep_responses=keep_responses, method=method,
                                      images=x)
        out = _explain_in_chunks(net, images, impl, caller, chunk, classes, rectify, reduce, palette, vmax,
                                 keep_responses, method)
        return replace(out, images=x)  # the caller's images, for plot(): a reference, not a copy


def _forward(impl, net, images, method):
    return impl.forward(net, images) if method == "deconvnet" else impl.forward(net, images, method=method)


# host backends hold a batch's activations and signals in memory at once: explain splits the images into
# chunks whose working set stays under this, so peak memory is flat in the batch size (the results, a few
# bytes per pixel, grow with it of course); the CUDA backend plans its own memory (set_memory_limit)
CHUNK_BYTES = 256 << 20


def _images_per_chunk(net, images, classes, impl) -> int:
    B = images.shape[0]
    if getattr(impl, "__name__", "") not in ("clearmaps.reference", "clearmaps.kernels.cpu") or B == 1:
        return B
    shapes = net.shapes(tuple(images.shape[2:]))
    sizes = [int(np.prod(s)) for s in shapes]
    if classes is None or isinstance(classes, str):
        K = net.num_classes
    else:
        K = max(1, np.size(interop.small_to_host(classes, "classes")))
    itemsize = 8 if impl.__name__ == "clearmaps.reference" else 4
    # forward values and what they keep, plus three signals of the largest node per class on the way back
    per_image = itemsize * (2 * sum(sizes) + 3 * K * max(sizes))
    return max(1, min(B, CHUNK_BYTES // max(per_image, 1)))


def _explain_in_chunks(net, images, impl, caller, chunk, classes, rectify, reduce, palette, vmax, keep_responses,
                       method) -> Explanation:
    """explain over chunks of ``chunk`` images, joined. vmax="batch" needs the whole batch's maximum, so the
    colours are then composed once at the end from the joined dominant classes and responses."""
    parts = []
    whole_batch = isinstance(vmax, str) and vmax == "batch"
    for s in range(0, images.shape[0], chunk):
        trace = _forward(impl, net, images[s:s + chunk], method)
        parts.append(explain_from_trace(net, trace, impl, interop.Caller("numpy", False), classes=_rows(classes, s, chunk),
                                        rectify=rectify, reduce=reduce, palette=palette,
                                        vmax=None if whole_batch else vmax, keep_responses=keep_responses,
                                        method=method))
    join = lambda name: None if getattr(parts[0], name) is None else np.concatenate(  # noqa: E731
        [np.asarray(getattr(p, name)) for p in parts])
    positions = np.concatenate([np.asarray(p.dominant_class) for p in parts])
    rgb = join("rgb")
    if whole_batch and parts[0].palette_by == "class":  # hues by class id: compose with the ids themselves
        rgb = impl.compose(positions, join("dominant_response"), parts[0].palette, vmax,
                           num_classes=len(parts[0].palette))
    elif whole_batch:
        ids = join("classes")
        index = np.argmax(positions[:, None] == ids[:, :, None, None], axis=1)  # class id -> its position
        rgb = impl.compose(index, join("dominant_response"), parts[0].palette, vmax, num_classes=ids.shape[1])
    to_caller = caller.to_caller
    return Explanation(responses=to_caller(join("responses")), classes=to_caller(join("classes")),
                       dominant_class=to_caller(positions), dominant_response=to_caller(join("dominant_response")),
                       rgb=to_caller(rgb), logits=to_caller(join("logits")),
                       probabilities=to_caller(join("probabilities")), palette=to_caller(np.asarray(parts[0].palette)),
                       class_names=net.class_names, palette_by=parts[0].palette_by, method=method)


def _rows(classes, start, chunk):
    """The part of a per-image (B, K) classes array that belongs to one chunk; anything else applies to all."""
    if isinstance(classes, np.ndarray) and classes.ndim == 2:
        return classes[start:start + chunk]
    return classes


def check_options(reduce, rectify, method="deconvnet", keep_responses=True) -> str:
    """Refuse a ``reduce``, ``rectify``, ``method`` or ``keep_responses`` that :func:`explain` does not know;
    returns the method's canonical name."""
    if not isinstance(reduce, str) or reduce not in REDUCTIONS:  # an array would compare elementwise
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    if not isinstance(keep_responses, (bool, np.bool_)):
        raise ClearmapsError(f"keep_responses={keep_responses!r}; expected True or False.")
    return check_method(method, rectify)[0]


def check_support(net: Network, impl, method: str = "deconvnet") -> None:
    """Refuse what a backend does not compute rather than let it misread it. Every backend now computes every
    network and every response method (docs/design.md, "Backends and their contract": the CUDA backend runs
    graphs and methods other than the paper's deconvnet on its graph path), so nothing is refused here; the
    hook stays for a backend that will not."""
    return None


def check_finite(impl, logits, out) -> None:
    """Refuse results that overflowed: a float32 backend reaches Inf where the float64 reference does not
    (images of |x| ~ 1e36 through a few layers), and would otherwise return Inf responses and an all-black
    map, or NaN logits, without a word. Checked where the arrays live (first_nonfinite uses their own
    operators, so GPU results are not copied)."""
    from .reference.errors import first_nonfinite

    for what, a in (("logits", logits), ("dominant responses", out.dominant_response),
                    ("responses", out.responses)):
        if a is not None and first_nonfinite(a) is not None:
            name = getattr(impl, "__name__", "backend").rsplit(".", 1)[-1]
            raise ClearmapsError(f"the {name} backend overflowed: its {what} are not finite (first at index "
                                 f"{first_nonfinite(a)}); float32 holds values up to 3.4e38. Preprocess the images "
                                 "as in training (values near 1), or use backend='reference' (float64).")


def explain_from_trace(net: Network, trace, impl, caller, classes=None, rectify=True, reduce="sum",
                       palette=None, vmax=None, keep_responses=True, method="deconvnet", images=None) -> Explanation:
    """Everything of :func:`explain` after the forward pass (shared with :func:`clearmaps.torch.explain`,
    whose forward pass torch runs): resolve the classes, run the backend's ``clear_from_trace``, and hand
    the results back in ``caller``'s framework. ``images`` is kept in the Explanation as it is."""
    method = check_options(reduce, rectify, method, keep_responses)
    check_support(net, impl, method)
    # class names, top-k and the palette are decided on the host: a few values
    ids = resolve_classes(interop.small_to_host(classes, "classes"), net, interop.to_numpy(trace.logits))
    same_rows = bool((ids == ids[:1]).all())
    table, by = resolve_palette(interop.small_to_host(palette, "palette"), net.num_classes, ids.shape[1], same_rows)
    # a backend composes by position (docs/design.md, "Backends and their contract"): when every image has the
    # same classes, the hues of those positions are the classes' own; otherwise (top-k) the composite is
    # composed again below from the dominant class ids and the N-hue table
    hues = table[ids[0]] if by == "class" else table
    options = {} if method == "deconvnet" else {"method": method}
    with compile_notice(impl):
        out = impl.clear_from_trace(net, trace, ids, rectify=rectify, reduce=reduce, palette=hues, vmax=vmax,
                                    keep_responses=keep_responses, **options)
        check_finite(impl, trace.logits, out)
        index = out.dominant_index
        xp = interop.array_module(index)
        class_ids = xp.asarray(np.ascontiguousarray(ids))
        dominant = class_ids[xp.arange(ids.shape[0])[:, None, None], index]
        rgb = out.rgb if by == "position" or same_rows else \
            impl.compose(dominant, out.dominant_response, table, vmax, num_classes=net.num_classes)
    to_caller = caller.to_caller
    return Explanation(
        responses=to_caller(out.responses),
        classes=to_caller(class_ids),
        dominant_class=to_caller(dominant),
        dominant_response=to_caller(out.dominant_response),
        rgb=to_caller(rgb),
        logits=to_caller(trace.logits),
        probabilities=to_caller(trace.probabilities),
        palette=to_caller(table),
        class_names=net.class_names,
        palette_by=by,
        images=images,
        method=method,
    )
