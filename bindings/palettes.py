"""The colours of clearmaps' pictures: the class palettes of the CLEAR map and the colour map of the heatmap
and the binary map. NumPy only.

Class palettes (Eq. 6's F: one hue per class, S = 1, V = the dominant response):

- ``"hues"`` (the default): class c of N gets hue c/N (docs/design.md, "Dominant class and composition").
- ``"colorblind"``: for N <= 10 classes, N hues chosen so that every pair of classes stays apart for
  readers with a red-green or blue-yellow colour vision deficiency: the smallest CIEDE2000 difference
  between two classes' colours, at full and at 60% brightness, in normal vision and in simulated
  protanopia, deuteranopia and tritanopia (Machado, Oliveira & Fernandes 2009, severity 1), is 56 for 2
  classes, 29 for 4, 13.5 for 6, 11.2 for 8 and 8.2 for 10. Evenly spaced hues fall to 1.0 at 10 classes
  (tritanopia) and 1.8 (protanopia): two classes of the default palette then look alike to those readers.
  Found by search over 720 hues (:data:`COLORBLIND_720`).
- N hues in [0, 1], one per class id; or K hues, one per chosen class in the order of ``classes`` (with
  ``"topK"``: by rank, so that a colour then means a rank, not a class).

Every class keeps its hue whatever else is chosen: with ``classes="top3"`` the image whose top class is 7
draws 7 in class 7's hue, never in "the first rank's" hue (unless K hues are given).

The heatmap and the binary map are drawn without hue, so that no colour in them can be read as a class:
lightness in matplotlib's *bone* colour map (black → blue-grey → white; its table is copied below, byte for
byte as ``matplotlib.colormaps["bone"](range(256), bytes=True)`` gives it, so the pictures are the same with
or without matplotlib) and a texture. Solid = the class's own response (brighter = larger), hatched = the
response of another class where it is larger than the class's, black = no response. Why bone: its most
saturated colour has CIELAB chroma 20 (class colours: 50-130), and its nearest colour to any colour a CLEAR
map can hold (any hue at S = 1, V >= 0.15) is 9.3 CIEDE2000 units away; diverging maps with two hues do not
manage this (managua 5.3, PuOr 0.4, coolwarm 0.6, cividis 0.4: a blue or orange end is some class's blue or
orange), and a texture tells "against" apart in every colour vision, where a second hue would not. The binary
map uses the same marks at full strength: solid white = the class dominates, hatched = another class does,
black = neither.
"""

from __future__ import annotations

import numpy as np

from .reference import ClearmapsError, check_palette, default_palette, resolve_vmax

PALETTES = ("hues", "colorblind")

# the "colorblind" palette for N classes: hue = value / 720 (see the module docstring for how it was chosen)
COLORBLIND_720 = {
    1: (0,),
    2: (175, 586),
    3: (352, 480, 711),
    4: (120, 357, 480, 678),
    5: (0, 102, 333, 402, 480),
    6: (75, 120, 337, 395, 479, 686),
    7: (0, 78, 119, 375, 412, 480, 651),
    8: (0, 82, 120, 335, 390, 422, 480, 648),
    9: (59, 91, 120, 302, 384, 406, 480, 634, 686),
    10: (62, 92, 120, 300, 382, 403, 431, 476, 640, 674),
}

HEATMAP_COLORMAP = "bone"
"""matplotlib's name for the heatmap's colour map."""

