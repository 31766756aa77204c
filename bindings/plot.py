"""Explanations as matplotlib figures, for notebooks and papers (``pip install "clearmaps[plot]"``).

    e = clearmaps.explain(net, x)
    fig = e.plot(0)                 # input, CLEAR map with its class legend, overlay, heatmap with its colour bar
    fig.savefig("digit.pdf")        # or .png, .svg: the figure is a plain matplotlib Figure
    e.show(0)                       # inline in a notebook, a window elsewhere

The pictures are the arrays of :mod:`clearmaps.pictures` (the same bytes the ``clearmaps`` command writes);
matplotlib only lays them out, draws the legend, the heatmap's colour bar (the managua colour map, from the
same table) and the titles.
"""

from __future__ import annotations

import numpy as np

from . import pictures
from .palettes import HEATMAP_COLORMAP, colormap_table
from .reference import ClearmapsError, palette_rgb

LEGEND_COLUMNS = 10


def _matplotlib():
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ClearmapsError("plotting needs matplotlib: pip install \"clearmaps[plot]\" (or matplotlib >= 3.7). "
                             "Without it, e.panel(i) draws the same picture with Pillow.") from None
    return matplotlib


def plot(e, i: int = 0, image=None, true=None, binary: bool = False, binary_threshold: float = 0.1, fig=None,
         figsize=None, title: str | None = None):
    """Image ``i`` of an Explanation as a matplotlib figure.

    Parameters
    ----------
    e : Explanation
    i : int
        Which image of the batch.
    image : optional
        The image to draw the overlay on, at its own resolution (e.g. the photo before it was resized for the
        network): a PIL image, or uint8 / float in [0, 1] as (H, W), (H, W, C) or (C, H, W). Default: the
        images given to explain (stretched to show when they were normalised).
    true : int or str, optional
        The true class: named in the title, and the heatmap is drawn for it (default: for the prediction).
    binary : bool
        Also draw the binary map (for / against the class, above ``binary_threshold`` of the strongest).
    fig : matplotlib Figure, optional
        Draw into this figure (it is cleared); default a new ``matplotlib.figure.Figure``, which a notebook
        shows when it is the cell's value and which needs no pyplot.
    figsize : (width, height) in inches, optional
    title : str, optional
        Default: the prediction, its probability and the true class when given.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _matplotlib()
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    v = pictures.view(e, i)
    true = pictures._true_id(true, v.names)
    if not isinstance(binary_threshold, (int, float)) or isinstance(binary_threshold, bool) or \
            not 0 <= binary_threshold < 1:
        raise ClearmapsError(f"binary_threshold={binary_threshold!r}; expected a fraction in [0, 1).")
    net_input, note = pictures._network_input(e, i, v.clear.shape[:2])
    original = pictures.display_rgb(image)[0] if image is not None else None
    p = pictures.pictures(v, net_input, true, binary_threshold, original, note)
    ref_name = str(v.names[p.ref])
    panels = [(f"input\n({p.input_note})", p.input), ("CLEAR map", p.clear), (f"overlay\n({p.overlay_note})",
                                                                               p.overlay)]
    if p.heatmap is not None:
        panels.append((f"heatmap: class {ref_name}\n({p.ref_why})", p.heatmap))
        if binary:
            panels.append((f"binary map: class {ref_name}", p.binary))
    n = len(panels)
    size = figsize or (2.5 * n + 0.3, 4.9)
    if fig is None:
        fig = Figure(figsize=size)
    else:
        fig.clear()
        fig.set_size_inches(*size)
    # a fixed layout: titles above, the keys below each panel, the class legend at the bottom
    fig.subplots_adjust(left=0.02, right=0.98, top=0.82, bottom=0.36, wspace=0.12)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (name, array) in zip(axes, panels):
        ax.imshow(array, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if p.heatmap is not None:
        cmap = ListedColormap(colormap_table() / 255.0, name=HEATMAP_COLORMAP)
        cax = axes[3].inset_axes([0.0, -0.09, 1.0, 0.05])
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax, orientation="horizontal",
                           ticks=[0, 1])
        zero, strongest = bar.ax.set_xticklabels(["0", "strongest"], fontsize=7)
        zero.set_horizontalalignment("left")
        strongest.set_horizontalalignment("right")  # inside the bar's width: the last panel has no room beyond
        bar.set_label(f"colour map: {HEATMAP_COLORMAP}", fontsize=7, labelpad=1)
        solid = tuple(colormap_table()[200] / 255.0)
        marks = [Patch(facecolor=solid, edgecolor="0.4", label=f"solid: {ref_name}'s response"),
                 Patch(facecolor="black", edgecolor="white", hatch="////", label="hatched: another class's, where\n"
                                                                                  "it is larger")]
        axes[3].legend(handles=marks, loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=7, frameon=False)
        if binary:
            marks = [Patch(facecolor="white", edgecolor="0.4", label=f"{ref_name} dominates"),
                     Patch(facecolor="black", edgecolor="white", hatch="////", label="another class dominates"),
                     Patch(facecolor="black", edgecolor="0.4",
                           label=f"neither (<= {binary_threshold:g} x strongest)")]
            axes[4].legend(handles=marks, loc="upper center", bbox_to_anchor=(0.5, -0.03), fontsize=7, frameon=False)
    _class_legend(fig, v, true, Patch)
    fig.suptitle(title if title is not None else pictures.caption_of(v, None, true), fontsize=11, y=0.98)
    return fig


def _class_legend(fig, v, true, Patch) -> None:
    """The class key under the panels: the colours of the image's classes (those that colour a pixel when
    there are many), the predicted and true classes said in words."""
    ids, hues = [int(c) for c in v.classes], list(v.hues)
    if len(ids) > pictures.LEGEND_ALL_UP_TO:
        shown = set(np.unique(v.dominant_class[v.dominant_response > 0]).tolist()) | {v.predicted}
        shown |= {true} if true is not None else set()
        keep = [k for k, c in enumerate(ids) if c in shown]
        ids, hues = [ids[k] for k in keep], [hues[k] for k in keep]
    colours = palette_rgb(np.asarray(hues, dtype=np.float64)) / 255.0 if ids else []
    handles = []
    for c, colour in zip(ids, colours):
        marks = [m for m, yes in (("predicted", c == v.predicted), ("true", c == true)) if yes]
        handles.append(Patch(facecolor=colour, edgecolor="0.4",
                             label=str(v.names[c])[:40] + (f" ({', '.join(marks)})" if marks else "")))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), LEGEND_COLUMNS), fontsize=8,
                   title="CLEAR map and overlay: colour = the class with the largest response, brightness = how "
                         "large, black = none", title_fontsize=8, frameon=False)


def show(e, i: int = 0, **options) -> None:
    """Draw :func:`plot` of image ``i`` with pyplot: inline in a notebook, in a window elsewhere."""
    _matplotlib()
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plot(e, i, fig=fig, **options)
    plt.show()
