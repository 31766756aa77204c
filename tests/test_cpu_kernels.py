"""What only the Numba CPU backend has: its back-projection planner on any layer order, the fused
unpool + rectify + transposed conv, the class-chunked running argmax, its memory, and negative controls
showing that the comparisons with the reference catch a wrong kernel."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clearmaps
from clearmaps import ClearmapsError, get_backend
from clearmaps import reference as ref
from clearmaps.kernels import _cpu_kernels as K
from clearmaps.kernels import cpu
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from .tolerances import RTOL_F32, assert_close, assert_equal, decisive, rel_err


@st.composite
def any_order_networks(draw):
    """Conv / ReLU / MaxPool in any order (pool after pool, ReLU after pool, pool first, no ReLU before a
    pool, overlapping pools, few and many channels), then a head: what the planner must get right beyond
    the conv-ReLU-pool blocks of tests/strategies.py."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = draw(st.sampled_from([1, 2, 3, 8]))
    size = draw(st.integers(9, 24))
    layers, channels, h = [], c, size
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "relu", "pool"]))
        if kind == "conv":
            k, s = draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            width = draw(st.sampled_from([1, 3, 8, 12, 41]))  # 41: every lane path (32, 8, 1) of _cpu_kernels
            if (h + 2 * p - k) // s + 1 < 2:
                continue
            layers.append(Conv(rng.normal(size=(width, channels, k, k)) / np.sqrt(channels * k * k),
                               rng.normal(scale=0.1, size=width), s, p))
            channels, h = width, (h + 2 * p - k) // s + 1
        elif kind == "relu":
            layers.append(ReLU())
        else:
            k, s, p = draw(st.sampled_from([(2, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1), (3, 2, 0)]))
            if (h + 2 * p - k) // s + 1 < 2:
                continue
            layers.append(MaxPool(k, s, p))
            h = (h + 2 * p - k) // s + 1
    n = draw(st.integers(2, 5))
    layers.append(Conv(rng.normal(size=(n, channels, 1, 1)), rng.normal(size=n)))
    if draw(st.booleans()):
        layers.append(ReLU())
    return Network(layers), rng.normal(size=(draw(st.integers(1, 2)), c, size, size))


@settings(max_examples=60, deadline=None)
@given(any_order_networks(), st.booleans())
def test_planner_handles_any_layer_order(case, rectify):
    """R(x|c) of the cpu plan equals the reference on the reference's trace, whatever the layer order."""
    net, x = case
    trace = ref.forward(net, x)
    assert_close(cpu.backproject(net, trace, None, rectify), ref.backproject(net, trace, None, rectify),
                 RTOL_F32, f"R(x|c) of {net!r}")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(2, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1), (3, 3, 0)]),
       st.sampled_from([(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2), (2, 2, 0)]), st.integers(6, 15),
       st.sampled_from([1, 3, 16]), st.booleans())
def test_fused_unpool_rectify_conv_transpose(seed, pool, conv, size, c_out, rectify):
    """unpool_conv_transpose2d = conv_transpose2d(max(unpool(y), 0)) of the reference, for disjoint and
    overlapping windows (where switches are shared and the sums must come before the ReLU)."""
    rng = np.random.default_rng(seed)
    (pk, ps, pp), (k, s, p) = pool, conv
    x = rng.integers(0, 3, (2, 4, size, size)).astype(float)  # ties, so overlapping windows share switches
    _, switches = ref.max_pool_with_switches(x, pk, ps, pp)
    y = rng.normal(size=switches.shape)
    weight = rng.normal(size=(4, c_out, k, k))
    H = (size - 1) * s - 2 * p + k  # the conv input size whose output is `size`
    if H < 1 or (H + 2 * p - k) // s + 1 != size:
        return
    plane = ref.unpool(y, switches, (size, size))
    want = ref.conv_transpose2d(np.maximum(plane, 0) if rectify else plane, weight, s, p, (H, H))
    got = cpu.unpool_conv_transpose2d(y, switches, (size, size), weight, s, p, (H, H), rectify)
    assert_close(got, want, RTOL_F32, "fused unpool + rectify + transposed conv")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.integers(0, 2),
       st.integers(4, 12), st.sampled_from([1, 8, 9, 32, 33, 41, 64, 71]), st.sampled_from([2, 5, 40, 300]))
