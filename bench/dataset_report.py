"""The report at 100,000 images (issue 18: "paged so that 100,000 images stay responsive").

    python -m bench.dataset_report                    # 100,000 images; writes a screenshot beside the JSON
    python -m bench.dataset_report --images 20000 --screenshot docs/report.png

Builds a store of ``--images`` rows from the real results of 1,024 held-out digits (explained once, then
their chunks repeated with their own file names, labels and predictions: the page does not care that the
maps repeat), writes its report, and times in headless Chromium (Debian's chromium, Playwright): the page
load, a filter, a sort and a page turn, each the median of 5 (performance.now around the synchronous
handler; layout and paint after it are in the load time only). Writes bench/results/dataset_report-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def build_store(work: Path, n: int, batch: int = 256) -> Path:
    import numpy as np
    import pyarrow as pa

    from clearmaps import builtin
    from clearmaps.dataset_chunk import RunOptions, explain_chunk, table_schema
    from clearmaps.dataset_run import store_settings
    from clearmaps.datasets import open_dataset
    from clearmaps.store import create_store

    from .dataset_run import make_npz

    net = builtin.load_model()
    make_npz(work / "seed.npz", 4 * batch)
    seed = open_dataset(work / "seed.npz", net.class_names)
    options = RunOptions(backend="cpu")
    real = [explain_chunk(net, seed, s, s + batch, options, (28, 28)) for s in range(0, 4 * batch, batch)]
    big = open_dataset(work / "seed.npz", net.class_names)
    big.names = [f"synthetic/{i:06d}.png" for i in range(n)]
    big.labels = np.resize(seed.labels, n)
    big.array = None  # the listing only: nothing is read
    big.kind = "synthetic"
    settings = store_settings(net, big, options, batch, (28, 28), "bench-synthetic")
    store = create_store(str(work / "store"), settings, force=True)
    for chunk in range(store.chunks):
        start, stop = store.bounds(chunk)
        arrays, table = real[chunk % 4]
        rows = table.to_pydict()
        rows["index"] = list(range(start, stop))
        rows["file"] = big.names[start:stop]
        m = stop - start
        store.write_chunk(chunk, {k: v[:m] for k, v in arrays.items()},
                          pa.table({k: v[:m] for k, v in rows.items()}, schema=table_schema()))
    store.finish()
    return work / "store"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--screenshot", help="where the screenshot goes (default beside the JSON)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from clearmaps.report import write_report

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.json) if args.json else Path("bench/results") / f"dataset_report-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shot = Path(args.screenshot) if args.screenshot else path.with_suffix(".png")
    work = Path(tempfile.mkdtemp(prefix="clearmaps-report-bench-"))
    try:
        t0 = time.perf_counter()
        store = build_store(work, args.images)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        index, _ = write_report(store, work / "report")
        report_s = time.perf_counter() - t0
        data_mb = (work / "report" / "data.js").stat().st_size / 1e6
        atlas_mb = sum(f.stat().st_size for f in (work / "report" / "atlas").iterdir()) / 1e6
        timings: dict = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            timings["load_s"] = time.perf_counter() - t0
            change = """([id, value]) => { const s = document.getElementById(id); const t = performance.now();
                s.value = value; s.dispatchEvent(new Event('change')); return performance.now() - t; }"""
            click = """(id) => { const t = performance.now(); document.getElementById(id).click();
                return performance.now() - t; }"""
            for name, run in [("filter true class", lambda i: page.evaluate(change, ["f-true", str(i % 10)])),
                              ("misclassified only", lambda i: page.evaluate(change, ["f-kind", ["wrong", "all"][i % 2]])),
                              ("sort by confidence", lambda i: page.evaluate(change, ["f-sort", ["prob-asc", "index"][i % 2]])),
                              ("sort by true-class share", lambda i: page.evaluate(change, ["f-sort", ["share-desc", "index"][i % 2]])),
                              ("next page", lambda i: page.evaluate(click, "next"))]:
                timings[name + " ms"] = statistics.median(run(i) for i in range(5))
            page.evaluate(change, ["f-true", "any"])
            page.evaluate(change, ["f-kind", "wrong"])
            page.evaluate(change, ["f-sort", "prob-desc"])
            page.wait_for_timeout(300)
            page.screenshot(path=str(shot), full_page=True)
            shown = page.evaluate("document.querySelectorAll('#gallery .card').length")
            browser.close()
        result = {"images": args.images, "store_build_s": built, "report_s": report_s, "data_js_mb": data_mb,
                  "atlases_mb": atlas_mb, "browser": timings, "cards_in_document": shown, "console_errors": errors,
                  "screenshot": str(shot)}
        print(json.dumps(result, indent=1))
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path} and {shot}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
