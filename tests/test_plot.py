"""Notebooks and figures (issue 19, item 1), the built-in model as a torch module, the inverted-input hint and
the first-run notice (items 3 and 5)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import matplotlib
import numpy as np
import pytest
from PIL import Image

import clearmaps
from clearmaps import ClearmapsError, builtin

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def explained():
    images, labels = builtin.heldout()
    pick = [int(np.flatnonzero(labels == d)[1]) for d in (2, 7, 4)]
    x = builtin.to_input(images[pick])
    return clearmaps.explain(builtin.load_model(), x, backend="reference"), x, labels[pick]


def _contains(picture: np.ndarray, block: np.ndarray) -> bool:
    """Whether ``block`` appears in ``picture``: tried only where the block's brightest pixel could sit."""
    r, c = np.unravel_index(np.argmax(block.astype(int).sum(-1)), block.shape[:2])
    h, w = block.shape[:2]
    for y, x in zip(*np.nonzero((picture == block[r, c]).all(-1))):
        y0, x0 = y - r, x - c
        if 0 <= y0 <= picture.shape[0] - h and 0 <= x0 <= picture.shape[1] - w and \
                (picture[y0:y0 + h, x0:x0 + w] == block).all():
            return True
    return False


def test_repr_is_short_and_says_what_is_inside(explained):
    e, _, _ = explained
    text = repr(e)
    assert len(text) < 500 and text.count("\n") <= 3, text
    assert "3 images" in text and "10 of 10 classes" in text and "28x28" in text and "e.plot(i)" in text
    for name in np.asarray(e.predicted):
        assert f"{name} (p = " in text


def test_notebook_display_is_a_picture_of_the_first_image(explained):
    e, _, _ = explained
    png = e._repr_png_()
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 500
    pixels = np.asarray(img.convert("RGB"))
    up = np.repeat(np.repeat(np.asarray(e.rgb)[0], 4, axis=0), 4, axis=1)  # the CLEAR map at 4x is in it
    assert _contains(pixels, up)
    html = e._repr_html_()
    assert html.startswith("<div><pre>Explanation of 3 images") and "data:image/png;base64," in html


def test_plot_draws_the_maps_themselves_and_exports(explained, tmp_path):
    e, x, labels = explained
    fig = e.plot(1, true=int(labels[1]), binary=True)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 5  # input, CLEAR map, overlay, heatmap, binary map (the colour bar is not an image)
    np.testing.assert_array_equal(images[1], np.asarray(e.rgb)[1])
    assert images[3].shape == (224, 224, 3)  # the heatmap at 8x: its hatching needs the room
    labels_in_legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sum("true" in t for t in labels_in_legend) == 1
    assert any(t.startswith(f"{labels[1]} (") and "true" in t for t in labels_in_legend)
    assert len(labels_in_legend) == 10
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = tmp_path / f"fig{suffix}"
        fig.savefig(path)
        assert path.read_bytes().startswith(magic)


def test_plot_draws_the_overlay_at_the_images_own_resolution(explained):
    e, x, _ = explained
    photo = np.asarray(Image.fromarray((x[0, 0] * 255).astype(np.uint8)).resize((90, 60)))  # (60, 90), any size
    fig = e.plot(0, image=photo)
    overlay = [ax.images[0].get_array() for ax in fig.axes if ax.images][2]
    assert overlay.shape == (60, 90, 3)
    panel = e.panel(0, image=photo)
    assert isinstance(panel, Image.Image)


def test_plot_refuses_what_it_cannot_draw(explained):
    e, _, _ = explained
    for call, needle in ((lambda: e.plot(3), "holds 3 image"), (lambda: e.plot(0, true="cat"), "true='cat'"),
                         (lambda: e.plot(0, binary_threshold=2), "binary_threshold=2"),
                         (lambda: e.plot(0, image=np.zeros((2, 3, 4, 5))), "image has shape")):
        with pytest.raises(ClearmapsError, match=needle):
            call()


def test_without_responses_or_images_the_panel_says_so(explained):
    e, x, _ = explained
    bare = clearmaps.explain(builtin.load_model(), x[:1], backend="reference", keep_responses=False)
    from dataclasses import replace

    assert bare.panel(0).width > 400 and replace(bare, images=None)._repr_png_().startswith(b"\x89PNG")


def test_torch_model_is_the_built_in_network(explained):
    import torch

    e, x, _ = explained
    module = builtin.torch_model()
    assert isinstance(module, torch.nn.Module) and not module.training
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, np.asarray(e.logits), rtol=1e-4, atol=1e-4)


def test_light_backgrounds_are_flagged(caplog):
    images, _ = builtin.heldout()
    assert not builtin.looks_inverted(builtin.to_input(images[:50])).any()
    with caplog.at_level(logging.WARNING, logger="clearmaps"):
        x = builtin.to_input(255 - images[:4])
    assert builtin.looks_inverted(x).all()
    assert "4 of 4 digits have a light background" in caplog.text and "255 - images" in caplog.text


# ---- the first run ---------------------------------------------------------------------------------------

_KERNEL = """
from numba import njit

@njit(cache=True)
def twice(x):
    return 2 * x
"""

_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from clearmaps import firstrun

class Say(firstrun.Reporter):
    def start(self, where): print("start", where)
    def kernel(self, count, name): print("kernel", count, name)
    def done(self, count, seconds, where): print("done", count)

firstrun.set_reporter(Say())
import numba, kernelmod
with firstrun.compile_notice(modules=("kernelmod",)):
    kernelmod.twice(21)
with firstrun.compile_notice(modules=("kernelmod",)):
    kernelmod.twice(2.5)  # a second signature: compiled (and said) too
"""


def test_the_first_compile_is_announced_and_a_cached_one_is_not(tmp_path):
    (tmp_path / "kernelmod.py").write_text(textwrap.dedent(_KERNEL))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", _RUN, str(tmp_path)], capture_output=True, text=True, env=env,
                           timeout=120) for _ in range(2)]
    first, second = (r.stdout.splitlines() for r in runs)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert first[0].startswith("start ") and str(tmp_path / "cache") in first[0]
    assert first[1:] == ["kernel 1 twice", "done 1", f"start {first[0][6:]}", "kernel 1 twice", "done 1"]
    assert second == []  # both signatures come from the cache: nothing is said


def test_the_api_logs_the_notice_and_the_command_prints_it(caplog, capsys):
    from clearmaps import firstrun
    from clearmaps.cli_outputs import CompileProgress

    with caplog.at_level(logging.INFO, logger="clearmaps"):
        reporter = firstrun.Reporter()
        reporter.start("/cache")
        reporter.done(21, 40.0, "/cache")
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "compiling clearmaps' CPU kernels" in caplog.records[0].getMessage() and "/cache" in caplog.text
    quiet = CompileProgress(quiet=True)
    quiet.start("/cache")
    quiet.kernel(1, "k")
    quiet.done(1, 2.0, "/cache")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("first run: compiling the CPU kernels") and "/cache" in out[0]
    assert out[1] == "compiled 1 kernels in 2 s (cached for later runs)" and len(out) == 2
