"""The Dask path (issue 18): a dataset run on a 2-worker LocalCluster against the in-process run, and the
overheads that decide how it scales: Dask's cost per task, the cluster's cost per chunk, the model's trip
to the workers.

    python -m bench.dataset_dask                      # 4,000 images, chunks of 256, 3 repeats, interleaved
    python -m bench.dataset_dask --images 8000 --repeats 5 --gpu-images-per-s 20000

Timed in one process, interleaved (in-process, cluster, in-process, ...), median of the repeats. The cluster
is started once, outside the timings (its start-up is reported on its own); each cluster run writes a fresh
store, the model plugin included. From the measured figures the script prints its estimate for a cluster of
--scale-workers GPU workers at --gpu-images-per-s each (an assumption: give a measured GPU rate). Writes
bench/results/dataset_dask-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def noop(i):
    return i


def in_process(net, data: Path, out: Path, batch: int, backend: str) -> dict:
    from clearmaps.dataset_run import RunOptions, explain_chunk, prepare_run
    from clearmaps.datasets import open_dataset

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ds = open_dataset(data, net.class_names)
    options = RunOptions(backend=backend)
    store, size, todo = prepare_run(net, ds, out, options, batch)
    explain_s = write_s = 0.0
    for chunk in todo:
        start, stop = store.bounds(chunk)
        t1 = time.perf_counter()
        arrays, table = explain_chunk(net, ds, start, stop, options, size)
        t2 = time.perf_counter()
        store.write_chunk(chunk, arrays, table)
        explain_s += t2 - t1
        write_s += time.perf_counter() - t2
    store.finish()
    return {"wall_s": time.perf_counter() - t0, "explain_s": explain_s, "write_s": write_s, "chunks": len(todo)}


def on_cluster(client, net, data: Path, out: Path, batch: int, backend: str) -> dict:
    from clearmaps.dataset_run import RunOptions, prepare_run
    from clearmaps.datasets import open_dataset
    from clearmaps.distributed import run_chunks

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ds = open_dataset(data, net.class_names)
    options = RunOptions(backend=backend)
    store, size, todo = prepare_run(net, ds, out, options, batch)
    timings: dict = {}
    run_chunks(net, ds, store, todo, options, size, client=client, timings=timings)
    store.finish()
    return {"wall_s": time.perf_counter() - t0, "explain_s": sum(t[0] for t in timings.values()),
            "write_s": sum(t[1] for t in timings.values()), "chunks": len(todo)}


def task_overheads(client, n: int = 2000) -> dict:
    """Dask's own cost of a task: a batch of no-op tasks (throughput) and one at a time (round trip)."""
    client.gather(client.map(noop, range(50), pure=False))  # warm
    t0 = time.perf_counter()
    client.gather(client.map(noop, range(n), pure=False))
    batch = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(100):
        client.submit(noop, i, pure=False).result()
    return {"per_task_s_in_bulk": batch, "round_trip_s": (time.perf_counter() - t0) / 100}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--scale-workers", type=int, default=100)
    p.add_argument("--gpu-images-per-s", type=float, default=20000.0,
                   help="an assumed per-GPU explain rate on this model, for the estimate")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import pickle

    from clearmaps import builtin, explain
    from clearmaps.distributed import connect

    from .dataset_run import make_npz

    net = builtin.load_model()
    work = Path(tempfile.mkdtemp(prefix="clearmaps-dask-bench-"))
    try:
        make_npz(work / "set.npz", args.images)
        explain(net, builtin.to_input(builtin.heldout()[0][:args.batch_size]), backend=args.backend)
        t0 = time.perf_counter()
        client, cluster = connect(workers=args.workers)
        client.wait_for_workers(args.workers, timeout=120)
        startup = time.perf_counter() - t0
        try:
            overheads = task_overheads(client)
            runs: dict = {"in-process": [], f"LocalCluster, {args.workers} workers": []}
            for r in range(args.repeats):
                runs["in-process"].append(in_process(net, work / "set.npz", work / "one", args.batch_size,
                                                     args.backend))
                runs[f"LocalCluster, {args.workers} workers"].append(
                    on_cluster(client, net, work / "set.npz", work / "two", args.batch_size, args.backend))
                print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f} s" for k, v in runs.items()),
                      flush=True)
        finally:
            client.close()
            cluster.close()
        chunk_bytes = sum(f.stat().st_size for f in (work / "two").rglob("*") if f.is_file()) / \
            -(-args.images // args.batch_size)
        model_bytes = len(pickle.dumps(net, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    one, two = med["in-process"], med[f"LocalCluster, {args.workers} workers"]
    chunks = runs["in-process"][0]["chunks"]
    best = min(runs[f"LocalCluster, {args.workers} workers"], key=lambda r: r["wall_s"])
    # the cluster's cost per chunk: worker time not spent explaining or writing, per chunk
    per_chunk = max(0.0, (best["wall_s"] * args.workers - best["explain_s"] - best["write_s"]) / chunks)
    compute_chunk = best["explain_s"] / chunks
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); backend "
          f"{args.backend}; {args.images:,} images in {chunks} chunks of {args.batch_size}; median of "
          f"{args.repeats}, interleaved; cluster start-up {startup:.1f} s (not in the times)\n")
    print("| run | median s | images/s | ratio to in-process |")
    print("| --- | ---: | ---: | ---: |")
    for k, t in med.items():
        print(f"| {k} | {t:.2f} | {args.images / t:.1f} | {one / t:.3f} |")
    print(f"\nDask per task: {1e3 * overheads['per_task_s_in_bulk']:.2f} ms in bulk (scheduler throughput "
          f"{1 / overheads['per_task_s_in_bulk']:.0f} tasks/s), {1e3 * overheads['round_trip_s']:.1f} ms one at a "
          f"time; the cluster's cost per chunk (worker time outside explain and write): {1e3 * per_chunk:.0f} ms; "
          f"a chunk's explain on a worker: {1e3 * compute_chunk:.0f} ms, its write: "
          f"{1e3 * best['write_s'] / chunks:.0f} ms; store bytes per chunk: {chunk_bytes / 1e6:.2f} MB; "
          f"model pickle: {model_bytes / 1e6:.2f} MB")

    # the estimate: W GPU workers at R images/s each, chunks of B images
    W, R, B = args.scale_workers, args.gpu_images_per_s, args.batch_size
    overhead = per_chunk + best["write_s"] / chunks
    lines = []
    for b in (B, 4 * B, 16 * B):
        t_gpu = b / R
        demand = W / (t_gpu + overhead)  # tasks/s the scheduler must hand out
        busy = t_gpu / (t_gpu + overhead)
        capped = min(1.0, (1 / overheads["per_task_s_in_bulk"]) / demand)
        rate = W * b / (t_gpu + overhead) * capped
        lines.append((b, t_gpu, demand, busy, capped, rate, demand * chunk_bytes * b / B / 1e6))
    print(f"\nestimate for {W} GPU workers at {R:,.0f} images/s each (chunk = batch):")
    print("| chunk | GPU s/chunk | tasks/s needed | GPU busy | scheduler cap | images/s | store MB/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, t_gpu, demand, busy, capped, rate, mbs in lines:
        print(f"| {b} | {t_gpu:.3f} | {demand:.0f} | {100 * busy:.0f}% | {100 * capped:.0f}% | {rate:,.0f} | "
              f"{mbs:.0f} |")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "images": args.images, "batch_size": B, "workers": args.workers, "repeats": args.repeats,
              "startup_s": startup, "runs": runs, "median_s": med, "ratio": one / two, "overheads": overheads,
              "per_chunk_s": per_chunk, "explain_per_chunk_s": compute_chunk, "chunk_bytes": chunk_bytes,
              "model_bytes": model_bytes, "estimate": [dict(zip(("chunk", "gpu_s", "tasks_per_s", "busy",
                                                                 "scheduler_cap", "images_per_s", "store_mb_s"), r))
                                                       for r in lines]}
    path = Path(args.json) if args.json else Path("bench/results") / \
        f"dataset_dask-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
