"""clearmaps.kernels.cuda.warm (warmup.py) compiles, in worker processes, exactly the sparse-kernel specialisations a
network's calls will use (bench/device_warm.py does the same over the benchmark's methods): what it records
must be what the pipeline builds, and each replay must launch. Under the simulator nothing is compiled or
cached, but the recording, the workers (spawned, with the simulator on) and the replays all run."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from clearmaps import ClearmapsError
from clearmaps.kernels import cuda as kc
from clearmaps.kernels.cuda import convs
from clearmaps.kernels.cuda import sparse_kernels as sk
from clearmaps.kernels.cuda import warmup
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from .signals import small_net


def _case():
    rng = np.random.default_rng(3)
    net = small_net(rng)
    return SimpleNamespace(net=net, x=rng.uniform(size=(2, 2, 8, 8)), classes=np.array([[0, 2], [1, 0]]))


def _built(monkeypatch):
    """The names of the specialisations sparse_transpose is asked for from now on."""
    built = set()
    real = sk.sparse_transpose

    def building(*args):
        built.add(sk.kernel_name(*args))
        return real(*args)

    monkeypatch.setattr(sk, "sparse_transpose", building)
    return built


def _overlapping():
    """A pool with overlapping windows and a ReLU below it: the 8 -> 16 conv's transposed conv reads the
    unpooled plane through the switches on the sparse kernel without rectification, and goes to columns +
    GEMM with it (summed overlaps, then rectified: routing.sparse_takes). The routes differ with rectify."""
    rng = np.random.default_rng(4)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    net = Network([conv(2, 8), ReLU(), conv(8, 16), ReLU(), MaxPool(3, 2, 1), conv(16, 20), ReLU(),
                   conv(20, 3, 1, 0)])
    return SimpleNamespace(net=net, x=rng.uniform(size=(2, 2, 8, 8)), classes=np.array([[0, 2], [1, 0]]))


@pytest.mark.parametrize("rectify", [True, False], ids=["rectify", "linear"])
@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_warm_records_what_explain_builds(monkeypatch, fast, rectify):
    for case in (_case(), _overlapping()):
        calls = warmup.record(case.net, case.x, fast=fast, rectify=rectify)
        built = _built(monkeypatch)
        kc.clear_from_trace(case.net, kc.forward(case.net, case.x, fast=fast), case.classes, rectify, fast=fast)
        assert built and set(calls) == built
        assert kc.get_config().profiler is None, "the recorder was left in place"
    case = _overlapping()  # rectify reaches the routing: this network needs other kernels without it
    assert set(warmup.record(case.net, case.x, rectify=True)) != set(warmup.record(case.net, case.x, rectify=False))


def test_warm_compiles_each_in_a_worker(monkeypatch):
    """Two spawned workers (they inherit NUMBA_ENABLE_CUDASIM) replay every recorded specialisation. On a
    GPU (bench/device.sh runs this folder there too) this process may have compiled them already in earlier
    tests, which warm() would skip: here nothing counts as built."""
    monkeypatch.setattr(warmup, "_built_here", lambda call: False)
    case = _case()
    want = set(warmup.record(case.net, case.x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = warmup.warm(case.net, case.x, jobs=2)
    assert set(done) == want and len(want) >= 3 and all(s > 0 for s in done.values())


def test_a_specialisation_that_fails_is_a_warning_not_an_error(monkeypatch):
    def broken(self):  # recording never runs a launch; compiling one fails
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(convs.SparseLaunch, "run", broken)
    monkeypatch.setattr(warmup, "_built_here", lambda call: False)
    case = _case()
    with pytest.warns(RuntimeWarning, match="did not compile .*no compiler today"):
        done = warmup.warm(case.net, case.x, jobs=1)
    assert done == {}


def test_a_worker_that_dies_ends_the_pool_instead_of_hanging():
    """A worker killed mid-compile (here it exits: its kernel factory is os._exit) would leave
    multiprocessing.Pool waiting forever; compile_all reports what was left as failed instead."""
    import os

    case = _case()
    calls = warmup.record(case.net, case.x)
    name = sorted(calls)[0]
    calls[name] = dict(calls[name], build=os._exit, spec=(3,))
    results = {n: error for n, _, error in warmup.compile_all(calls, 2)}
    assert set(results) == set(calls)
    assert "stopped" in results[name], results[name]


def test_warm_refuses_bad_arguments():
    case = _case()
    for jobs in (0, -1, 1.5, True, "4"):
        with pytest.raises(ClearmapsError, match="jobs"):
            warmup.warm(case.net, case.x, jobs=jobs)
    for x in (case.x[0], case.x[:0], [1, 2, 3]):
        with pytest.raises(ClearmapsError, match=r"\(B, C, H, W\)"):
            warmup.warm(case.net, x)
    with pytest.raises(ClearmapsError, match="Network"):
        warmup.warm("vgg16", case.x)
    with pytest.raises(ClearmapsError, match="NaN"):
        warmup.warm(case.net, np.full_like(case.x, np.nan))
    assert kc.warm is warmup.warm  # the package's public name


def test_bench_warm_records_every_methods_routing(monkeypatch):
    """bench/device_warm.py records over the benchmark's methods, each with its own configuration (tiles,
    channels per thread, routing, and a lab variant's own kernels): what it records is what those methods
    build, and each recorded launch compiles (here: runs once)."""
    from bench import device_warm
    from bench.harness import METHODS
    from bench.run import load_methods

    load_methods()
    case = _case()
    methods = ["cuda", "cuda-gemm", "cuda-cpt1", "cuda-8x8", "cuda-eager"]
    calls = device_warm.record(methods, [case])
    built = _built(monkeypatch)
    from lab import eager_offsets

    real_eager = eager_offsets.sparse_transpose
    monkeypatch.setattr(eager_offsets, "sparse_transpose", lambda *a: built.add(eager_offsets.kernel_name(*a)) or
                        real_eager(*a))
    for method in methods:
        config = METHODS[method].setup.config()
        kc.clear_from_trace(case.net, kc.forward(case.net, case.x, config=config), case.classes,
                            keep_responses=False, config=config)
    assert built and set(calls) == built
    tiles = {re.search(r"_t\d+x\d+_(\d+x\d+)", name).group(1) for name in built}
    assert tiles == {"4x8", "8x8"}, tiles
    assert any(name.endswith("_eager") for name in built)  # the lab variant's kernels are recorded as its own
    for name, seconds, error in warmup.compile_all(calls, 1):
        assert error is None, f"{name}: {error}"
