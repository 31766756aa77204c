"""Networks as graphs (docs/design.md): the reference's walk against an independent torch autograd oracle on
hypothesis-drawn DAGs of every operation, each linear step the adjoint of its forward, the walk linear in the
seed without rectification, the fast backends against the reference, and negative controls (a residual
branch dropped, a concatenation's slices swapped) that the same comparison must catch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clearmaps
from clearmaps import get_backend
from clearmaps import reference as ref
from clearmaps.reference import graph, rules
from clearmaps.reference import layers as L

from . import network_oracle as oracle
from .graph_strategies import graph_cases
from .tolerances import RTOL_F32, RTOL_F64, assert_close, assert_equal, decisive, rel_err


def examples(n):
    return settings(max_examples=n, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@examples(40)
@given(graph_cases(), st.sampled_from(rules.RULES))
def test_reference_equals_the_autograd_oracle_on_graphs(case, rule):
    """z_L, logits and R(x|c) for every ReLU rule, float64, ≤ RTOL_F64."""
    trace = ref.forward(case.net, case.x)
    assert_close(trace.logits, oracle.logits(case.net, case.x), RTOL_F64, "logits")
    classes = list(range(case.net.num_classes))
    R = ref.backproject_rule(case.net, trace, classes, rule)
    assert_close(R, oracle.responses(case.net, case.x, classes, rule), RTOL_F64, f"R(x|c), rule {rule}")


@examples(30)
@given(graph_cases(), st.data())
def test_fast_backends_equal_the_reference_on_graphs(backend, case, data):
    """Forward, R(x|c) and the composite of each backend against the float64 reference (≤ RTOL_F32;
    dominant class equal on decisive pixels)."""
    impl = get_backend(backend)
    trace = ref.forward(case.net, case.x)
    got_trace = impl.forward(case.net, case.x)
    assert_close(got_trace.logits, trace.logits, RTOL_F32, "logits")
    assert_close(got_trace.z, trace.z, RTOL_F32, "z_L")
    rectify = data.draw(st.booleans(), label="rectify")
    reduce = data.draw(st.sampled_from(ref.REDUCTIONS), label="reduce")
    N = case.net.num_classes
    classes = np.asarray(data.draw(st.permutations(range(N)), label="classes")[:data.draw(st.integers(1, N))])
    want = ref.clear_from_trace(case.net, trace, classes, rectify, reduce)
    got = impl.clear_from_trace(case.net, trace, classes, rectify, reduce)
    assert_close(impl.backproject(case.net, trace, classes, rectify), ref.backproject(case.net, trace, classes,
                                                                                         rectify), RTOL_F32, "R(x|c)")
    assert_close(got.responses, want.responses, RTOL_F32, "responses")
    mask = decisive(want.responses)
    assert_equal(np.asarray(got.dominant_index)[mask], want.dominant_index[mask], "dominant class (decisive)")
    lean = impl.clear_from_trace(case.net, trace, classes, rectify, reduce, keep_responses=False)
    assert lean.responses is None
    assert_equal(lean.dominant_index, got.dominant_index, "keep_responses=False: dominant class")
    assert_equal(lean.rgb, got.rgb, "keep_responses=False: rgb")


def _linear_steps(rng):
    """(layer, per-image input shapes) for every linear operation, with awkward parameters."""
    w = lambda *s: rng.normal(size=s)  # noqa: E731
    return [
        (L.Conv(w(6, 2, 3, 2), np.zeros(6), (2, 1), (1, 0), (1, 2), 2), [(4, 9, 8)]),
        (L.Conv(w(3, 1, 3, 3), np.zeros(3), 1, 2, 2, 3), [(3, 7, 7)]),
        (L.AvgPool(3, 2, 1, True, False, None), [(2, 8, 7)]),
        (L.AvgPool(2, 1, 1, True, True, 3), [(2, 5, 6)]),
        (L.AdaptiveAvgPool((3, 4)), [(2, 7, 9)]),
        (L.Linear(w(4, 5), w(4)), [(3, 5)]),
        (L.Reduce((1, 3), "mean", True), [(3, 4, 5)]),
        (L.Reduce((2,), "sum"), [(3, 4, 5)]),
        (L.Cat(2), [(2, 3, 4), (2, 5, 4)]),
        (L.Slice(1, 1, 6, 2), [(7, 3, 3)]),
        (L.Reshape((6, 10)), [(3, 4, 5)]),
        (L.Permute((3, 1, 2)), [(3, 4, 5)]),
        (L.Expand((3, 4, 5)), [(3, 1, 5)]),
        (L.Pad((1, -1, 2, 0)), [(2, 4, 5)]),
        (L.Affine(w(3, 1, 1), None), [(3, 4, 4)]),
        (L.Add((1.0, -2.0)), [(3, 4, 4), (3, 1, 4)]),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("index", range(16))
def test_each_linear_step_is_the_adjoint_of_its_forward(backend, index):
    """<f(x), y> = <x, f*(y)> for the forward f and the step back f* of each linear operation (biases off:
    adjointness is of the linear part), for the reference's primitives and the CPU backend's."""
    rng = np.random.default_rng(index)
    layer, shapes = _linear_steps(rng)[index]
    ops = graph.REFERENCE_OPS if backend == "reference" else __import__("clearmaps.kernels.cpu_graph",
                                                                         fromlist=["OPS"]).OPS
    dtype = np.float64 if backend == "reference" else np.float32
    xs = [rng.normal(size=(2, *s)).astype(dtype) for s in shapes]
    if isinstance(layer, L.Linear):
        layer = L.Linear(layer.weight)  # no bias
    y, _ = rules.FORWARD[type(layer)](layer, ops, *xs)
    if isinstance(layer, L.Conv):
        y = y - ops.const(layer.bias, y)[None, :, None, None]
    probe = rng.normal(size=y.shape).astype(dtype)
    back = rules.BACKWARD[type(layer)](layer, ops, probe, None, "identity", 1, shapes)
    lhs = float(np.sum(y.astype(np.float64) * probe))
    rhs = sum(float(np.sum(x.astype(np.float64) * g)) for x, g in zip(xs, back))
    tol = 1e-12 if backend == "reference" else 1e-5
    assert abs(lhs - rhs) <= tol * (abs(lhs) + 1), f"{layer!r}: <f(x), y> = {lhs}, <x, f*(y)> = {rhs}"


@examples(15)
@given(graph_cases())
def test_without_rectification_the_walk_is_linear_in_the_seed(case):
    """rule 'identity' (rectify=False): R is linear in z_L, however nonlinear the forward pass."""
    trace = ref.forward(case.net, case.x)
    classes = np.zeros((case.x.shape[0], 1), dtype=np.int64)
    saved = dict(trace.saved)
    saved.update(trace.switches)
    image = (case.net.in_channels, *trace.sizes[0])
    z1 = np.random.default_rng(1).normal(size=trace.z.shape)
    z2 = np.random.default_rng(2).normal(size=trace.z.shape)
    walk = lambda z: graph.backward(case.net, z, saved, trace.shapes, classes, "identity", image_shape=image)  # noqa
    assert_close(walk(2 * z1 - 3 * z2), 2 * walk(z1) - 3 * walk(z2), RTOL_F64, "R(2 z1 - 3 z2)")


def _residual_net(rng):
    c = 3
    conv = lambda o, i, k=3: L.Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(0, .1, o),  # noqa
                                    padding=k // 2)
    layers = [conv(c, 2), L.ReLU(), conv(c, c), L.ReLU(), conv(c, c), L.Add(), L.ReLU(), conv(2, c), L.ReLU(),
              conv(2, c, 1), L.Cat(1), conv(4, 4, 1)]
    inputs = [(-1,), (0,), (1,), (2,), (3,), (4, 1), (5,), (6,), (7,), (6,), (8, 9), (10,)]
    return clearmaps.Network(layers, input_shape=(2, 9, 9), inputs=inputs)


@pytest.mark.parametrize("wrong", ["residual branch dropped", "concat slices swapped"])
def test_negative_controls_are_caught(monkeypatch, wrong):
    """A walk that drops the signal of a residual connection's second path, or hands a concatenation's inputs
    each other's slices, must fail the comparison with the oracle that the true walk passes."""
    net = _residual_net(np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, 2, 9, 9))
    want = oracle.responses(net, x, [0, 1, 2, 3])
    assert rel_err(ref.backproject(net, ref.forward(net, x)), want) <= RTOL_F64
    if wrong == "residual branch dropped":
        true_add = rules.BACKWARD[L.Add]
        monkeypatch.setitem(rules.BACKWARD, L.Add,
                            lambda *a: (true_add(*a)[0], 0 * true_add(*a)[1]))
    else:
        true_cat = rules.BACKWARD[L.Cat]
        monkeypatch.setitem(rules.BACKWARD, L.Cat, lambda *a: tuple(reversed(true_cat(*a))))
    got = ref.backproject(net, ref.forward(net, x))
    assert rel_err(got, want) > 1e-3, f"the {wrong} walk was not caught"