_BONE = bytes.fromhex(
    "00000000000101010202020303030404040605050706060807060907070a08080c09090d0a0a0e0b0b0f0c0c110d0d12"
    "0e0d130e0e140f0f1510101711111812121913131a14141c15141d15151e16161f1717201818221919231a1a241b1b25"
    "1c1b261c1c281d1d291e1e2a1f1f2b20202d21212e22222f232230232331242433252534262635272736282838292939"
    "2a293a2a2a3b2b2b3c2c2c3e2d2d3f2e2e402f2f4130304231304431314532324633334734344935354a36364b37374c"
    "38374d38384f3939503a3a513b3b523c3c543d3d553e3e563f3e573f3f5840405a41415b42425c43435d44445e454560"
    "4645614646624747634848654949664a4a674b4b684c4c694d4c6b4d4d6c4e4e6d4f4f6e505070515171525272535372"
    "545473545674555775565876575977585a78595c795a5d795b5e7a5b5f7b5c607c5d627d5e637e5f647f606580616680"
    "626881626982636a83646b84656d85666e86676f876870876971886973896a748a6b758b6c768c6d778d6e798e6f7a8e"
    "707b8f707c90717d91727f927380937481947582957683957785967786977887987988997a899a7b8b9b7c8c9c7d8d9c"
    "7e8e9d7e8f9e7f919f8092a08193a18294a28395a38497a38598a48599a5869aa6879ba7889da8899ea98a9faa8ba0aa"
    "8ca1ab8ca3ac8da4ad8ea5ae8fa6af90a7b091a9b192aab193abb293acb394adb495afb596b0b697b1b798b2b899b3b8"
    "9ab5b99ab6ba9bb7bb9cb8bc9dbabd9ebbbe9fbcbfa0bdbfa1bec0a1c0c1a2c1c2a3c2c3a4c3c4a5c4c5a6c6c6a7c7c6"
    "a8c7c7aac8c8abc9c9accacaaecbcbafccccb1cdcdb2cecdb3ceceb5cfcfb6d0d0b7d1d1b9d2d2bad3d3bcd4d4bdd5d4"
    "bed5d5c0d6d6c1d7d7c2d8d8c4d9d9c5dadac6dbdbc8dcdbc9dcdccbddddccdedecddfdfcfe0e0d0e1e1d1e2e2d3e3e2"
    "d4e3e3d5e4e4d7e5e5d8e6e6dae7e7dbe8e8dce9e9deeae9dfeaeae0ebebe2ecece3edede5eeeee6efefe7f0f0e9f1f0"
    "eaf1f1ebf2f2edf3f3eef4f4eff5f5f1f6f6f2f7f7f4f8f7f5f8f8f6f9f9f8fafaf9fbfbfafcfcfcfdfdfdfefeffffff")


def colormap_table() -> np.ndarray:
    """The heatmap's colour map as uint8 (256, 3): entry 0 = no response (black), 255 = the strongest (white)."""
    return np.frombuffer(_BONE, dtype=np.uint8).reshape(256, 3).copy()


_TABLE = colormap_table()
_TABLE.flags.writeable = False
FOR, NEITHER = (255, 255, 255), (0, 0, 0)
"""The binary map's colours: the class dominates (solid), neither (another class dominating is hatched FOR)."""


def apply_colormap(t) -> np.ndarray:
    """Values ``t`` in [0, 1] through the colour map, as matplotlib's ``Colormap.__call__(t, bytes=True)``
    looks them up (entry floor(256·t), 1.0 the last): uint8 (..., 3)."""
    t = np.asarray(t, dtype=np.float64) * 256.0
    index = np.where(t >= 256.0, 255, t).astype(np.int64)
    return _TABLE[np.clip(index, 0, 255)]


