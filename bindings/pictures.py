"""One image's pictures, as the ``clearmaps`` command writes them and an Explanation shows itself: the CLEAR
map, its overlay on the image (at the image's own resolution), the heatmap and binary map for one class, a key
to every colour, and the panel that puts them side by side. Pillow only (no matplotlib: see
:mod:`clearmaps.plot` for figures).

Colours, one meaning each in a panel: class colours (the palette, :mod:`clearmaps.palettes`) appear only in
the CLEAR map, the overlay and the class legend; the heatmap and the binary map have no hue (the bone colour
map: solid = the class's response, hatched = another class's larger one, black = none), so nothing in them
reads as a class; black means "no response" in every picture.
"""

from __future__ import annotations

import base64
import html as html_module
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import interop, render
from .palettes import FOR, HEATMAP_COLORMAP, binary_rgb, colormap_table, hatch, heatmap_rgb
from .reference import ClearmapsError, palette_rgb

LEGEND_ALL_UP_TO = 24  # more chosen classes than this: the legend lists those that colour some pixel
GREY_TEXT = (70, 70, 70)


@dataclass(frozen=True)
class ImageView:
    """One image of an :class:`clearmaps.Explanation`, as NumPy arrays on the host."""

    clear: np.ndarray            # (h, w, 3) uint8
    classes: np.ndarray          # (K,) int64
    hues: np.ndarray             # (K,) float64
    names: tuple                 # the N class names
    probabilities: np.ndarray    # (N,)
    responses: np.ndarray | None  # (K, h, w)
    dominant_class: np.ndarray   # (h, w)
    dominant_response: np.ndarray  # (h, w)
    method: str = "deconvnet"

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def probability(self) -> float:
        return float(self.probabilities[self.predicted])


def view(e, i: int = 0) -> ImageView:
    """Image ``i`` of ``e`` on the host (a GPU array's few values are copied)."""
    from .explanation import _index

    i = _index(e, i)
    host = lambda a: None if a is None else np.asarray(interop.to_numpy(a[i:i + 1]))[0]  # noqa: E731
    return ImageView(clear=host(e.rgb), classes=host(e.classes).astype(np.int64), hues=e.class_hues(i),
                     names=tuple(str(n) for n in e.class_names), probabilities=host(e.probabilities),
                     responses=host(e.responses), dominant_class=host(e.dominant_class),
                     dominant_response=host(e.dominant_response), method=getattr(e, "method", "deconvnet"))


def reference_class(v: ImageView, true: int | None) -> tuple[int, int, str]:
    """The class the heatmap and binary map are drawn for: the true class when known and among the maps,
    else the prediction, else the first class shown. Returns (class id, its position in K, why)."""
    for cls, why in ((true, "true class"), (v.predicted, "predicted class")):
        hit = np.flatnonzero(v.classes == cls) if cls is not None else []
        if len(hit):
            return int(cls), int(hit[0]), why
    return int(v.classes[0]), 0, "first class shown"


# ---- images ---------------------------------------------------------------------------------------------

def display_rgb(image) -> tuple[np.ndarray, bool]:
    """Any image a user has (a PIL image; uint8 or float in [0, 1]; (H, W), (H, W, C) or (C, H, W) with C 1
    or 3) as uint8 (H, W, 3) to show, and whether it had to be rescaled (float values outside [0, 1], such as
    a normalised network input, are stretched to [0, 1] from their own minimum and maximum)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")), False
    a = np.asarray(interop.to_numpy(image))
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise ClearmapsError(f"image has shape {a.shape}; expected (H, W), (H, W, C) or (C, H, W) with C = 1 or 3.")
    a = a[..., :3]
    if a.dtype == np.uint8:
        rgb = a
        rescaled = False
    else:
        if a.dtype.kind not in "fiub":
            raise ClearmapsError(f"image has dtype {a.dtype}; expected uint8 or floats in [0, 1].")
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ClearmapsError("image holds NaN or Inf; expected uint8 or floats in [0, 1].")
        lo, hi = float(f.min()), float(f.max())
        rescaled = lo < 0 or hi > 1
        if rescaled:
            f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        rgb = np.floor(f * 255.0 + 0.5).astype(np.uint8)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.ascontiguousarray(rgb), rescaled


def resize_nearest(rgb: np.ndarray, size) -> np.ndarray:
    """uint8 (h, w, 3) → (H, W, 3) by nearest neighbour: every output pixel takes one map pixel's colour, so a
    class colour never blends into a colour that means another class."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.NEAREST))


