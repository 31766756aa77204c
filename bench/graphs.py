"""The graph benchmarks (issues 16 and 17): the CNNs people train, every response method, in one process.

    python -m bench.graphs                              # resnet50 and mobilenet_v2, 224x224, batch 1, top-10
    python -m bench.graphs --archs resnet50 --repeats 7 --methods deconvnet,guided

Per architecture (full size, 1000 classes, random seeded weights from tests/archs.py, float32, one seeded
image), every method times the whole computation of the maps of the image's top-10 classes, forward pass
included:

- ``clearmaps cpu <method>``: ``clearmaps.explain(net, x, classes="top10", backend="cpu", method=...,
  keep_responses=False)`` — the maps, the dominant class and response and the RGB composite;
- ``plain torch``: the best plain torch a careful user would write (bench/torch_graph.py): one forward, the
  K backward passes with the deconvnet ReLU as one ``vmap`` of the VJP; its R(x|c) maps only (no composite);
- ``captum``: Captum's ``Deconvolution``, one ``attribute`` call per class, on x ↦ E_c.

Correctness first: clearmaps' deconvnet R(x|c) against plain torch in float64 on the same image (relative
error printed; a float32 deep net differs from float64 by rounding-driven rectification flips, ~1e-6 here).
Then one warm-up call each and ``--repeats`` rounds, the methods interleaved round by round (the machine is
shared: a load change hits every method alike), medians reported, with ratios: cpu / plain torch and
cpu / Captum for the deconvnet, and each method against the deconvnet on the same backend. JSON beside it
(``bench/results/graphs-<time>.json``, ignored by git). The conversion (torch.export) is timed apart: it is
paid once per model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import clearmaps
from clearmaps import reference as ref


def _median_rounds(calls: dict, repeats: int) -> dict:
    for f in calls.values():  # warm-up (Numba compiles or loads its cache; torch allocates)
        f()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            time.sleep(0.2)  # let the previous method's thread pool go quiet
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_arch(name: str, methods, repeats: int, k: int = 10, with_peers: bool = True) -> dict:
    from tests import archs

    from .torch_graph import CaptumDeconvnet, PlainTorchDeconvnet, captum_available

    model = archs.build(name, 1000)
    head = archs.HEADS[name]
    x = archs.example_input(name, 1, tiny=False, seed=1, dtype=torch.float32)
    t0 = time.perf_counter()
    net = clearmaps.from_torch(model, input_shape=tuple(x.shape[1:]))
    convert = time.perf_counter() - t0
    xn = x.numpy()
    with torch.no_grad():
        ids = torch.topk(model(x), k, dim=1).indices
    # correctness: clearmaps' deconvnet maps against plain torch in float64
    cpu = clearmaps.get_backend("cpu")
    got = cpu.backproject(net, cpu.forward(net, xn), ids.numpy())
    want = PlainTorchDeconvnet(model, head, "vmap", torch.float64).responses(x.double(), ids).numpy()
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    calls = {f"clearmaps cpu {m}": (lambda m=m: clearmaps.explain(net, xn, classes=f"top{k}", backend="cpu",
                                                                  method=m, keep_responses=False))
             for m in methods}
    if with_peers:
        plain = PlainTorchDeconvnet(model, head, "vmap")
        calls["plain torch (deconvnet)"] = lambda: plain.responses(x, ids)
        if captum_available() is None:
            captum = CaptumDeconvnet(model, head)
            calls["captum (deconvnet)"] = lambda: captum.responses(x, ids)
    medians = _median_rounds(calls, repeats)
    return {"arch": name, "input": list(x.shape), "classes": k, "convert_s": convert, "rel_err_vs_torch_f64": err,
            "median_s": medians, "nodes": len(net.layers)}


def _ratio(a, b):
    return f"{b / a:.2f}×" if a and b else "–"


def report(result: dict) -> str:
    m = result["median_s"]
    base = m.get("clearmaps cpu deconvnet")
    lines = [f"### {result['arch']} {tuple(result['input'][1:])}, batch 1, top-{result['classes']} "
             f"({result['nodes']} nodes; conversion {result['convert_s']:.1f} s once; deconvnet vs torch float64: "
             f"relative error {result['rel_err_vs_torch_f64']:.1e})", "",
             "| method | s / image | × plain torch | × Captum | ÷ deconvnet (same backend) |", "| --- | --- | --- | --- | --- |"]
    torch_t, captum_t = m.get("plain torch (deconvnet)"), m.get("captum (deconvnet)")
    for name, t in m.items():
        own = name.startswith("clearmaps")
        lines.append(f"| {name} | {t:.3f} | {_ratio(t, torch_t) if own else ''} | {_ratio(t, captum_t) if own else ''} "
                     f"| {f'{t / base:.2f}' if own and base else ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="resnet50,mobilenet_v2")
    p.add_argument("--methods", default=",".join(ref.METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-peers", action="store_true", help="time clearmaps only")
    p.add_argument("--json", help="where to write the results (default bench/results/graphs-<time>.json)")
    args = p.parse_args(argv)
    methods = [ref.check_method(m)[0] for m in args.methods.split(",")]
    info = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"machine: {info}")
    results = []
    for name in args.archs.split(","):
        r = bench_arch(name.strip(), methods, args.repeats, with_peers=not args.no_peers)
        results.append(r)
        print(report(r), "\n", flush=True)
    out = Path(args.json) if args.json else Path("bench/results") / (
        "graphs-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