def test_every_lane_path_of_the_transposed_conv(seed, k, stride, padding, size, c_in, c_out):
    """conv_transpose2d and the fused unpool + transposed conv into c_in channels, where the kernels sum
    32 channels at a time in vectors, then 8, then one: c_in 1, 8, 9, 32, 33, 41, 64, 71 takes every mix of
    those paths, with strides 1–3 (output rows reached every stride-th tap) and output padding; 300 input
    channels take two passes over the channels (_cpu_kernels.SPAN)."""
    rng = np.random.default_rng(seed)
    padding = min(padding, k // 2)
    H = (size - 1) * stride - 2 * padding + k + rng.integers(0, stride)  # output padding 0 .. stride-1
    weight = rng.normal(size=(c_out, c_in, k, k))
    y = np.maximum(rng.normal(size=(2, c_out, size, size)), 0)
    assert_close(cpu.conv_transpose2d(y, weight, stride, padding, (H, H)),
                 ref.conv_transpose2d(y, weight, stride, padding, (H, H)), RTOL_F32, "conv_transpose2d")
    x = rng.normal(size=(2, c_out, 2 * size, 2 * size))
    pooled, switches = ref.max_pool_with_switches(x, 2, 2)
    g = rng.normal(size=pooled.shape)
    want = ref.conv_transpose2d(np.maximum(ref.unpool(g, switches, (2 * size, 2 * size)), 0), weight, 1, padding,
                                (2 * size + k - 1 - 2 * padding,) * 2)
    got = cpu.unpool_conv_transpose2d(g, switches, (2 * size, 2 * size), weight, 1, padding,
                                      (2 * size + k - 1 - 2 * padding,) * 2)
    assert_close(got, want, RTOL_F32, "fused unpool + rectify + transposed conv")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 13), st.sampled_from([1, 3, 8, 12, 300]), st.sampled_from([1, 7, 8, 9, 32, 33, 41, 64, 71]))
def test_every_path_of_the_forward_conv(seed, k, stride, padding, size, c_in, c_out):
    """conv2d into c_out channels: the dense kernel (fewer than 8 input channels; three pixels at a time
    inside, one at a time at the borders) and the sparse gather (8 or more; 300 in two channel passes),
    every lane path (32, 8, 1), strides 1–3, images narrower than three pixels, inputs with and without
    zeros."""
    rng = np.random.default_rng(seed)
    padding = min(padding, k // 2)
    if size + 2 * padding < k:
        return
    x = rng.normal(size=(2, c_in, size, size + 2))
    if seed % 2:
        x = np.maximum(x, 0)  # half zeros, as after a ReLU
    weight, bias = rng.normal(size=(c_out, c_in, k, k)), rng.normal(size=c_out)
    assert_close(cpu.conv2d(x, weight, bias, stride, padding), ref.conv2d(x, weight, bias, stride, padding),
                 RTOL_F32, "conv2d")


def test_vector_operations_equal_numpy():
    """The 8-float vector type of _vec: load, multiply-add with a scalar and with a vector, sum, store."""
    from numba import njit

    from clearmaps.kernels._vec import vfma, vload, vstore, vsum, vzero

    @njit
    def run(a, b, s, out):
        acc = vfma(vzero(), vload(a, 3), s)           # a[3:11] * s
        acc = vfma(acc, vload(a, 11), vload(b, 0))    # + a[11:19] * b[0:8]
        vstore(out, 1, acc)
        return vsum(acc)

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=24).astype(np.float32), rng.normal(size=8).astype(np.float32)
    out = np.zeros(10, np.float32)
    total = run(a, b, np.float32(1.5), out)
    want = a[3:11] * np.float32(1.5) + a[11:19] * b
    assert_close(out[1:9], want, RTOL_F32, "vfma / vstore")
    assert out[0] == 0 and out[9] == 0, "vstore wrote outside its eight floats"
    assert abs(total - want.sum()) <= 1e-5 * np.abs(want).sum(), "vsum"


