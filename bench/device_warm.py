"""python -m bench.device_warm [--methods M,...] [--cases C,...] [--jobs N]

Compiles, in parallel processes, the sparse kernel's specialisations that the benchmark's methods will use,
into Numba's file cache under CLEARMAPS_CACHE_DIR. The timed steps of bench/device.sh then load them instead
of compiling them one after another (5-15 s each, single-threaded). Prints each specialisation with the
seconds its first launch took: that is the compile time a user's first call pays for a new layer shape.

How it finds them: each method's routing (``setup.knobs`` in bench/methods_cuda.py) runs the network once,
on a small batch, with the sparse kernel's launcher replaced by a recorder that zero-fills the output (only
shapes matter here). Each distinct specialisation is then replayed in a worker process through the real
launcher, on zero inputs of the recorded shapes, so the worker compiles exactly the signature the
benchmark's own call looks up. Runs under the simulator too (NUMBA_ENABLE_CUDASIM=1), without caching.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

from .cases import make_case
from .harness import METHODS
from .run import load_methods

# the networks of the GPU benchmark's cases, at sizes that are quick to run: the kernels a layer needs
# depend on its channels, kernel, padding and pool, not on the image size or the batch
DEFAULT_CASES = "allcnn-mnist,vgg16-fcn-64"
DEFAULT_METHODS = "cuda,cuda-gemm,cuda-fast,cuda-fast-tc,cuda-rows,cuda-eager"
KNOB_NAMES = ("TILE_ROWS", "TILE_COLS", "MAX_CHANNELS_PER_THREAD", "EAGER_OFFSETS")  # what the launcher reads


def record(methods, cases) -> dict:
    """{specialisation name: the launcher call that compiles it (shapes, geometry, knobs)}."""
    from clearmaps.kernels import cuda as kc
    from clearmaps.kernels.cuda import backend, sparse_kernels as sk

    from .methods_cuda import ways

    calls = {}
    real = backend._launch_sparse

    def recorder(src, offsets, weight, bias, out, kernel, padding, pool, b0, kcount, rect):
        I = out.shape[0]
        cpt = sk.channels_per_thread(I)
        tile = sk.tile_shape(pool)
        name = sk.kernel_name(*kernel, *padding, pool, sk.block_threads(I, cpt), bias is not None, tile, cpt,
                              sk.EAGER_OFFSETS)
        calls.setdefault(name, dict(
            src=tuple(src.shape), offsets=None if offsets is None else tuple(offsets.shape),
            weight=tuple(weight.shape), bias=None if bias is None else tuple(bias.shape), out=tuple(out.shape),
            kernel=tuple(kernel), padding=tuple(padding), pool=pool, b0=b0, kc=kcount, rect=rect,
            knobs={k: getattr(sk, k) for k in KNOB_NAMES}))
        out[...] = 0

    backend._launch_sparse = recorder
    try:
        for case in cases:
            x = backend.xp.asarray(case.x[:1])  # one image: the batch does not change the kernels
            for method in methods:
                setup = METHODS[method].setup
                with ways(**setup.knobs):
                    trace = kc.forward(case.net, x, fast=setup.fast)
                    kc.clear_from_trace(case.net, trace, case.classes[:1], keep_responses=False, fast=setup.fast)
    finally:
        backend._launch_sparse = real
    return calls


def compile_one(item):
    """Worker: one launch of the real launcher on zero inputs; (name, seconds, error or None)."""
    name, call = item
    from clearmaps.kernels.cuda import backend, sparse_kernels as sk

    xp = backend.xp
    for k, v in call["knobs"].items():
        setattr(sk, k, v)

    def zeros(shape, dtype, one=False):  # one: a single signal (src and out are (C, n, H, W))
        return None if shape is None else xp.zeros((shape[0], 1, *shape[2:]) if one else shape, dtype=dtype)

    t = time.perf_counter()
    try:
        backend._launch_sparse(zeros(call["src"], "float32", True), zeros(call["offsets"], "int32"),
                               zeros(call["weight"], "float32"), zeros(call["bias"], "float32"),
                               zeros(call["out"], "float32", True), call["kernel"], call["padding"], call["pool"],
                               call["b0"], call["kc"], call["rect"])
        if xp.__name__ == "cupy":
            xp.cuda.runtime.deviceSynchronize()
    except Exception as exc:  # reported, not raised: the timed step then compiles it itself
        return name, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"
    return name, time.perf_counter() - t, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = ap.parse_args(argv)
    load_methods()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS or not hasattr(METHODS[m].setup, "knobs")]
    if unknown:
        raise SystemExit(f"device_warm: {', '.join(unknown)} not clearmaps CUDA methods of bench/methods_cuda.py")
    t0 = time.perf_counter()
    calls = record(methods, [make_case(c) for c in args.cases.split(",") if c])
    print(f"{len(calls)} specialisations for {', '.join(methods)} on {args.cases} "
          f"(found in {time.perf_counter() - t0:.1f} s); compiling with {args.jobs} processes", flush=True)
    t1 = time.perf_counter()
    failed = 0
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, max(1, len(calls)))) as pool:
        for name, seconds, error in pool.imap_unordered(compile_one, sorted(calls.items())):
            failed += error is not None
            print(f"  {seconds:6.1f} s  {name}" + (f"  FAILED {error}" if error else ""), flush=True)
    print(f"compiled in {time.perf_counter() - t1:.1f} s wall; cache: "
          f"{os.environ.get('CLEARMAPS_CACHE_DIR', '(default)')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
