"""The CUDA backend's settings (kernels/cuda/config.py): one frozen CudaConfig passed as ``config=``, a default
that set_precision / set_memory_limit change, bad values refused, and its two hooks: a profiler told every
step, and variants offered each conv before the default routes."""

from __future__ import annotations

import numpy as np
import pytest

from clearmaps import ClearmapsError
from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from ..tolerances import RTOL_F32, assert_close, assert_equal

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import convs, device  # noqa: E402


def _net():
    rng = np.random.default_rng(2)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    return Network([conv(2, 6), ReLU(), MaxPool(2), conv(6, 6), ReLU(), conv(6, 3, 1, 0)])


@pytest.fixture
def restore_default():
    before = kc.get_config()
    yield
    kc.set_config(before)


def test_the_default_is_what_set_precision_and_set_memory_limit_change(restore_default):
    assert kc.get_config() == kc.CudaConfig() and kc.get_precision() == "exact"
    kc.set_precision("tf32")
    kc.set_memory_limit(1 << 30)
    assert kc.get_config() == kc.CudaConfig(precision="tf32", memory_limit=1 << 30)
    assert kc.get_precision() == "tf32" and kc.get_config().fast
    kc.set_memory_limit(None)
    kc.set_precision()
    assert kc.get_config() == kc.CudaConfig()


def test_configurations_are_frozen_and_replaced():
    config = kc.CudaConfig()
    with pytest.raises(AttributeError):
        config.precision = "tf32"
    changed = config.replace(sparse=False, tile=[8, 8])
    assert changed.tile == (8, 8) and not changed.sparse and config.sparse
    assert hash(changed) != hash(config) and changed == kc.CudaConfig(sparse=False, tile=(8, 8))


@pytest.mark.parametrize("changes, message", [
    (dict(precision="fp16"), "precision"),
    (dict(memory_limit=0), "memory_limit"),
    (dict(memory_limit=True), "memory_limit"),
    (dict(sparse=1), "sparse"),
    (dict(column_bytes=-1), "column_bytes"),
    (dict(direct_max_channels=-1), "direct_max_channels"),
    (dict(tile=(4,)), "tile"),
    (dict(tile=(0, 8)), "tile"),
    (dict(max_channels_per_thread=3), "max_channels_per_thread"),
    (dict(variants=[convs.Variant()]), "tuple"),
    (dict(variants=("tc",)), "variants"),
    (dict(profiler=print), "profiler"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ClearmapsError, match=message):
        kc.CudaConfig(**changes)


def test_bad_defaults_are_refused():
    with pytest.raises(ClearmapsError, match="precision"):
        kc.set_precision("tf16")
    with pytest.raises(ClearmapsError, match="limit_bytes"):
        kc.set_memory_limit(-5)
    with pytest.raises(ClearmapsError, match="CudaConfig"):
        kc.set_config({"precision": "tf32"})


def test_precision_comes_from_the_config_and_fast_overrides_it(monkeypatch):
    """Which GEMMs may use TF32: the configuration's precision, unless the call says ``fast=``."""
    seen = []
    real = device.gemm_into
    monkeypatch.setattr(device, "gemm_into", lambda *a: seen.append(a[4]) or real(*a))
    net, x = _net(), np.random.default_rng(3).normal(size=(1, 2, 8, 8))
    gemm = kc.CudaConfig(sparse=False)
    for config, fast, want in ((gemm, None, False), (gemm.replace(precision="tf32"), None, True),
                               (gemm.replace(precision="tf32"), False, False), (gemm, True, True)):
        del seen[:]
        kc.forward(net, x, fast=fast, config=config)
        assert seen and set(seen) == {want}, (config.precision, fast, seen)


class Timeline(kc.Profiler):
    def __init__(self):
        self.marks = []

    def mark(self, label):
        self.marks.append(label)


def test_a_profiler_is_told_every_step_and_the_default_none():
    net, x = _net(), np.random.default_rng(4).normal(size=(1, 2, 8, 8))
    timeline = Timeline()
    config = kc.CudaConfig(profiler=timeline)
    kc.clear_from_trace(net, kc.forward(net, x, config=config), [0, 1], config=config)
    assert timeline.marks[0] == "forward start" and "forward 2 MaxPool" in timeline.marks
    # the 1x1 head folded into conv 3 (kernels/fold.py); the input layer's 2 channels on the direct kernel
    assert {"back 5 head folded into 3", "back 0 Conv direct from switches"} <= set(timeline.marks), timeline.marks
    assert timeline.marks[-2:] == ["epilogue", "compose"]
    assert kc.get_config().profiler is None


class Zeros(convs.Variant):
    """Takes every transposed conv and writes zeros: that the hook is reached, and its output used."""
    name = "zeros"

    def __init__(self):
        self.taken = 0

    def transposed(self, src, layer, plan, out_size, b0, kc_, config, fast):
        self.taken += 1
        return device.xp.zeros((layer.in_channels, src.array.shape[1], *out_size), dtype=np.float32)


def test_variants_are_offered_each_conv_before_the_default_routes():
    """A variant that declines everything (the base class) changes nothing; one that takes the transposed
    convs is used for each of them (its zeros come out), and a profiler's labels name it."""
    net, x = _net(), np.random.default_rng(5).normal(size=(2, 2, 8, 8))
    trace = kc.forward(net, x)
    want = ref.backproject(net, ref.forward(net, x), None, True)
    declines = kc.CudaConfig(variants=(convs.Variant(),))
    assert_close(kc.backproject(net, trace, config=declines), want, RTOL_F32, "R(x|c), a declining variant")
    zeros, timeline = Zeros(), Timeline()
    R = kc.backproject(net, trace, config=kc.CudaConfig(variants=(zeros,), profiler=timeline))
    assert zeros.taken == 1 and "back 0 Conv zeros from switches" in timeline.marks, timeline.marks
    assert_equal(R, np.zeros_like(want), "R(x|c) through the zeros variant")
