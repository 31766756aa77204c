"""Where the cpu backend's time goes: the forward pass layer by layer, the back-projection step by step.

    python -m bench.profile_cpu                          # allcnn-mnist, batch 64, 10 classes
    python -m bench.profile_cpu --case vgg16-fcn-64 --repeats 3

Forward layers are timed one at a time on the activations the previous layers produced. The back-projection
is timed as a growing plan: the first step alone, the first two, ... (each for every (image, class) pair,
as ``attentive_dominant`` runs them), and a step's time is the difference between consecutive prefixes — the
kernels chain through per-worker buffers, so a step cannot be run alone on the right data. Each time is the
minimum over ``--repeats`` runs (this machine is shared; the minimum is the least disturbed). Differences of
noisy minima can come out slightly negative for a cheap step: read them to ±10%.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from clearmaps.kernels import _cpu_kernels as K
from clearmaps.kernels import cpu
from clearmaps.reference import Conv, MaxPool, ReLU

from .cases import SPECS, describe, make_case

_STEP_NAMES = {K.HEAD: "head (transposed, per class)", K.CONV_T: "transposed conv",
               K.CONV_T_POOLED: "unpool + rectify + transposed conv (fused)", K.UNPOOL: "unpool",
               K.RECTIFY: "rectify", K.CONV_T_FEW: "transposed conv to few channels",
               K.HEAD_FOLDED: "folded head (1x1 head + ReLU + conv below)"}


def _best_ms(fn, repeats: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def profile(case_name: str, repeats: int) -> None:
    case = make_case(case_name)
    net, x = case.net, case.x
    print(f"{case_name}: batch {case.batch}, {case.num_maps} classes; {describe(net)}; "
          f"numba threads {numba.get_num_threads()}")
    total = _best_ms(lambda: cpu.forward(net, x), repeats)
    print(f"\nforward pass {total:.1f} ms (whole), per layer:")
    prep = cpu._prepared(net)
    a = np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):
            ms = _best_ms(lambda: cpu._conv_nhwc(a, layer, *prep.fwd[i]), repeats)
            kind = "dense" if a.shape[3] < cpu._DENSE_BELOW else f"sparse, {np.mean(a == 0):.0%} zeros in"
            print(f"  {i:3d} conv {a.shape[3]:4d} -> {layer.out_channels:4d} at {a.shape[1]}x{a.shape[2]} "
                  f"({kind}): {ms:7.2f} ms")
            a = cpu._conv_nhwc(a, layer, *prep.fwd[i])
        elif isinstance(layer, ReLU):
            ms = _best_ms(lambda: np.maximum(a, 0), repeats)
            print(f"  {i:3d} relu: {ms:7.2f} ms")
            np.maximum(a, 0, out=a)
        elif isinstance(layer, MaxPool):
            ms = _best_ms(lambda: cpu._pool_nhwc(a, layer), repeats)
            print(f"  {i:3d} max pool with switches: {ms:7.2f} ms")
            a, _ = cpu._pool_nhwc(a, layer)
    trace = cpu.forward(net, x)
    job = cpu._Job(net, trace, case.classes, True)
    steps = job.steps.copy()
    pairs, n = len(job.pairs), job.H * job.W
    out = np.empty((pairs, n), np.float32)
    whole = _best_ms(lambda: cpu.attentive_dominant(net, trace, case.classes, True, "sum", False), repeats)
    print(f"\nback-projection + dominant class, composite only: {whole:.1f} ms for {pairs} (image, class) "
          f"pairs; per plan step (prefix differences):")
    previous = 0.0
    for s in range(1, len(steps) + 1):
        job.steps = steps[:s]
        ms = _best_ms(lambda: job.run(0, pairs, K.REDUCE_SUM, out), repeats)
        row = steps[s - 1]
        print(f"  step {s}: {_STEP_NAMES[int(row[K.F_KIND])]}, {row[K.F_O]} -> {row[K.F_I]} channels at "
              f"{row[K.F_OUT_H]}x{row[K.F_OUT_W]}: {ms - previous:7.1f} ms")
        previous = ms
    print(f"  (all steps: {previous:.1f} ms; the rest of the {whole:.1f} ms is the running argmax and chunking)")
    clear = cpu.clear_from_trace(net, trace, case.classes, keep_responses=False)
    ms = _best_ms(lambda: cpu._compose(clear.dominant_index, clear.dominant_response, np.linspace(0, 0.9, case.num_maps),
                                       None), repeats)
    print(f"\ncolour composite (Eq. 6): {ms:.2f} ms")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="allcnn-mnist", choices=sorted(SPECS))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    profile(args.case, args.repeats)


if __name__ == "__main__":
    main()
