"""Reading inputs (layouts, scaling, conversion, errors) and rendering (legend, upscaling, atomic writes)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import clearmaps
from clearmaps import ClearmapsError, render
from clearmaps.images import Preprocess, load_images, parse_size


def test_array_layouts_and_scaling(tmp_path):
    u8 = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    np.save(tmp_path / "one.npy", u8.astype(np.uint8))
    np.save(tmp_path / "bhw.npy", np.stack([u8, 255 - u8]).astype(np.uint8))
    np.save(tmp_path / "bhwc.npy", np.stack([u8] * 3, axis=-1)[None].astype(np.float32) / 255)
    items, notes = load_images([tmp_path / "one.npy", tmp_path / "bhw.npy"], Preprocess(), 1, (28, 28))
    assert [it.name for it in items] == ["one", "bhw-0000", "bhw-0001"]
    np.testing.assert_allclose(items[0].pixels[0], u8 / 255.0)
    np.testing.assert_allclose(items[2].pixels[0], (255 - u8) / 255.0)
    assert "(B, H, W)" in notes[1]
    items, _ = load_images([tmp_path / "bhwc.npy"], Preprocess(mode="grayscale"), 1, (28, 28))
    np.testing.assert_allclose(items[0].pixels[0], u8 / 255.0, atol=1e-6)  # equal R, G, B: luma is the value


def test_folder_order_resize_and_normalisation(tmp_path):
    for name, v in (("b.png", 200), ("a.png", 100)):
        Image.fromarray(np.full((10, 14), v, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    pre = Preprocess(resize=parse_size("7x5"), invert=True, mean=[0.5], std=[0.25])
    items, _ = load_images([tmp_path], pre, 1, (None, None))
    assert [it.name for it in items] == ["a", "b"] and items[0].pixels.shape == (1, 7, 5)
    x = pre.normalise(np.stack([it.pixels for it in items]))
    np.testing.assert_allclose(x[0], ((1 - 100 / 255) - 0.5) / 0.25, rtol=1e-5)
    assert "resized to 7x5" in pre.describe(1, (None, None)) and "inverted" in pre.describe(1, (None, None))
    np.testing.assert_allclose(pre.background(0.0, 1), [(1 - 0.0 - 0.5) / 0.25])


def test_bad_preprocessing_values():
    with pytest.raises(ClearmapsError, match="--resize"):
        parse_size("big")
    with pytest.raises(ClearmapsError, match="std"):
        Preprocess(std=[0.0])
    with pytest.raises(ClearmapsError, match="3 values for a 1-channel model"):
        Preprocess(mean=[0.1, 0.2, 0.3]).normalise(np.zeros((1, 1, 2, 2)))


def test_legend_shows_each_palette_colour_and_upscale_is_nearest():
    colours = clearmaps.palette_rgb(clearmaps.default_palette(4))
    img = np.asarray(render.legend(colours, ["cat", "dog", "owl", "emu"]))
    for rgb in colours:
        assert (img.reshape(-1, 3) == rgb).all(axis=1).sum() >= 100  # a swatch, not a stray pixel
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(render.upscale(a, 3)[::3, ::3], a)
    assert render.upscale(a, 3).shape == (6, 9) and render.auto_scale(28, 28) == 8


def test_overlay_keeps_the_image_where_the_map_is_black():
    image = np.full((2, 2, 3), 77, np.uint8)
    clear = np.array([[[0, 0, 0], [255, 0, 0]], [[0, 128, 0], [0, 0, 0]]], np.uint8)
    out = render.overlay(image, clear, alpha=1.0)
    assert out[0, 0].tolist() == [77, 77, 77] and out[0, 1].tolist() == [255, 0, 0]


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "x.png"
    render.save_png(target, np.zeros((4, 4, 3), np.uint8))
    before = target.read_bytes()

    def fail(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render.atomic_write(target, fail)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_legend_stays_bounded_whatever_the_class_names():
    """Issue 20: one class name of 100,000 characters, or 5,000 classes, must not make a huge picture."""
    colours = clearmaps.palette_rgb(clearmaps.default_palette(3))
    long = render.legend(colours, ["x" * 100000, "b\nc", "d"])
    assert long.width <= 900 and long.height < 200
    assert render.label("x" * 100) == "x" * 59 + "…" and render.label("b\nc\x1b[31m") == "b c [31m"
    many = render.legend(np.zeros((5000, 3), np.uint8), [f"class {i}" for i in range(5000)])
    few = render.legend(np.zeros((render.MAX_LEGEND_ENTRIES, 3), np.uint8),
                        [f"class {i}" for i in range(render.MAX_LEGEND_ENTRIES)])
    assert many.width == few.width and 0 < many.height - few.height < 40  # one more line: "... and 3,976 more"


def test_upscaling_is_bounded():
    a = np.zeros((28, 28, 3), np.uint8)
    assert render.upscale(a, 146).shape == (4088, 4088, 3)
    with pytest.raises(ClearmapsError, match="--scale 147 would draw 28x28 maps at 4116x4116"):
        render.upscale(a, 147)
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ClearmapsError, match="upscaling factor"):
            render.upscale(a, bad)
    big = np.zeros((5000, 10, 3), np.uint8)
    assert render.upscale(big, 1) is big  # no upscaling is always allowed
