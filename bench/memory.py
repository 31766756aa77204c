"""Peak memory of a composite-only ``explain`` against the batch size (issue 20): one fresh process per size.

    python -m bench.memory                              # 512 and 8,192 MNIST-sized images, backend cpu
    python -m bench.memory --sizes 512 2048 8192 --backend reference --json mem.json

Each size runs in its own process (peak RSS never goes down within a process, so sizes cannot share one):
the child imports clearmaps, loads the built-in MNIST model, builds the batch (real held-out digits,
repeated to the size), runs ``explain(..., keep_responses=False)`` once on 64 images to load or compile the
backend, then once on the whole batch, and reports

- ``peak``: the process's peak resident set (``ru_maxrss``) at the end, everything included;
- ``before``: its resident set just before the whole-batch call (libraries, model, inputs, warm backend);
- ``explain``: peak minus before, what the call itself added at its highest;
- ``outputs``: the bytes of what the call returns (rgb, dominant class and response, logits), which
  grow with the batch whatever the chunking.

The parent prints a table and the ratio of the largest size's peak to the smallest's; issue 20 asks for
8,192 images within 1.5x of 512 (a flat peak: the batch is processed in chunks sized to memory, so only
the inputs and the returned arrays grow). Not a timed test: run it by hand, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def child(n: int, backend: str) -> dict:
    import numpy as np

    import clearmaps
    from clearmaps import builtin

    net = builtin.load_model()
    digits, _ = builtin.heldout()
    x = builtin.to_input(np.resize(digits, (n, *digits.shape[1:])))
    clearmaps.explain(net, x[:64], backend=backend, keep_responses=False)  # load / compile the backend
    before = _rss_bytes()
    t0 = time.perf_counter()
    e = clearmaps.explain(net, x, backend=backend, keep_responses=False)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes()
    outputs = sum(int(np.asarray(a).nbytes) for a in (e.rgb, e.dominant_class, e.dominant_response, e.logits,
                                                       e.probabilities, e.classes))
    assert e.responses is None and e.rgb.shape == (n, 28, 28, 3)
    return {"images": n, "backend": backend, "peak": peak, "before": before, "explain": max(0, peak - before),
            "outputs": outputs, "inputs": int(x.nbytes), "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 8192], help="batch sizes (default 512 8192)")
    p.add_argument("--backend", default="cpu", choices=("reference", "cpu", "cuda", "auto"))
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.backend)))
        return 0
    rows = []
    for n in args.sizes:
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(n), "--backend", args.backend],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 1 << 20
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"explain(..., backend={args.backend!r}, keep_responses=False) on MNIST-sized images, one process per size\n")
    print("| images | peak RSS MiB | RSS before MiB | explain's own peak MiB | outputs MiB | inputs MiB | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['images']:,} | {r['peak'] / mib:.0f} | {r['before'] / mib:.0f} | {r['explain'] / mib:.0f} | "
              f"{r['outputs'] / mib:.1f} | {r['inputs'] / mib:.1f} | {r['seconds']:.1f} |")
    small, large = rows[0], rows[-1]
    ratio = large["peak"] / small["peak"]
    print(f"\npeak RSS ratio {large['images']:,} / {small['images']:,} images: {ratio:.2f} "
          f"(issue 20 asks for at most 1.5); explain's own peak ratio: "
          f"{large['explain'] / max(small['explain'], 1):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
