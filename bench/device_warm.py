"""python -m bench.device_warm [--methods M,...] [--cases C,...] [--jobs N]

Compiles, in parallel processes, the sparse kernel's specialisations that the benchmark's methods will use,
into Numba's file cache under CLEARMAPS_CACHE_DIR: clearmaps.kernels.cuda.warm's recording and workers
(kernels/cuda/warmup.py), over every method's configuration (``setup.config()`` in bench/methods_cuda.py:
its routing settings and lab variants) and every case's network. The timed steps of bench/device.sh then load them instead of compiling them one after
another (5-15 s each, single-threaded). Prints each specialisation with the seconds its first launch took:
that is the compile time a user's first call pays for a new layer shape. Runs under the simulator too
(NUMBA_ENABLE_CUDASIM=1), without caching.
"""

from __future__ import annotations

import argparse
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


def record(methods, cases) -> dict:
    """{specialisation name: the launch that compiles it} over the methods' configurations and the cases'
    networks: clearmaps.kernels.cuda.warmup.record with each method's configuration."""
    from clearmaps.kernels.cuda import warmup

    calls = {}
    for case in cases:
        for method in methods:
            config = METHODS[method].setup.config()
            for name, call in warmup.record(case.net, case.x, config=config).items():
                calls.setdefault(name, call)
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = ap.parse_args(argv)
    load_methods()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS or not hasattr(METHODS[m].setup, "config")]
    if unknown:
        raise SystemExit(f"device_warm: {', '.join(unknown)} not clearmaps CUDA methods of bench/methods_cuda.py")
    t0 = time.perf_counter()
    calls = record(methods, [make_case(c) for c in args.cases.split(",") if c])
    print(f"{len(calls)} specialisations for {', '.join(methods)} on {args.cases} "
          f"(found in {time.perf_counter() - t0:.1f} s); compiling with {args.jobs} processes", flush=True)
    from clearmaps.kernels.cuda import warmup

    t1 = time.perf_counter()
    failed = 0
    for name, seconds, error in warmup.compile_all(calls, args.jobs):
        failed += error is not None
        print(f"  {seconds:6.1f} s  {name}" + (f"  FAILED {error}" if error else ""), flush=True)
    print(f"compiled in {time.perf_counter() - t1:.1f} s wall; cache: "
          f"{os.environ.get('CLEARMAPS_CACHE_DIR', '(default)')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