def overlay_on(image_rgb: np.ndarray, clear: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """The CLEAR map over an image of any size (the user's own, not the network's): the map is brought to
    the image's size by nearest neighbour, then :func:`clearmaps.render.overlay`."""
    return render.overlay(image_rgb, resize_nearest(clear, image_rgb.shape[:2]), alpha)


def fit(rgb: np.ndarray, longest: int) -> np.ndarray:
    """Shrink a picture so that its longer side is at most ``longest`` (Lanczos; never enlarged)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= longest:
        return rgb
    f = longest / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                  Image.Resampling.LANCZOS))


# ---- keys -----------------------------------------------------------------------------------------------

def class_legend(v: ImageView, true: int | None = None, max_width: int = 900) -> Image.Image:
    """The class key of the CLEAR map and the overlay: each class's colour and name, the prediction and the
    true class said in words. With more than :data:`LEGEND_ALL_UP_TO` classes, only those that dominate some
    pixel (and the predicted and true ones)."""
    ids = [int(c) for c in v.classes]
    hues = list(v.hues)
    note = ""
    if len(ids) > LEGEND_ALL_UP_TO:
        shown = set(np.unique(v.dominant_class[v.dominant_response > 0]).tolist()) | {v.predicted}
        if true is not None:
            shown.add(int(true))
        keep = [k for k, c in enumerate(ids) if c in shown]
        note = f"  (the other {len(ids) - len(keep):,} classes explained colour no pixel)"
        ids, hues = [ids[k] for k in keep], [hues[k] for k in keep]

    def name(c):
        marks = [m for m, yes in (("predicted", c == v.predicted), ("true", c == true)) if yes]
        return render.label(v.names[c]) + (f" ({', '.join(marks)})" if marks else "")

    title = ("CLEAR map and overlay: colour = the class whose response is largest at the pixel, brightness = how "
             "large; black = no class responds." + note)
    return render.legend(palette_rgb(np.asarray(hues, dtype=np.float64)) if ids else np.zeros((0, 3), np.uint8),
                         [name(c) for c in ids], title=title, max_width=max_width)


def hatched_swatch(size: int = 12, scale: int = 8) -> Image.Image:
    """A swatch of the hatching that marks "another class" in the heatmap and the binary map."""
    a = np.zeros((size, size, 3), np.uint8)
    a[hatch(size, size, scale)] = FOR
    return Image.fromarray(a)


def _swatch_row(swatch: Image.Image, text: str) -> Image.Image:
    swatch = swatch.copy()
    ImageDraw.Draw(swatch).rectangle((0, 0, swatch.width - 1, swatch.height - 1), outline=(140, 140, 140))
    return render.hstack([swatch, render.text_block(text, None, 11, GREY_TEXT, align="left", pad=0)], gap=4,
                         valign="center")


def heatmap_key(class_name: str, width: int) -> Image.Image:
    """The heatmap's colour bar and marks, and what they mean."""
    bar = np.repeat(colormap_table()[None], 10, axis=0)
    bar = render.to_image(np.asarray(Image.fromarray(bar).resize((max(width, 60), 10), Image.Resampling.NEAREST)))
    ends = render.hstack([render.text_block("0", None, 11, GREY_TEXT, pad=0),
                          render.text_block("strongest", None, 11, GREY_TEXT, pad=0)],
                         gap=max(4, width - render.text_size("0strongest", 11)[0]))
    return render.vstack([bar, ends,
                          _swatch_row(Image.new("RGB", (12, 12), tuple(int(c) for c in colormap_table()[200])),
                                      f"solid: {class_name}'s response"),
                          _swatch_row(hatched_swatch(), "hatched: another class's,\nwhere it is larger"),
                          render.text_block(f"(colour map: {HEATMAP_COLORMAP})", None, 11, GREY_TEXT, pad=0)], gap=2)


def binary_key(class_name: str, threshold: float, width: int) -> Image.Image:
    """The binary map's three marks and what each means."""
    return render.vstack([_swatch_row(Image.new("RGB", (12, 12), FOR), f"{class_name} dominates"),
                          _swatch_row(hatched_swatch(), "another class dominates"),
                          _swatch_row(Image.new("RGB", (12, 12), (0, 0, 0)), f"neither (response <= "
                                                                              f"{threshold:g} x strongest)")],
                         gap=2)


# ---- the pictures and the panel -------------------------------------------------------------------------

@dataclass(frozen=True)
class Pictures:
    """Every picture of one image, uint8 RGB arrays (model resolution, except ``overlay``) and PIL keys."""

    input: np.ndarray     # the image as the network sees it, (h, w, 3)
    clear: np.ndarray
    overlay: np.ndarray   # at the resolution of the image it is drawn on
    heatmap: np.ndarray | None  # upscaled (see pictures)
    binary: np.ndarray | None
    legend: Image.Image
    ref: int
    ref_why: str
    input_note: str
    overlay_note: str


def pictures(v: ImageView, image_rgb: np.ndarray, true: int | None = None, binary_threshold: float = 0.1,
             original_rgb: np.ndarray | None = None, input_note: str = "as the network sees it",
             scale: int = 8) -> Pictures:
    """The pictures of one image: ``image_rgb`` is the image at the network's resolution (shown as the input),
    ``original_rgb`` the user's own image, any size, that the overlay is drawn on (default ``image_rgb``). The
    heatmap and the binary map come upscaled ``scale`` times (their hatching needs the room); the CLEAR map and
    the input at the network's resolution."""
    ref, pos, why = reference_class(v, true)
    heat = binary = None
    if v.responses is not None:
        heat = heatmap_rgb(v.responses[None], np.array([pos]), scale=scale)[0]
        binary = binary_rgb(v.responses[None], np.array([pos]), binary_threshold, scale=scale)[0]
    base = original_rgb if original_rgb is not None else image_rgb
    overlay = overlay_on(fit(base, render.MAX_PICTURE_SIDE), v.clear)
    note = f"on the image, {base.shape[0]}x{base.shape[1]}" if original_rgb is not None else "on the input"
    return Pictures(input=image_rgb, clear=v.clear, overlay=overlay, heatmap=heat, binary=binary,
                    legend=class_legend(v, true), ref=ref, ref_why=why, input_note=input_note, overlay_note=note)


def panel(v: ImageView, p: Pictures, scale: int, caption: str, binary_threshold: float = 0.1) -> Image.Image:
    """The panel: class legend, caption, then input | CLEAR map | overlay | heatmap | binary map, each with
    its title and, under the heatmap and the binary map, their keys."""
    up = lambda a: render.upscale(a, scale)  # noqa: E731
    cell_h, cell_w = p.clear.shape[0] * scale, p.clear.shape[1] * scale
    ref_name = render.label(v.names[p.ref], 24)
    overlay = p.overlay
    if overlay.shape[:2] != (cell_h, cell_w):  # shown at the tiles' height: smoothly shrunk, or kept crisp
        f = cell_h / overlay.shape[0]
        how = Image.Resampling.LANCZOS if f < 1 else Image.Resampling.NEAREST
        overlay = np.asarray(Image.fromarray(overlay).resize((max(1, round(overlay.shape[1] * f)), cell_h), how))
    w = max(cell_w, 150)

    def column(title, array, key=None):
        parts = [render.text_block(title, w, 12), render.to_image(array)]
        if key is not None:
            parts.append(key)
        return render.vstack(parts, gap=2, align="center")

    missing = render.placeholder(cell_w, cell_h, "no responses kept\n(keep_responses=False)")
    cols = [column(f"input ({p.input_note})", up(p.input)), column("CLEAR map", up(p.clear)),
            column(f"overlay ({p.overlay_note})", overlay)]
    why = p.ref_why.replace(" class", "")
    fitted = lambda a: resize_nearest(a, (cell_h, cell_w)) if a is not None else missing  # noqa: E731
    cols.append(column(f"heatmap: class {ref_name} ({why})", fitted(p.heatmap), heatmap_key(ref_name, w)))
    cols.append(column(f"binary map: class {ref_name}", fitted(p.binary), binary_key(ref_name, binary_threshold, w)))
    tiles = render.hstack(cols, gap=10)
    method = {"deconvnet": "the deconvnet (the paper's)", "guided": "guided backpropagation",
              "gradient": "the gradient", "input_x_gradient": "input x gradient"}.get(v.method, v.method)
    footer = (f"Responses by {method}. The heatmap and the binary map are drawn for one class, {ref_name}; the "
              f"binary map marks pixels whose largest response exceeds {binary_threshold:g} of the image's strongest.")
    body = [p.legend, render.text_block(caption, size=15, align="left", pad=1), tiles,
            render.text_block(footer, size=12, align="left", pad=1, colour=GREY_TEXT)]
    return render.pad(render.vstack(body, gap=6), 10)


def caption_of(v: ImageView, name: str | None, true: int | None) -> str:
    head = f"{render.label(name, 120)}: " if name else ""
    text = f"{head}predicted {render.label(v.names[v.predicted])} (p = {v.probability:.2f})"
    if true is None:
        return text + ", true class unknown"
    return text + f", true {render.label(v.names[true])}" + (" - correct" if true == v.predicted else
                                                           " - MISCLASSIFIED")


def panel_of(e, i: int = 0, image=None, true=None, binary_threshold: float = 0.1, scale: int | None = None,
             name: str | None = None) -> Image.Image:
    """The panel of image ``i`` of an Explanation (what ``clearmaps explain`` writes as panel.png).

    Parameters
    ----------
    image : optional
        The image to draw the overlay on, any size (e.g. the photo before it was resized for the network):
        a PIL image, or uint8 / float in [0, 1] as (H, W), (H, W, C) or (C, H, W). Default: the images given
        to explain (stretched to show when they were normalised).
    true : int or str, optional
        The true class (id or name): the caption says whether the prediction is right, and the heatmap and
        binary map are drawn for it (default: for the prediction).
    binary_threshold : float in [0, 1)
    scale : int, optional
        Screen pixels per map pixel (default: the longer side reaches 224).
    name : str, optional
        A name for the caption.
    """
    v = view(e, i)
    true = _true_id(true, v.names)
    h, w = v.clear.shape[:2]
    scale = render.auto_scale(h, w) if scale is None else render.check_scale(h, w, scale)
    if not isinstance(binary_threshold, (int, float)) or isinstance(binary_threshold, bool) or \
            not 0 <= binary_threshold < 1:
        raise ClearmapsError(f"binary_threshold={binary_threshold!r}; expected a fraction in [0, 1).")
    net_input, note = _network_input(e, i, (h, w))
    original = display_rgb(image)[0] if image is not None else None
    p = pictures(v, net_input, true, binary_threshold, original, note, scale)
    return panel(v, p, scale, caption_of(v, name, true), binary_threshold)


def _true_id(true, names) -> int | None:
    if true is None:
        return None
    if isinstance(true, str) and true in names:
        return names.index(true)
    if isinstance(true, (int, np.integer)) and not isinstance(true, bool) and 0 <= true < len(names):
        return int(true)
    raise ClearmapsError(f"true={true!r}; expected a class id 0 .. {len(names) - 1} or one of the class names.")


def _network_input(e, i: int, size) -> tuple[np.ndarray, str]:
    """Image ``i`` of the images given to explain, to show, and a note on how it is shown."""
    if getattr(e, "images", None) is None:
        return np.full((*size, 3), 225, np.uint8), "not kept: give image="
    x = e.images[i]
    rgb, rescaled = display_rgb(x)
    if rgb.shape[:2] != tuple(size):
        rgb = resize_nearest(rgb, size)
    return rgb, "the network's input, stretched to show" if rescaled else "as the network sees it"


# ---- notebooks ------------------------------------------------------------------------------------------

def summary(e) -> str:
    """A few lines about an Explanation: what it holds and how to look at it (its ``repr``)."""
    try:
        framework = type(e.rgb).__module__.split(".")[0]
        B, h, w = int(e.rgb.shape[0]), int(e.rgb.shape[1]), int(e.rgb.shape[2])
        K = int(e.classes.shape[1])
        probs = np.asarray(interop.to_numpy(e.probabilities[:6]), dtype=np.float64)
    except Exception:  # a half-built object: never let repr raise
        return "Explanation(...)"
    names = [str(n) for n in e.class_names]
    shown = ", ".join(f"{render.label(names[int(p.argmax())], 20)} (p = {p.max():.2f})" for p in probs)
    more = f", ... ({B - len(probs)} more)" if B > len(probs) else ""
    dtype = getattr(e.dominant_response, "dtype", "")
    return (f"Explanation of {B} image{'s' if B != 1 else ''}: {K} of {len(names)} classes each, {h}x{w} maps, "
            f"{framework} {dtype}, method {getattr(e, 'method', 'deconvnet')}\n"
            f"  predicted: {shown}{more}\n"
            "  e.plot(i) / e.show(i) draw image i; e.rgb holds the CLEAR maps, e.responses the response maps")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def html(e) -> str:
    """The notebook display: the summary and image 0's panel."""
    text = html_module.escape(summary(e))
    try:
        data = base64.b64encode(png_bytes(e.panel(0, scale=4))).decode("ascii")
    except ClearmapsError as exc:
        return f"<pre>{text}\n(no picture: {html_module.escape(str(exc))})</pre>"
    return (f"<div><pre>{text}</pre><img alt='image 0: input, CLEAR map, overlay, heatmap, binary map' "
            f"src='data:image/png;base64,{data}'/></div>")
