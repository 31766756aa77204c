"""Class colours fixed by class id, the named palettes, and the heatmap's colour map (issue 19, item 2).

Expected colours come from outside the code under test: colorsys for hues, matplotlib for the colour map,
clearmaps.reference.binary_map for which pixel is for / against, and a CIEDE2000 written here from its
published formula (Sharma, Wu & Dalal 2005) with Machado et al.'s (2009) dichromacy matrices.
"""

from __future__ import annotations

import colorsys

import matplotlib
import numpy as np
import pytest

import clearmaps
from clearmaps import ClearmapsError, builtin, explanation
from clearmaps import reference as ref
from clearmaps.palettes import (COLORBLIND_720, apply_colormap, binary_rgb, colormap_table, heatmap_rgb,
                                named_palette, resolve_palette)


@pytest.fixture(scope="module")
def digits():
    images, labels = builtin.heldout()
    pick = [int(np.flatnonzero(labels == d)[0]) for d in (3, 5, 8, 9)]
    return builtin.load_model(), builtin.to_input(images[pick])


def hue_of(rgb) -> float:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))[0]


def test_top_k_colours_a_class_by_its_id_never_by_its_rank(digits):
    net, x = digits
    e = clearmaps.explain(net, x, classes="top3", backend="reference")
    ids = np.asarray(e.classes)
    assert len({tuple(r) for r in ids}) > 1  # the images' top classes differ: ranks and ids disagree
    rgb, dom, resp = np.asarray(e.rgb), np.asarray(e.dominant_class), np.asarray(e.dominant_response)
    bright = resp > 0.5 * resp.reshape(len(resp), -1).max(axis=1)[:, None, None]
    for b, y, xx in zip(*np.nonzero(bright)):
        assert hue_of(rgb[b, y, xx]) == pytest.approx(dom[b, y, xx] / 10, abs=0.01)  # hue c/N, whatever its rank
    assert e.palette_by == "class" and np.asarray(e.palette).shape == (10,)
    for b in range(len(ids)):
        np.testing.assert_allclose(e.class_hues(b), ids[b] / 10)


@pytest.mark.parametrize("options", [dict(classes="top3"), dict(classes=[8, 2]), dict(palette="colorblind"),
                                     dict(classes="top2", vmax="batch")])
def test_every_backend_composes_the_references_bytes(digits, options, monkeypatch):
    """The composite of the CPU backend, in one batch and in chunks, is the reference's composition of its own
    dominant class ids and responses with the N-hue palette."""
    net, x = digits
    hues, _ = resolve_palette(options.get("palette"), 10, 3)
    whole = clearmaps.explain(net, x, backend="cpu", **options)
    monkeypatch.setattr(explanation, "CHUNK_BYTES", 1)  # one image per chunk
    chunked = clearmaps.explain(net, x, backend="cpu", **options)
    for e in (whole, chunked):
        want = ref.compose(e.dominant_class, e.dominant_response, hues, options.get("vmax"), num_classes=10)
        np.testing.assert_array_equal(e.rgb, want)
    np.testing.assert_array_equal(whole.rgb, chunked.rgb)