def test_composite_only_runs_in_chunks_and_equals_the_full_run(monkeypatch):
    """keep_responses=False over many small chunks (one pair per worker) gives the same bytes."""
    rng = np.random.default_rng(3)
    net = Network([Conv(rng.normal(size=(6, 2, 3, 3)), rng.normal(size=6), 1, 1), ReLU(), MaxPool(2),
                   Conv(rng.normal(size=(7, 6, 3, 3)), rng.normal(size=7), 1, 1)])
    trace = cpu.forward(net, rng.normal(size=(3, 2, 10, 12)))
    classes = np.stack([rng.permutation(7)[:5] for _ in range(3)])
    full = cpu.clear_from_trace(net, trace, classes)
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 1)
    lean = cpu.clear_from_trace(net, trace, classes, keep_responses=False)
    assert lean.responses is None
    for name in ("dominant_index", "dominant_response", "rgb"):
        assert_equal(getattr(lean, name), getattr(full, name), name)
    index, response = ref.dominant(full.responses)
    assert_equal(full.dominant_index, index, "running argmax = argmax of the kept maps")


def test_composite_only_never_holds_all_maps():
    """tracemalloc peak of keep_responses=False stays below the keep_responses=True run by most of the
    (B, K, H, W) maps: a chunk holds at most a quarter of them (every cpu buffer is a NumPy array allocated
    from Python, so tracemalloc sees it)."""
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(4, 1, 3, 3)), np.zeros(4), 1, 1), ReLU(), MaxPool(2),
                   Conv(rng.normal(size=(12, 4, 3, 3)), np.zeros(12), 1, 1)])
    x = rng.normal(size=(8, 1, 48, 48))
    trace = cpu.forward(net, x)
    cpu.clear_from_trace(net, trace, None, keep_responses=False)  # compile outside the measurement
    peaks = {}
    for keep in (True, False):
        tracemalloc.start()
        cpu.clear_from_trace(net, trace, np.arange(12), keep_responses=keep)
        peaks[keep] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    maps = 8 * 12 * 48 * 48 * 4
    assert peaks[True] - peaks[False] > 0.7 * maps, (peaks, maps)


def test_negative_controls_are_caught(monkeypatch):
    """The comparisons bite: a back-projection that forgets to rectify, a plan whose fused step drops its
    rectification, and a max pool with the last-maximum tie rule all fail them."""
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(8, 1, 3, 3)), rng.normal(size=8), 1, 1), ReLU(),
                   Conv(rng.normal(size=(4, 8, 3, 3)), rng.normal(size=4), 1, 1), ReLU(),
                   MaxPool((2, 2)), Conv(rng.normal(size=(3, 4, 3, 3)), rng.normal(size=3), 1, 1), ReLU(),
                   Conv(rng.normal(size=(3, 3, 1, 1)), rng.normal(size=3))])
    x = rng.normal(size=(1, 1, 10, 10))
    trace = ref.forward(net, x)
    want = ref.backproject(net, trace, None)
    assert rel_err(cpu.backproject(net, trace, None), want) <= RTOL_F32
    with pytest.raises(AssertionError):
        assert_close(cpu.backproject(net, trace, None, rectify=False), want, RTOL_F32, "no-rectify variant")

    plan_init = cpu._Plan.__init__

    def fused_without_rectify(self, *args):
        plan_init(self, *args)
        self.steps[np.isin(self.steps[:, K.F_KIND], [K.CONV_T_POOLED]), K.F_RECT] = 0

    monkeypatch.setattr(cpu._Plan, "__init__", fused_without_rectify)
    assert np.isin(cpu._Plan(net, trace.sizes, "rectify").steps[:, K.F_KIND], [K.CONV_T_POOLED]).any()
    with pytest.raises(AssertionError):
        assert_close(cpu.backproject(net, trace, None), want, RTOL_F32, "fused step without rectify")
    monkeypatch.undo()

    ties = np.zeros((1, 1, 4, 4))
    ties[0, 0, 3, 3] = 1.0
    flipped = cpu.max_pool_with_switches(ties[:, :, ::-1, ::-1].copy(), 2)[1]
    last_max = 15 - flipped  # the first maximum of the flipped plane is the last of the plane
    with pytest.raises(AssertionError):
        assert_equal(last_max[:, :, ::-1, ::-1], ref.max_pool_with_switches(ties, 2)[1], "last-max tie rule")
    assert_equal(cpu.max_pool_with_switches(ties, 2)[1], ref.max_pool_with_switches(ties, 2)[1], "first-max")


