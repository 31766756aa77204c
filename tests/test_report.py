"""``clearmaps report``: the static page in a real headless Chromium (Debian's chromium, driven by
Playwright): it loads from disk with no console errors, the figures are those of clearmaps.explain on the
same images, and the filters, sorting, paging and matrix clicks show the right images.

Needs /usr/bin/chromium (apt-get install chromium); without it the test fails, it does not skip. Set
CLEARMAPS_SCREENSHOTS=DIR to keep the screenshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clearmaps
from clearmaps import builtin
from clearmaps.cli import main

from .test_store import make_tree

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PAGE = 20


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A store of 150 held-out digits, its report, and what clearmaps.explain says of the same images."""
    tmp = tmp_path_factory.mktemp("report")
    images, labels = builtin.heldout()
    from clearmaps.paper import classify

    # every tenth digit and every misclassified one, so that the filters have mistakes to find
    mistakes = np.flatnonzero(classify(builtin.load_model(), builtin.to_input(images)) != labels)
    order = make_tree(tmp / "ds", images, labels, sorted(set(range(0, 1000, 10)) | set(mistakes.tolist())))
    assert main(["explain", str(tmp / "ds"), "--out", str(tmp / "res"), "--batch-size", "64", "--backend", "cpu",
                 "--quiet"]) == 0
    assert main(["report", str(tmp / "res"), "--page-size", str(PAGE), "--quiet"]) == 0
    e = clearmaps.explain(builtin.load_model(), builtin.to_input(images[order]), backend="cpu")
    probs = np.asarray(e.probabilities)
    pred = probs.argmax(axis=1)
    return {"dir": tmp / "res" / "report", "labels": labels[order], "pred": pred,
            "prob": probs[np.arange(len(order)), pred], "rgb": np.asarray(e.rgb), "order": order}


def test_atlases_hold_each_images_map_at_its_tile(report):
    atlas = np.asarray(Image.open(report["dir"] / "atlas" / "clear-00001.png").convert("RGB"))
    for k in (0, 5, 16, 59):  # image 64 + k is tile k of chunk 1, 16 tiles a row
        r, c = divmod(k, 16)
        np.testing.assert_array_equal(atlas[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)], report["rgb"][64 + k])


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (the report is tested in a real browser)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_the_page_in_headless_chromium(report, tmp_path):
    labels, pred, prob = report["labels"], report["pred"], report["prob"]
    shots = Path(os.environ.get("CLEARMAPS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
            page.goto((report["dir"] / "index.html").as_uri())
            page.wait_for_load_state("load")
            shown = lambda: page.evaluate("window.clearmapsReport.shown()")  # noqa: E731
            matched = lambda: page.evaluate("window.clearmapsReport.matched()")  # noqa: E731

            accuracy = 100 * np.mean(pred == labels)
            assert f"{accuracy:.1f}%" in page.inner_text("#summary")
            assert shown() == list(range(PAGE)) and matched() == len(labels)
            page.screenshot(path=str(shots / "report-top.png"))
            page.click("#next")
            assert shown() == list(range(PAGE, 2 * PAGE))

            page.select_option("#f-true", "3")
            assert matched() == int((labels == 3).sum()) and all(labels[i] == 3 for i in shown())
            page.select_option("#f-true", "any")
            page.select_option("#f-kind", "wrong")
            wrong = np.flatnonzero(pred != labels)
            assert len(wrong) >= 2 and sorted(shown()) == wrong[:PAGE].tolist()
            page.select_option("#f-kind", "all")
            page.select_option("#f-sort", "prob-asc")
            got = shown()
            assert got[0] == int(np.argmin(prob)) and np.all(np.diff(prob[got]) >= -1e-3)
            page.select_option("#f-sort", "share-desc")
            page.select_option("#f-kind", "wrong")
            page.screenshot(path=str(shots / "report-misclassified.png"), full_page=True)

            # a confusion-matrix cell shows exactly its images
            t, q = int(labels[wrong[0]]), int(pred[wrong[0]])
            page.click("#reset")
            page.locator("#confusion tr").nth(t + 1).locator("td").nth(q).click()
            want = np.flatnonzero((labels == t) & (pred == q)).tolist()
            assert sorted(shown()) == want and page.input_value("#f-true") == str(t)
            # the CLEAR matrix: each row's shares sum to 100% (of the maps that respond at all)
            rows = page.evaluate("window.CLEARMAPS_REPORT.clearMatrix")
            assert all(abs(sum(r) - 1) < 1e-3 for r in rows if sum(r))
            page.screenshot(path=str(shots / "report-full.png"), full_page=True)
            assert not problems, problems
        finally:
            browser.close()
    for name in ("report-top.png", "report-misclassified.png", "report-full.png"):
        assert (shots / name).stat().st_size > 10_000