def test_palettes_by_name_by_class_and_by_position():
    np.testing.assert_allclose(named_palette("hues", 4), [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(named_palette("colorblind", 10), np.array(COLORBLIND_720[10]) / 720)
    assert resolve_palette([0.1, 0.2, 0.3], 3, 2)[1] == "class"
    assert resolve_palette([0.1, 0.2], 3, 2)[1] == "position"  # K hues: the user colours positions (ranks)
    hues, by = resolve_palette("colorblind", 1000, 4, same_classes=True)  # 4 chosen of 1,000 keep one colour each
    assert by == "position" and np.allclose(hues, np.array(COLORBLIND_720[4]) / 720)
    with pytest.raises(ClearmapsError, match="its colours would mean ranks"):
        resolve_palette("colorblind", 1000, 4, same_classes=False)
    with pytest.raises(ClearmapsError, match="'colorblind' has hues for 1 to 10 classes, not 11"):
        resolve_palette("colorblind", 11, 11)
    with pytest.raises(ClearmapsError, match="palette='rainbow'"):
        resolve_palette("rainbow", 3, 3)
    with pytest.raises(ClearmapsError, match="palette has 4 hues for 3 classes"):
        resolve_palette([0.1, 0.2, 0.3, 0.4], 3, 2)


def test_a_k_hue_palette_colours_by_position(digits):
    net, x = digits
    e = clearmaps.explain(net, x, classes="top2", palette=[0.0, 0.5], backend="reference")
    assert e.palette_by == "position"
    np.testing.assert_allclose(e.class_hues(1), [0.0, 0.5])
    positions = np.argmax(np.asarray(e.dominant_class)[:, None] == np.asarray(e.classes)[:, :, None, None], axis=1)
    np.testing.assert_array_equal(e.rgb, ref.compose(positions, e.dominant_response, [0.0, 0.5]))


# ---- colour-blind safety ------------------------------------------------------------------------------------

_MACHADO = {  # severity 1.0, linear RGB
    "protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    "normal": np.eye(3),
}


def _lab(rgb, vision):
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ np.asarray(_MACHADO[vision]).T
    xyz = np.clip(lin, 0, 1) @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                                         [0.0193, 0.1192, 0.9505]]).T / [0.95047, 1.0, 1.08883]
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _de2000(a, b):
    (L1, a1, b1), (L2, a2, b2) = np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0)
    Cm = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    G = 0.5 * (1 - np.sqrt(Cm ** 7 / (Cm ** 7 + 25 ** 7)))
    a1, a2 = a1 * (1 + G), a2 * (1 + G)
    C1, C2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    dh = (h2 - h1 + 180) % 360 - 180
    dH = 2 * np.sqrt(C1 * C2) * np.sin(np.radians(dh / 2))
    Lm, Cp = (L1 + L2) / 2, (C1 + C2) / 2
    hm = np.where(np.abs(h1 - h2) > 180, (h1 + h2 + 360) / 2, (h1 + h2) / 2)
    T = (1 - 0.17 * np.cos(np.radians(hm - 30)) + 0.24 * np.cos(np.radians(2 * hm))
         + 0.32 * np.cos(np.radians(3 * hm + 6)) - 0.20 * np.cos(np.radians(4 * hm - 63)))
    Rt = -2 * np.sqrt(Cp ** 7 / (Cp ** 7 + 25 ** 7)) * np.sin(np.radians(60 * np.exp(-(((hm - 275) / 25) ** 2))))
    SL, SC, SH = 1 + 0.015 * (Lm - 50) ** 2 / np.sqrt(20 + (Lm - 50) ** 2), 1 + 0.045 * Cp, 1 + 0.015 * Cp * T
    return np.sqrt(((L2 - L1) / SL) ** 2 + ((C2 - C1) / SC) ** 2 + (dH / SH) ** 2 + Rt * (C2 - C1) / SC * dH / SH)


def _closest_pair(hues) -> float:
    worst = np.inf
    for vision in _MACHADO:
        for v in (1.0, 0.6):
            lab = _lab([colorsys.hsv_to_rgb(h, 1.0, v) for h in hues], vision)
            d = _de2000(lab[:, None], lab[None]) + np.diag(np.full(len(hues), np.inf))
            worst = min(worst, d.min())
    return worst


def test_sharma_worked_example():
    # the first pair of Sharma, Wu & Dalal's (2005) test data: dE00 = 2.0425
    assert _de2000(np.array([50.0, 2.6772, -79.7751]), np.array([50.0, 0.0, -82.7485])) == pytest.approx(2.0425,
                                                                                                         abs=1e-4)


@pytest.mark.parametrize("n, floor", [(2, 50), (4, 25), (6, 12), (8, 10), (10, 8)])
def test_colorblind_palette_keeps_every_pair_of_classes_apart(n, floor):
    assert _closest_pair(named_palette("colorblind", n)) >= floor
    assert _closest_pair(named_palette("hues", n)) < _closest_pair(named_palette("colorblind", n))


def test_evenly_spaced_hues_fail_the_same_check():  # the control: the default palette at 10 classes
    assert _closest_pair(named_palette("hues", 10)) < 2


# ---- the heatmap and the binary map --------------------------------------------------------------------------

def test_the_colour_map_is_matplotlibs_bone():
    cmap = matplotlib.colormaps["bone"]
    np.testing.assert_array_equal(colormap_table(), cmap(np.arange(256), bytes=True)[:, :3])
    t = np.concatenate([[0.0, 1.0, 0.5, 255 / 256, 1 / 256], np.random.default_rng(0).random(1000)])
    np.testing.assert_array_equal(apply_colormap(t), cmap(t, bytes=True)[:, :3])


def test_heatmap_and_binary_map_have_no_class_colour_and_mark_the_papers_pixels():
    rng = np.random.default_rng(1)
    responses = rng.normal(size=(2, 3, 6, 7))
    pos = np.array([0, 2])
    heat, binary = heatmap_rgb(responses, pos, scale=4), binary_rgb(responses, pos, 0.1, scale=4)
    assert heat.shape == binary.shape == (2, 24, 28, 3)
    sat = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in heat.reshape(-1, 3)])[:, 1]
    assert sat.max() < 0.35  # bone: blue-grey at most, never a pure class hue
    marks = ref.binary_map(responses, pos, 0.1)  # red = for, blue = against, black = neither
    for b, y, x in np.ndindex(2, 6, 7):
        block = {tuple(p) for p in binary[b, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1, 3)}
        red, blue = marks[b, y, x, 0] == 255, marks[b, y, x, 2] == 255
        assert block == ({(255, 255, 255)} if red else {(255, 255, 255), (0, 0, 0)} if blue else {(0, 0, 0)})
