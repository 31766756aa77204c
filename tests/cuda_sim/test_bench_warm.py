"""bench/device_warm.py compiles, before a GPU benchmark, exactly the sparse-kernel specialisations the timed
methods will use: what it records must be what the pipeline builds, and each replay must launch."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from clearmaps.kernels import cuda as kc
from clearmaps.kernels.cuda import backend
from clearmaps.kernels.cuda import sparse_kernels as sk
from clearmaps.reference import Conv, MaxPool, Network, ReLU


def _case():
    rng = np.random.default_rng(3)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    # a dense 16 -> 20 conv (sparse forward and back), a conv behind a 2x2 pool, a 1x1 head
    net = Network([conv(2, 16), ReLU(), conv(16, 20), ReLU(), MaxPool(2), conv(20, 33), ReLU(),
                   conv(33, 3, 1, 0)])
    x = rng.uniform(size=(1, 2, 8, 8))
    return SimpleNamespace(net=net, x=x, classes=np.array([[0, 2]]))


def test_warm_records_what_the_pipeline_builds_and_replays_it(monkeypatch):
    from bench import device_warm
    from bench.harness import METHODS
    from bench.methods_cuda import ways
    from bench.run import load_methods

    load_methods()
    case = _case()
    methods = ["cuda", "cuda-gemm", "cuda-cpt1", "cuda-8x8", "cuda-eager"]
    calls = device_warm.record(methods, [case])

    built = set()
    real = sk.sparse_transpose

    def building(*args):
        built.add(sk.kernel_name(*args))
        return real(*args)

    monkeypatch.setattr(sk, "sparse_transpose", building)
    for method in methods:
        setup = METHODS[method].setup
        with ways(**setup.knobs):
            kc.clear_from_trace(case.net, kc.forward(case.net, case.x), case.classes, keep_responses=False)
    assert built and set(calls) == built
    tiles = {re.search(r"_t\d+x\d+_(\d+x\d+)", name).group(1) for name in built}
    assert tiles == {"4x8", "8x8"}, tiles
    assert any(name.endswith("_eager") for name in built)  # the knob reaches the recorded names
    assert backend._launch_sparse.__name__ == "_launch_sparse", "the recorder was left in place"

    monkeypatch.setattr(sk, "sparse_transpose", real)
    for knob in device_warm.KNOB_NAMES:  # compile_one sets them: restored after the test
        monkeypatch.setattr(sk, knob, getattr(sk, knob))
    for item in sorted(calls.items()):
        name, seconds, error = device_warm.compile_one(item)
        assert error is None, f"{name}: {error}"
