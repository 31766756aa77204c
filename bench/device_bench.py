"""The GPU benchmark (run by bench/device.sh on the GPU machine): the issue's two cases, every CUDA method,
one process, a ratio table, JSON beside it.

    python -m bench.device_bench --out DIR [--cases allcnn-mnist-b1024,vgg16-fcn-b8] [--repeats 5]

Cases: allcnn-mnist at batch 1024 and vgg16-fcn at 224x224, batch 8, ten classes each (registered here
beside bench/cases.py's CPU-sized ones). The float64 oracle is the plain-torch deconvnet in float64 ON THE
GPU (the CPU oracle of bench/run.py would take minutes at these sizes; it is itself checked against the
NumPy reference on one small image first). Before the methods it measures the two ceilings (device copy
bandwidth, fp32 and TF32 GEMM rates through the GEMM the backend uses); after them, a per-layer time
breakdown of the clearmaps methods from CUDA events.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import cases, harness
from .cases import CaseSpec, describe, make_case
from .harness import METHODS, Output, fmt_bytes
from .run import load_methods, machine

GPU_CASES = {
    "allcnn-mnist-b1024": CaseSpec("allcnn-mnist-b1024", "allcnn-mnist", 1024, (28, 28), False),
    "vgg16-fcn-b8": CaseSpec("vgg16-fcn-b8", "vgg16-fcn", 8, (224, 224), False),
}
DEFAULT_METHODS = "captum-cuda,torch-cuda,torch-cuda-tf32,cuda,cuda-direct,cuda-fast"


def gpu_oracle(case, log=print) -> Output:
    """float64 R(x|c) from the plain-torch deconvnet on the GPU, checked against the NumPy reference on a
    small image of the same network first."""
    import torch

    from clearmaps import reference as ref

    from .torch_deconvnet import TorchDeconvnet

    model = TorchDeconvnet(case.net64, torch.float64, "cuda")
    size = case.net.input_shape[1:] if case.net.input_shape[1] is not None else (32, 32)
    small = np.random.default_rng(1).uniform(size=(1, case.net.in_channels, *size))
    with torch.inference_mode():
        r_small, _ = model.responses(torch.from_numpy(small).cuda(), torch.from_numpy(case.classes[:1]).cuda())
    want = ref.reduce_channels(ref.backproject(case.net64, ref.forward(case.net64, small), case.classes[:1]))
    err = harness.rel_err(r_small.cpu().numpy(), want)
    log(f"  GPU float64 torch deconvnet vs NumPy reference on a {size[0]}x{size[1]} image: relative error {err:.1e}")
    if not err <= 1e-10:
        raise SystemExit(f"the float64 GPU oracle disagrees with the reference ({err:.1e})")
    t0 = time.perf_counter()
    with torch.inference_mode():
        r, _ = model.responses(torch.from_numpy(case.x.astype(np.float64)).cuda(),
                               torch.from_numpy(case.classes).cuda())
    r = r.cpu().numpy()
    log(f"  oracle (torch float64 on the GPU): {time.perf_counter() - t0:.1f} s")
    del model
    torch.cuda.empty_cache()
    index, response = ref.dominant(r)
    return Output(index, response, ref.compose(index, response, num_classes=case.num_maps), r)


def _event_time(fn, repeats=5):
    import cupy as cp

    fn()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


def ceilings(log=print) -> dict:
    """The two measured ceilings: device-to-device copy (bytes read + written per second) and the GEMM
    rate of the backend's own cuBLAS call, fp32 and TF32, at a large square size and at the skinny shape
    of a 64-channel transposed conv."""
    import cupy as cp

    from clearmaps.kernels.cuda.device import gemm_into

    out = {}
    a = cp.random.random(1 << 28, dtype=cp.float32)  # 1 GiB
    b = cp.empty_like(a)
    t = _event_time(lambda: b.__setitem__(slice(None), a))
    out["copy_GBps"] = 2 * a.nbytes / t / 1e9
    del a, b
    for name, (M, K, N) in {"square": (8192, 8192, 8192), "conv64": (64, 576, 1 << 20),
                            "conv512": (512, 4608, 1 << 16)}.items():
        A = cp.random.standard_normal((M, K), dtype=cp.float32)
        B = cp.random.standard_normal((K, N), dtype=cp.float32)
        C = cp.empty((M, N), dtype=cp.float32)
        for fast in (False, True):
            t = _event_time(lambda: gemm_into(A, B, C, 0, fast))
            out[f"gemm_{name}_{'tf32' if fast else 'fp32'}_TFLOPs"] = 2 * M * K * N / t / 1e12
        del A, B, C
    cp.get_default_memory_pool().free_all_blocks()
    log("  ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def breakdown(case, fast: bool, limit=None, log=print) -> list:
    """Per-step GPU time of one clearmaps run (CUDA events between the steps), milliseconds."""
    import cupy as cp

    from clearmaps.kernels import cuda as kc
    from clearmaps.kernels.cuda import backend

    from .methods_cuda import direct_max

    x = cp.asarray(case.x)
    with direct_max(limit):
        kc.clear_from_trace(case.net, kc.forward(case.net, x, fast=fast), case.classes, keep_responses=False,
                            fast=fast)
        cp.cuda.runtime.deviceSynchronize()
        backend.TIMELINE = []
        try:
            kc.clear_from_trace(case.net, kc.forward(case.net, x, fast=fast), case.classes, keep_responses=False,
                                fast=fast)
            cp.cuda.runtime.deviceSynchronize()
            marks = backend.TIMELINE
        finally:
            backend.TIMELINE = None
    steps = [(label, cp.cuda.get_elapsed_time(prev, ev)) for (_, prev), (label, ev) in zip(marks, marks[1:])]
    total = cp.cuda.get_elapsed_time(marks[0][1], marks[-1][1])
    log(f"  breakdown {'fast' if fast else 'exact'}{'' if limit is None else f', direct <= {limit}'} "
        f"({total:.2f} ms between the first and last mark):")
    for label, ms in steps:
        log(f"    {label:<40s} {ms:8.3f} ms")
    return [{"step": label, "ms": ms} for label, ms in steps]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(GPU_CASES))
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    cases.SPECS.update(GPU_CASES)
    load_methods()
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    report = {"machine": info, "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "ceilings": ceilings(), "cases": []}
    tables = []
    for case_name in args.cases.split(","):
        case = make_case(case_name, args.seed)
        title = (f"### {case.name}: batch {case.batch}, {case.x.shape[1]}×{case.x.shape[2]}×{case.x.shape[3]}, "
                 f"{describe(case.net)}, {case.flops['total'] / 1e9:.1f} GFLOP counted, {info.get('gpu')}")
        print("\n" + title, flush=True)
        truth = gpu_oracle(case)
        results = []
        for name in names:
            print(f"  {name} ...", flush=True)
            r = harness.run_method(METHODS[name], case, truth, args.repeats, args.warmup)
            results.append(r)
            if r.median_s:
                print(f"    first call {r.first_call_s:.2f} s, median {1e3 * r.median_s:.2f} ms, "
                      f"{case.batch / r.median_s:.0f} images/s; check {r.check}", flush=True)
            else:
                print(f"    {r.status}: {r.why}; check {r.check}", flush=True)
            if r.memory:
                print(f"    peak memory: composite only {fmt_bytes(r.memory.get('composite_only_bytes'))}, "
                      f"all K maps {fmt_bytes(r.memory.get('all_maps_bytes'))}", flush=True)
        steps = {}
        for method, fast, limit in (("cuda", False, None), ("cuda-direct", False, 64), ("cuda-fast", True, None)):
            if any(r.method == method and r.median_s for r in results):
                steps[method] = breakdown(case, fast, limit)
        tab = harness.table(case, results)
        tables += [title, "", tab, ""]
        report["cases"].append({"case": case.name, "batch": case.batch, "shape": list(case.x.shape),
                                "classes": case.num_maps, "flops": case.flops, "breakdown": steps,
                                "results": [r.__dict__ for r in results]})
        (out_dir / "bench.json").write_text(json.dumps(report, indent=1, default=float))
    (out_dir / "bench.md").write_text("\n".join(tables))
    print("\n" + "\n".join(tables))
    bad = [(c["case"], r["method"]) for c in report["cases"] for r in c["results"] if r["status"] in ("wrong", "error")]
    if bad:
        print(f"FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
