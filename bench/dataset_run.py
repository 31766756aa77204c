"""The dataset run's overhead (issue 18): ``run_dataset`` into a results store against ``clearmaps.explain``
alone on the same batches, on the built-in model; and its peak memory for 1,000 and 20,000 images.

    python -m bench.dataset_run                       # 1,000 images x 3 repeats, memory at 1k and 20k
    python -m bench.dataset_run --images 5000 --repeats 5 --memory 1000 20000 100000

One process runs the timed methods, interleaved (explain, store from .npz, store from PNG files, explain,
...), median of the repeats; the machine is shared, so the ratio of medians is the figure, not a time.
Peak memory is measured in a fresh child process per size (ru_maxrss of that child: the model, the reader,
one chunk in flight, the Parquet table at the end). Writes bench/results/dataset_run-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_npz(path: Path, n: int) -> None:
    from clearmaps import builtin

    images, labels = builtin.heldout()
    reps = -(-n // len(labels))
    np.savez(path, images=np.tile(images, (reps, 1, 1))[:n], labels=np.tile(labels, reps)[:n])


def make_tree(root: Path, n: int) -> None:
    from PIL import Image

    from clearmaps import builtin

    images, labels = builtin.heldout()
    for i in range(n):
        j = i % len(labels)
        (root / str(labels[j])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[j]).save(root / str(labels[j]) / f"{i:06d}.png")


def time_explain(net, x, batch: int, backend: str) -> float:
    from clearmaps import explain

    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        explain(net, x[s:s + batch], backend=backend)
    return time.perf_counter() - t0


def time_store(net, data: Path, out: Path, batch: int, backend: str) -> float:
    from clearmaps.dataset_run import RunOptions, run_dataset
    from clearmaps.datasets import open_dataset

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ds = open_dataset(data, net.class_names)
    run_dataset(net, ds, out, RunOptions(backend=backend), batch_size=batch)
    return time.perf_counter() - t0


def store_components(net, data: Path, out: Path, batch: int, backend: str) -> dict:
    """The in-process run's own loop (prepare_run, then per chunk: read, explain, summarise, write) with a
    timer around each part: where the overhead goes, in seconds per chunk."""
    from clearmaps import explain
    from clearmaps.dataset_run import RunOptions, explain_chunk, prepare_run
    from clearmaps.datasets import open_dataset

    shutil.rmtree(out, ignore_errors=True)
    ds = open_dataset(data, net.class_names)
    options = RunOptions(backend=backend)
    store, size, todo = prepare_run(net, ds, out, options, batch)
    parts = {"read": 0.0, "explain": 0.0, "summarise (maps -> table, shares, thumbnails)": 0.0, "write": 0.0}
    for chunk in todo:
        start, stop = store.bounds(chunk)
        t0 = time.perf_counter()
        pixels, _ = ds.read(start, stop, options.transform, 1, size)
        x = options.transform.pre.normalise(pixels)
        t1 = time.perf_counter()
        explain(net, x, backend=backend)
        t2 = time.perf_counter()
        # explain_chunk does the read and the explain again: its time less theirs is the summary's
        arrays, table = explain_chunk(net, ds, start, stop, options, size)
        t3 = time.perf_counter()
        store.write_chunk(chunk, arrays, table)
        t4 = time.perf_counter()
        parts["read"] += t1 - t0
        parts["explain"] += t2 - t1
        parts["summarise (maps -> table, shares, thumbnails)"] += max(0.0, (t3 - t2) - (t2 - t0))
        parts["write"] += t4 - t3
    store.finish()
    return {k: v / len(todo) for k, v in parts.items()}


def child_memory(n: int, batch: int, backend: str, work: Path) -> dict:
    """Runs in a fresh process: the whole dataset run of n images; peak RSS before and after."""
    from clearmaps import builtin
    from clearmaps.dataset_run import RunOptions, run_dataset
    from clearmaps.datasets import open_dataset

    data = work / f"mem-{n}.npz"
    if not data.exists():
        make_npz(data, n)
    net = builtin.load_model()
    import clearmaps

    clearmaps.explain(net, np.zeros((batch, 1, 28, 28), np.float32), backend=backend)  # JIT and buffers first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run_dataset(net, open_dataset(data, net.class_names), work / f"mem-{n}", RunOptions(backend=backend),
                batch_size=batch)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": n, "peak_rss_before_mib": before / 1024, "peak_rss_mib": after / 1024,
            "seconds": seconds, "images_per_s": n / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="images per explain call = per chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--memory", type=int, nargs="*", default=[1000, 20000], help="dataset sizes for peak memory")
    p.add_argument("--json", help="where the JSON goes (default bench/results/dataset_run-<time>.json)")
    p.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.batch_size, args.backend, Path(args.work))))
        return 0

    from clearmaps import builtin, explain

    net = builtin.load_model()
    work = Path(tempfile.mkdtemp(prefix="clearmaps-bench-"))
    try:
        make_npz(work / "set.npz", args.images)
        make_tree(work / "tree", args.images)
        with np.load(work / "set.npz") as d:
            x = builtin.to_input(d["images"])  # what explain alone is given: the same images, in memory
        explain(net, x[:args.batch_size], backend=args.backend)  # JIT compile outside the timings
        times: dict = {"explain": [], "store from .npz": [], "store from PNG tree": []}
        for r in range(args.repeats):
            times["explain"].append(time_explain(net, x, args.batch_size, args.backend))
            times["store from .npz"].append(time_store(net, work / "set.npz", work / "o1", args.batch_size,
                                                       args.backend))
            times["store from PNG tree"].append(time_store(net, work / "tree", work / "o2", args.batch_size,
                                                           args.backend))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = args.images / med["explain"]
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); "
              f"backend {args.backend}; {args.images:,} images in chunks of {args.batch_size}; "
              f"median of {args.repeats}, interleaved\n")
        print("| method | images/s | ratio to explain | overhead |")
        print("| --- | ---: | ---: | ---: |")
        rows = []
        for k, t in med.items():
            rate = args.images / t
            rows.append({"method": k, "median_s": t, "images_per_s": rate, "ratio": rate / base,
                         "all_s": times[k]})
            print(f"| {k} | {rate:.1f} | {rate / base:.3f} | {100 * (1 - rate / base):+.1f}% |")

        comp = [store_components(net, work / "set.npz", work / "o3", args.batch_size, args.backend)
                for _ in range(args.repeats)]
        parts = {k: statistics.median(c[k] for c in comp) for k in comp[0]}
        print(f"\nper chunk of {args.batch_size} (median of {args.repeats}; the summary is explain_chunk's time "
              "less a second read and explain, so it is noisy):")
        print("| part | ms per chunk | share of explain |")
        print("| --- | ---: | ---: |")
        for k, v in parts.items():
            print(f"| {k} | {1e3 * v:.1f} | {100 * v / parts['explain']:.1f}% |")

        memory = []
        for n in args.memory:
            out = subprocess.run([sys.executable, "-m", "bench.dataset_run", "--child-memory", str(n), "--work",
                                  str(work), "--batch-size", str(args.batch_size), "--backend", args.backend],
                                 capture_output=True, text=True, check=True)
            memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if memory:
            print("\n| images | peak RSS after warm-up (MiB) | peak RSS of the run (MiB) | images/s |")
            print("| ---: | ---: | ---: | ---: |")
            for m in memory:
                print(f"| {m['images']:,} | {m['peak_rss_before_mib']:.0f} | {m['peak_rss_mib']:.0f} | "
                      f"{m['images_per_s']:.1f} |")
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "python": platform.python_version()},
                  "images": args.images, "batch_size": args.batch_size, "backend": args.backend,
                  "repeats": args.repeats, "rows": rows, "per_chunk_s": parts, "memory": memory}
        path = Path(args.json) if args.json else Path("bench/results") / \
            f"dataset_run-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
