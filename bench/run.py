"""Run the CLEAR benchmarks: every method on the same cases in one process, a ratio table, JSON beside it.

    python -m bench.run                                  # all cases, every CPU method
    python -m bench.run --cases allcnn-mnist --methods cpu,torch --repeats 10
    python -m bench.run --device cuda                    # the CUDA methods (bench/methods_cuda.py)

Run from the repository root. Methods live in bench/methods_*.py and register themselves (harness.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import harness
from .cases import SPECS, describe, make_case
from .harness import METHODS, Output, fmt_bytes

METHOD_MODULES = ("bench.methods_cpu", "bench.methods_cuda")


def load_methods():
    for name in METHOD_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside an existing module is a real error
                raise


def oracle(case, log=print) -> Output:
    """The float64 truth for a case: the plain-torch deconvnet in float64 (fast enough for every case),
    first checked against the NumPy reference on the case's first image when the case is small."""
    import torch

    from clearmaps import reference as ref

    from .torch_deconvnet import TorchDeconvnet

    model = TorchDeconvnet(case.net64, torch.float64)
    x64, classes = torch.from_numpy(case.x.astype(np.float64)), torch.from_numpy(case.classes)
    t0 = time.perf_counter()
    with torch.inference_mode():
        r, _ = model.responses(x64, classes)
        switches = {i: s.numpy() for i, s in model.forward(x64)[2].items()}
    r = r.numpy()
    log(f"  oracle (torch float64): {time.perf_counter() - t0:.1f} s")
    if case.spec.small:
        x1 = case.x[:1].astype(np.float64)
        want = ref.reduce_channels(ref.backproject(case.net64, ref.forward(case.net64, x1), case.classes[:1]))
        err = harness.rel_err(r[:1], want)
        log(f"  torch float64 deconvnet vs NumPy reference on image 0: relative error {err:.1e}")
        if not err <= 1e-10:
            raise SystemExit(f"the torch deconvnet disagrees with the reference ({err:.1e}); fix it before timing")
    def through(sw) -> Output:
        with torch.inference_mode():
            rs, _ = model.responses(x64, classes, switches={i: torch.from_numpy(np.asarray(v)) for i, v in sw.items()})
        rs = rs.numpy()
        i_, d_ = ref.dominant(rs)
        return Output(i_, d_, ref.compose(i_, d_, num_classes=case.num_maps), rs)

    index, response = ref.dominant(r)
    rgb = ref.compose(index, response, num_classes=case.num_maps)
    return Output(index, response, rgb, r, switches=switches, with_switches=through)


def machine() -> dict:
    import numba
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="allcnn-mnist,vgg16-fcn-64,vgg16-fcn",
                   help=f"comma-separated, from {', '.join(SPECS)}")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all for --device)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "all"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", action="append", default=[], metavar="ARCH=PATH",
                   help="trained weights for a preset instead of seeded random ones")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/<time>.json)")
    args = p.parse_args(argv)

    load_methods()
    names = args.methods.split(",") if args.methods else [
        m.name for m in METHODS.values() if args.device == "all" or m.device == args.device
        or (args.device == "cuda" and m.baseline and m.name == "torch")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    info = machine()
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
    report = {"machine": info, "argv": sys.argv[1:], "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "cases": []}
    text = []
    for case_name in args.cases.split(","):
        spec = SPECS.get(case_name)
        case = make_case(case_name, args.seed, checkpoints.get(spec.arch) if spec else None)
        title = (f"### {case.name}: batch {case.batch}, {case.x.shape[1]}×{case.x.shape[2]}×{case.x.shape[3]}, "
                 f"{describe(case.net)}, {case.flops['total'] / 1e9:.2f} GFLOP counted "
                 f"({'checkpoint' if spec.arch in checkpoints else f'random weights, seed {args.seed}'})")
        print("\n" + title)
        truth = oracle(case)
        results = harness.run_methods([METHODS[n] for n in names], case, truth, args.repeats, args.warmup)
        for r in results:
            if r.median_s:
                print(f"  {r.method}: median {1e3 * r.median_s:.1f} ms ({r.per_image_ms(case.batch):.3f} ms/image) "
                      f"over {len(r.times_s)} runs")
            if r.extra:
                print(f"    {r.extra}")
            if r.memory:
                m = r.memory
                print(f"    peak memory after the forward pass: composite only {fmt_bytes(m.get('composite_only_bytes'))}"
                      f", keeping all K maps {fmt_bytes(m.get('all_maps_bytes'))} (the maps alone: "
                      f"{fmt_bytes(m.get('maps_array_bytes'))}); forward pass {fmt_bytes(m.get('forward_bytes'))}; "
                      f"{m.get('how')}")
        tab = harness.table(case, results)
        print("\n" + tab)
        text += [title, "", tab, ""]
        report["cases"].append({"case": case.name, "batch": case.batch, "shape": list(case.x.shape),
                                "classes": case.num_maps, "flops": case.flops,
                                "results": [r.__dict__ for r in results]})
        failed = [r.method for r in results if r.status in ("wrong", "error")]
        if failed:
            print(f"  FAILED on {case.name}: {failed}")
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / (
        time.strftime("%Y%m%d-%H%M%S") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float))
    path.with_suffix(".md").write_text("\n".join(text))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    if any(r["status"] in ("wrong", "error") for c in report["cases"] for r in c["results"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
