"""The CUDA backend on graphs and for every response method (kernels/cuda/graph.py), what only this backend
has (the contract's own bodies run in test_graph_bodies.py): explain on a graph of every kind of node for each
method, traces from elsewhere (the reference's, the CPU backend's, the fused chain's, broken ones), memory
splitting over images and classes, and warm on a graph. Shapes are tiny: under the simulator every GPU thread
is a Python thread."""

from __future__ import annotations

import numpy as np
import pytest

import clearmaps
from clearmaps import ClearmapsError
from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Trace
from clearmaps.reference import layers as L

from ..tolerances import RTOL_F32, assert_close, assert_equal, decisive

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import graph as G  # noqa: E402  (after the availability check)


# ---- a graph of every kind of node ----------------------------------------------------------------------------

def every_node_net(seed=0, classes=3):
    """Residual, dense (cat), depthwise strided, dilated, SE-gated, exact-GELU, ceil-mode max and average pools,
    an adaptive pool, layer norm, slice, pad and a ReLU class head: 2 x 10 x 9 images."""
    rng = np.random.default_rng(seed)
    layers, inputs = [], []

    def add(layer, *ins):
        layers.append(layer)
        inputs.append(tuple(ins))
        return len(layers) - 1

    def conv(i, o, c, k=3, **kw):
        return add(L.Conv(rng.normal(size=(o, c // kw.get("groups", 1), k, k)) / np.sqrt(c * k * k),
                          rng.normal(0, .1, o), **kw), i)

    a = add(L.ReLU(), conv(-1, 4, 2, padding=1))                                 # 4 x 10 x 9
    d = add(L.Activation("gelu"), conv(a, 4, 4, stride=2, padding=1, groups=4))  # 4 x 5 x 5, depthwise
    p = add(L.MaxPool(2, 2, 0, 1, True), a)                                      # 4 x 5 x 5, ceil mode
    r = add(L.ReLU(), add(L.Add(), d, p))
    dil = add(L.ReLU(), conv(r, 3, 4, padding=2, dilation=2))                   # 3 x 5 x 5
    avg = add(L.AvgPool(2, 1, 1, True, False), r)                                # 4 x 6 x 6
    avg = add(L.MaxPool(2, 1, 1, 2), avg)                                        # 4 x 6 x 6, dilated
    avg = add(L.Slice(2, 0, 5), add(L.Slice(3, 1, 6), avg))                      # 4 x 5 x 5
    cat = add(L.Cat(1), dil, avg)                                                # 7 x 5 x 5
    squeezed = add(L.Reduce((2, 3), "mean"), cat)
    gate = add(L.Linear(rng.normal(size=(7, 7)) / 3, rng.normal(0, .1, 7)), add(L.ReLU(), squeezed))
    gate = add(L.Reshape((7, 1, 1)), add(L.Activation("sigmoid"), gate))
    se = add(L.Mul(), cat, gate)
    norm = add(L.Permute((3, 1, 2)), add(L.LayerNorm((7,), rng.uniform(.5, 1.5, 7), rng.normal(0, .2, 7)),
                                         add(L.Permute((2, 3, 1)), se)))
    pooled = add(L.AdaptiveAvgPool((3, 4)), add(L.Pad((1, 0, 0, 1)), norm))    # 7 x 3 x 4
    add(L.ReLU(), conv(pooled, classes, 7, k=1))
    return clearmaps.Network(layers, input_shape=(2, 10, 9), inputs=inputs)


@pytest.fixture(scope="module")
def graph_case():
    net = every_node_net()
    x = np.random.default_rng(1).normal(size=(2, 2, 10, 9))
    return net, x


@pytest.mark.parametrize("method", ref.METHODS)
def test_explain_runs_every_method_on_a_graph(graph_case, method):
    """clearmaps.explain(backend="cuda") on a graph (which check_support used to refuse): responses within
    RTOL_F32 of the reference, dominant classes equal on decisive pixels, colours within a byte there."""
    net, x = graph_case
    got = clearmaps.explain(net, x, backend="cuda", method=method)
    want = clearmaps.explain(net, x, backend="reference", method=method)
    assert_close(got.responses, want.responses, RTOL_F32, f"{method}: responses")
    mask = decisive(want.responses)
    assert mask.mean() > 0.5
    assert_equal(np.asarray(got.dominant_class)[mask], want.dominant_class[mask], f"{method}: dominant class")
    assert np.abs(np.asarray(got.rgb, dtype=int) - want.rgb)[mask].max() <= 1
    assert_close(got.logits, want.logits, RTOL_F32, "logits")


def test_other_backends_traces_and_the_vmax_modes(graph_case):
    """A trace the CPU backend made, and one the reference made (float64), give the maps of the CUDA backend's
    own trace; vmax as a number, "batch" and a percentile compose as the reference composes."""
    from clearmaps.kernels import cpu

    net, x = graph_case
    own = kc.clear_from_trace(net, kc.forward(net, x, method="guided"), [2, 0], method="guided", reduce="norm")
    for trace in (cpu.forward(net, x, method="guided"), ref.forward(net, x)):
        other = kc.clear_from_trace(net, trace, [2, 0], method="guided", reduce="norm")
        assert_close(other.responses, own.responses, RTOL_F32, "responses from a foreign trace")
    rtrace = ref.forward(net, x)
    for vmax in (0.5, "batch", "p90"):
        got = kc.clear_from_trace(net, rtrace, None, vmax=vmax, method="gradient")
        want = ref.clear_from_trace(net, rtrace, None, vmax=vmax, method="gradient")
        mask = decisive(want.responses)
        assert np.abs(got.rgb.astype(int) - want.rgb)[mask].max() <= 1, vmax


def _replace(trace, **changes):
    fields = dict(sizes=trace.sizes, switches=trace.switches, z=trace.z, logits=trace.logits,
                  probabilities=trace.probabilities, shapes=trace.shapes, saved=trace.saved)
    fields.update(changes)
    return Trace(**fields)


def test_traces_that_cannot_serve_are_refused(graph_case):
    """A trace lacking what the method needs (the deconvnet's keeps no ReLU signs; the fused chain's keeps
    switches only), a switch outside its plane, a saved array of the wrong shape, another input size, and no
    image for input×gradient: each one ClearmapsError, before any kernel reads out of bounds."""
    net, x = graph_case
    deconv = kc.forward(net, x)
    with pytest.raises(ClearmapsError, match="trace lacks what node"):
        kc.backproject(net, deconv, [0], method="guided")
    chain = clearmaps.Network([L.Conv(np.ones((2, 2, 3, 3)), np.zeros(2)), L.ReLU(), L.MaxPool(2),
                               L.Conv(np.ones((3, 2, 1, 1)), np.zeros(3))])
    assert chain.is_chain
    with pytest.raises(ClearmapsError, match="trace lacks what node"):
        kc.clear_from_trace(chain, kc.forward(chain, x), None, method="gradient")
    trace = ref.forward(net, x)
    pool = next(i for i, layer in enumerate(net.layers) if isinstance(layer, L.MaxPool))
    bad = dict(trace.switches)
    bad[pool] = trace.switches[pool].copy()
    bad[pool].flat[3] = 10 * 9
    with pytest.raises(ClearmapsError, match="outside the 10x9 plane"):
        kc.backproject(net, _replace(trace, switches=bad), [0])
    relu = next(i for i, layer in enumerate(net.layers) if isinstance(layer, L.ReLU))
    saved = dict(trace.saved)
    saved[relu] = saved[relu][:, :, :-1]
    with pytest.raises(ClearmapsError, match=f"trace.saved\\[{relu}\\]"):
        kc.backproject(net, _replace(trace, saved=saved), [0], method="gradient")
    saved = {i: v for i, v in trace.saved.items() if i != -1}
    with pytest.raises(ClearmapsError, match="does not hold its input image"):
        kc.backproject(net, _replace(trace, saved=saved), [0], method="input_x_gradient")
    with pytest.raises(ClearmapsError, match="not this network's"):
        kc.backproject(net, _replace(trace, shapes=tuple(trace.shapes[:-1]) + ((3, 4, 4),)), [0])


class Marks(kc.Profiler):
    def __init__(self):
        self.labels = []

    def mark(self, label):
        self.labels.append(label)


def test_work_that_does_not_fit_is_split_with_the_same_results(graph_case):
    """A memory limit that holds one image's forward pass and two (image, class) signals at a time: the
    forward pass runs image by image, the back-projection in chunks that split an image's classes (the
    running argmax carried across them), and the results are those of one chunk (to float32 rounding: a GEMM
    of another width may sum in another order)."""
    net, x = graph_case
    shapes = net.shapes(x.shape[2:])
    image = (2, 10, 9)
    trace = kc.forward(net, x, method="guided")
    whole = kc.clear_from_trace(net, trace, None, method="guided")
    R = kc.backproject(net, trace, None, method="guided")

    def limit(available):  # the budget whose planning leaves ``available`` bytes (column workspace: budget / 4)
        return int(available * 4 / 3) + 64

    per_image = G.forward_bytes_per_image(net, shapes, image)
    marks = Marks()
    split = kc.forward(net, x, method="guided", config=kc.CudaConfig(memory_limit=limit(per_image), profiler=marks))
    assert sum("graph forward images" in m for m in marks.labels) == 2
    # GEMMs of another width may sum in another order: the same up to float32 rounding
    assert_close(split.z, trace.z, 1e-6, "z from image chunks")
    assert sorted(split.saved) == sorted(trace.saved)
    shapes_of = lambda v: [a.shape for a in v] if isinstance(v, tuple) else [v.shape]  # noqa: E731
    assert all(shapes_of(split.saved[i]) == shapes_of(trace.saved[i]) for i in trace.saved)
    assert_equal(split.saved[-1], trace.saved[-1], "the image")
    per_signal = G.backward_bytes_per_signal(net, shapes, image)
    outputs = 2 * 3 * 10 * 9 * 4 + 2 * 10 * 9 * (4 + 8 + 3)
    marks = Marks()
    config = kc.CudaConfig(memory_limit=limit(outputs + 2 * per_signal + per_signal // 2), profiler=marks)
    got = kc.clear_from_trace(net, trace, None, method="guided", config=config)
    assert sum("graph back + epilogue" in m for m in marks.labels) == 4  # per image: classes (0, 1), then (2,)
    assert_close(got.responses, whole.responses, 1e-6, "responses in chunks")
    mask = decisive(whole.responses)
    assert_equal(got.dominant_index[mask], whole.dominant_index[mask], "dominant class in chunks")
    assert_close(kc.backproject(net, trace, None, method="guided", config=config), R, 1e-6, "R in chunks")
    with pytest.raises(ClearmapsError, match="GPU memory"):
        kc.clear_from_trace(net, trace, None, method="guided", config=kc.CudaConfig(memory_limit=limit(outputs)))


def test_warm_on_a_graph_has_no_sparse_kernels_to_compile(graph_case):
    """warm runs a graph once (its kernels are compiled by that call: they take the geometry at run time);
    there is no sparse-kernel specialisation to hand to workers."""
    net, x = graph_case
    assert kc.warm(net, x, jobs=1) == {}
