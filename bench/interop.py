"""What crossing frameworks costs, and what torch's forward pass saves (one process, same inputs).

    python bench/interop.py [--batch 8] [--repeats 5] [--json out.json]

Rows:
  crossing    a float32 image batch → NumPy view, and responses → tensor (DLPack), against copying
  forward     the forward pass with switches: reference NumPy vs torch's kernels (clearmaps.torch.trace)
  explain     clearmaps.explain on NumPy vs on a torch tensor (the same backend: the crossing overhead),
              and clearmaps.torch.explain (torch forward + the backend's back-projection)

On allcnn-mnist (28×28×1, 10 classes, random weights). Results are checked equal before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import clearmaps
import clearmaps.torch as ct
from clearmaps import interop, reference


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = clearmaps.build_module("allcnn-mnist").eval()
    net = ct.network_for(module)
    x = torch.randn(args.batch, 1, 28, 28)
    x_np = x.numpy().copy()
    # crossing is measured on a VGG-sized batch, where a copy would show
    big = torch.randn(32, 3, 224, 224)
    caller = interop.caller_of(big)
    result = np.zeros((32, 10, 224, 224), np.float32)  # the size of 32 images' responses for 10 classes

    # correctness first: the three explain paths agree
    a = clearmaps.explain(net, x_np, backend=args.backend)
    b = clearmaps.explain(net, x, backend=args.backend)
    c = ct.explain(module, x, backend=args.backend)
    assert np.array_equal(a.rgb, b.rgb.numpy())
    agree = float((c.dominant_class.numpy() == a.dominant_class).mean())
    assert agree > 0.99, agree

    rows = {
        "crossing: 19 MB tensor -> NumPy view (DLPack)": median_time(lambda: caller.to_backend(big), 20),
        "crossing: 19 MB tensor -> NumPy copy": median_time(lambda: big.numpy().copy(), 20),
        "crossing: 64 MB NumPy -> tensor (DLPack)": median_time(lambda: caller.to_caller(result), 20),
        "crossing: 64 MB NumPy -> tensor copy": median_time(lambda: torch.tensor(result), 20),
        "forward: reference (NumPy, float64)": median_time(lambda: reference.forward(net, x_np), args.repeats),
        "forward: torch kernels (clearmaps.torch.trace)": median_time(lambda: ct.trace(net, x), args.repeats),
        **({} if args.backend == "reference" else {f"forward: {args.backend} backend": median_time(
            lambda: clearmaps.get_backend(args.backend).forward(net, x_np), args.repeats)}),
        f"explain: NumPy images ({args.backend})": median_time(
            lambda: clearmaps.explain(net, x_np, backend=args.backend), args.repeats),
        f"explain: torch images ({args.backend})": median_time(
            lambda: clearmaps.explain(net, x, backend=args.backend), args.repeats),
        f"clearmaps.torch.explain ({args.backend})": median_time(
            lambda: ct.explain(module, x, backend=args.backend), args.repeats),
    }
    base_fwd = rows["forward: reference (NumPy, float64)"]
    base_explain = rows[f"explain: NumPy images ({args.backend})"]
    print(f"allcnn-mnist, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"dominant class agreement torch-forward vs NumPy path {agree:.4f}")
    print(f"{'what':52s} {'median':>12s} {'ratio':>8s}")
    for name, seconds in rows.items():
        base = base_fwd if name.startswith("forward") else base_explain if "explain" in name else None
        ratio = f"{base / seconds:7.1f}x" if base else ""
        print(f"{name:52s} {seconds * 1e3:10.3f}ms {ratio:>8s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "backend": args.backend, "seconds": rows, "agreement": agree}, f,
                      indent=1)


if __name__ == "__main__":
    main()