def hatch(height: int, width: int, scale: int) -> np.ndarray:
    """The hatching of "another class": bool (height, width), True on diagonal stripes ``max(1, scale // 4)``
    pixels wide (on a picture upscaled ``scale`` times, so that every map pixel shows a few stripes)."""
    w = max(1, int(scale) // 4)
    y, x = np.indices((height, width))
    return ((y + x) // w) % 2 == 0


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(a, scale, axis=1), scale, axis=2) if scale > 1 else a


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ClearmapsError(f"scale={scale!r}; expected an integer upscaling factor >= 1.")
    return int(scale)


def named_palette(name: str, num_classes: int) -> np.ndarray:
    """The hues (N,) of a named palette for ``num_classes`` classes: "hues" or "colorblind"."""
    if not isinstance(name, str) or name not in PALETTES:
        raise ClearmapsError(f"palette={name!r}; expected one of {PALETTES}, or hues in [0, 1].")
    if name == "hues":
        return default_palette(num_classes)
    if num_classes not in COLORBLIND_720:
        raise ClearmapsError(f"palette='colorblind' has hues for 1 to {max(COLORBLIND_720)} classes, not "
                             f"{num_classes}: use palette='hues', or choose at most {max(COLORBLIND_720)} classes "
                             "with classes=[...].")
    return np.asarray(COLORBLIND_720[num_classes], dtype=np.float64) / 720.0


def resolve_palette(palette, num_classes: int, num_chosen: int, same_classes: bool = True) -> tuple[np.ndarray, str]:
    """The hue table and how it is indexed, for :func:`clearmaps.explain`'s ``palette``.

    Returns (hues, by): by "class", ``hues`` has N entries and class c is drawn in ``hues[c]``; by
    "position", ``hues`` has K entries, one per chosen class in the order of ``classes``: a K-hue palette
    (K < N) given by the user, or "colorblind" for a network of more than 10 classes when every image has the
    same K <= 10 chosen classes (each of them then keeps one colour). ``same_classes`` says whether every
    image has the same chosen classes (False with "topK").
    """
    if palette is None or isinstance(palette, str):
        name = "hues" if palette is None else palette
        if name == "colorblind" and num_classes not in COLORBLIND_720 and num_chosen in COLORBLIND_720:
            if not same_classes:
                raise ClearmapsError(f"palette='colorblind' has hues for at most {max(COLORBLIND_720)} classes and "
                                     f"the network has {num_classes}; with each image's own top classes its "
                                     "colours would mean ranks, not classes: choose the classes with classes=[...], "
                                     f"or give {num_chosen} hues yourself to colour by rank.")
            return named_palette(name, num_chosen), "position"
        return named_palette(name, num_classes), "class"
    hues = check_palette(palette, None)
    if hues.size == num_classes:
        return hues, "class"
    if hues.size == num_chosen:
        return hues, "position"
    raise ClearmapsError(f"palette has {hues.size} hues for {num_classes} classes; give {num_classes} (one per "
                         "class id)"
                         + (f" or {num_chosen} (one per chosen class, in the order of classes)"
                            if num_chosen != num_classes else "") + ", or a name: 'hues' or 'colorblind'.")


def hues_of(palette, palette_by: str, classes_row) -> np.ndarray:
    """The hue of each of one image's K classes (``classes_row``, (K,) ids)."""
    hues = np.asarray(palette, dtype=np.float64)
    return hues[np.asarray(classes_row)] if palette_by == "class" else hues


def _true_and_other(responses, position):
    # the paper's two quantities behind Figs. 3-4 (II, III), as clearmaps.reference.heatmap reads them
    from .reference.figures import _true_and_other as split

    return split(responses, position)


def heatmap_rgb(responses, position, vmax=None, scale: int = 1) -> np.ndarray:
    """The heatmap of the paper's Figs. 3-4 (II) without hue: uint8 (B, H·scale, W·scale, 3).

    ``responses`` (B, K, H, W); ``position`` (B,) the position in K of the class each image is drawn for.
    Where that class's response is the largest it is drawn solid in :data:`HEATMAP_COLORMAP`, scaled by the
    image's strongest response (or ``vmax``); where another class's response is larger, that response is
    drawn hatched (:func:`hatch`, black between the stripes); no response is black. The same pixels as
    :func:`clearmaps.heatmap`'s hot and green, upscaled ``scale`` times (nearest neighbour) so that the
    hatching shows.
    """
    scale = _check_scale(scale)
    true, other = _true_and_other(responses, position)
    level = resolve_vmax(np.maximum(true, other), vmax).reshape(-1, 1, 1)
    safe = np.where(level > 0, level, 1.0)
    t = np.where(level > 0, np.clip(true, 0, safe) / safe, 0.0)
    o = np.where(level > 0, np.clip(other, 0, safe) / safe, 0.0)
    against = (other > true) & (other > 0)
    rgb = _upscale(apply_colormap(np.where(against, o, t)), scale)
    gaps = _upscale(against, scale) & ~hatch(rgb.shape[1], rgb.shape[2], scale)
    rgb[gaps] = NEITHER
    return rgb


def binary_rgb(responses, position, threshold: float = 0.0, scale: int = 1) -> np.ndarray:
    """The binary map of the paper's Fig. 4 (III) with the heatmap's marks: uint8 (B, H·scale, W·scale, 3),
    solid :data:`FOR` where the class dominates, hatched where another class does, black where the dominant
    response is at most ``threshold`` times the image's strongest. The same pixels as
    :func:`clearmaps.binary_map`'s red, blue and black."""
    from .reference import binary_map

    scale = _check_scale(scale)
    marks = _upscale(binary_map(responses, position, threshold), scale)
    out = np.zeros_like(marks)
    out[marks[..., 0] == 255] = FOR
    against = marks[..., 2] == 255
    out[against & hatch(out.shape[1], out.shape[2], scale)] = FOR
    return out