def test_bad_traces_and_flags_are_refused():
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(3, 1, 3, 3)), np.zeros(3), 1, 1), ReLU(), MaxPool(2),
                   Conv(rng.normal(size=(2, 3, 1, 1)), np.zeros(2))])
    other = Network([Conv(np.ones((2, 1, 3, 3)), np.zeros(2))])
    with pytest.raises(ClearmapsError, match="trace"):
        cpu.clear_from_trace(net, ref.forward(other, np.ones((1, 1, 6, 6))), np.array([[0]]))
    with pytest.raises(ClearmapsError, match="trace"):
        cpu.clear_from_trace(net, "not a trace", np.array([[0]]))
    with pytest.raises(ClearmapsError, match="rectify"):
        cpu.backproject(net, cpu.forward(net, np.ones((1, 1, 6, 6))), None, rectify="yes")
    with pytest.raises(ClearmapsError, match="net"):
        cpu.forward("net", np.ones((1, 1, 6, 6)))


def test_explain_uses_the_cpu_backend():
    """backend="cpu" is this module; "auto" picks it unless a CUDA backend can run."""
    assert get_backend("cpu") is cpu
    try:
        cuda = get_backend("cuda")
    except ClearmapsError:
        cuda = None
    assert get_backend("auto") is (cuda or cpu)
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(3, 1, 3, 3)), np.zeros(3), 1, 1), ReLU(),
                   Conv(rng.normal(size=(2, 3, 1, 1)), np.zeros(2))])
    out = clearmaps.explain(net, rng.normal(size=(1, 1, 5, 5)), backend="cpu")
    assert out.responses.dtype == np.float32


@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("head_relu", [True, False])
def test_folded_head_equals_reference(rectify, head_relu):
    """A 1×1 head over ReLU + conv runs as one two-channel step (z⁺, z⁻ through folded kernels); the maps
    are the reference's, with and without rectification and a head ReLU."""
    rng = np.random.default_rng(5)
    layers = [Conv(rng.normal(size=(9, 2, 3, 3)), rng.normal(size=9), 1, 1), ReLU(), MaxPool(2),
              Conv(rng.normal(size=(12, 9, 3, 3)) / 5, rng.normal(size=12), 2, 1), ReLU(),
              Conv(rng.normal(size=(4, 12, 1, 1)), rng.normal(size=4))] + ([ReLU()] if head_relu else [])
    net = Network(layers)
    trace = ref.forward(net, rng.normal(size=(2, 2, 13, 11)))
    plan = cpu._Plan(net, trace.sizes, "rectify" if rectify else "identity")
    assert plan.steps[0, K.F_KIND] == K.HEAD_FOLDED
    assert_close(cpu.backproject(net, trace, None, rectify), ref.backproject(net, trace, None, rectify), RTOL_F32,
                 "R(x|c) through the folded head")



@pytest.mark.parametrize("method", ["guided", "gradient", "input_x_gradient"])
def test_fused_chain_runs_every_method(method):
    """The fused chain kernels take the guided and gradient ReLU rules (masks of the forward's signs, per
    ReLU layer, through plain, pooled, unpooled and few-channel steps) and input × gradient's final factor;
    they never fold the head then (the fold's z⁺ / z⁻ split is the deconvnet's)."""
    rng = np.random.default_rng(6)
    layers = [Conv(rng.normal(size=(9, 2, 3, 3)), rng.normal(size=9), 1, 1), ReLU(), MaxPool(2),
              Conv(rng.normal(size=(12, 9, 3, 3)) / 5, rng.normal(size=12), 1, 1), ReLU(), MaxPool(3, 2, 1), ReLU(),
              Conv(rng.normal(size=(10, 12, 3, 3)) / 5, rng.normal(size=10), 2, 1), ReLU(),
              Conv(rng.normal(size=(4, 10, 1, 1)), rng.normal(size=4))]
    net = Network(layers)
    x = rng.normal(size=(2, 2, 17, 15))
    trace = ref.forward(net, x)
    plan = cpu._Plan(net, trace.sizes, "guided" if method == "guided" else "gradient")
    assert plan.steps[0, K.F_KIND] == K.HEAD and plan.masks
    fast = cpu.forward(net, x, method=method)
    got = cpu.backproject(net, fast, None, method=method)
    assert_close(got, ref.backproject(net, trace, None, method=method), RTOL_F32, f"{method}: R(x|c)")
    lean = cpu.clear_from_trace(net, fast, np.broadcast_to(np.arange(4), (2, 4)), method=method, keep_responses=False)
    full = ref.clear_from_trace(net, trace, None, method=method)
    mask = decisive(full.responses)
    assert_equal(np.asarray(lean.dominant_index)[mask], full.dominant_index[mask], "dominant class (decisive)")
