"""Every backend against the float64 reference (docs/design.md, "Tests"): one checker per property, run for
each backend of the ``backend`` fixture, and run for the known-wrong backends of tests/wrong_backends, which
must fail them (negative controls). Tolerances live in tests/tolerances.py.

The CUDA backend runs these same bodies under Numba's CUDA simulator in a child pytest
(tests/test_cuda_sim.py, with CLEARMAPS_TEST_BACKENDS=cuda), on smaller draws: every simulated GPU thread is
a Python thread.

What "equal" means here, for a float32 backend:
- responses, z, logits: relative error ≤ RTOL_F32;
- switches: identical. On integer-valued cases that is demanded everywhere (the arithmetic is exact, so
  ties are real ties and only the tie rule decides). On real-valued cases a switch may differ only where
  the two candidates differ by less than CLASS_MARGIN × the image's largest |value| in float64: a near-tie
  that float32 rounding can flip. Equal values at different positions is a tie-rule bug and fails;
- dominant class: identical on decisive pixels (tolerances.decisive);
- rgb: the backend's bytes are exactly ``reference.compose`` of the backend's own (index, D), and within
  ±1 byte of the reference's composite on decisive pixels: V = D / max D carries float32's relative error
  of ~1e-7, which moves 255·V across a rounding boundary (x.5) only rarely, and then by one byte.

The back-projection is checked on the reference's own trace (the backend casts it), so a near-tie switch
flip in the forward pass cannot perturb it; the end-to-end test uses integer-valued cases, where both
forward passes are exact.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import clearmaps
from clearmaps import ClearmapsError, get_backend
from clearmaps import reference as ref
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from .conftest import simulated_cuda_only
from .strategies import clear_cases
from .tolerances import CLASS_MARGIN, RTOL_F32, assert_close, assert_equal, decisive

EXACT_F32 = 2.0 ** 24  # integers up to this are exact in float32

SIMULATED = simulated_cuda_only()
# the drawn networks and images: tests/strategies.py's defaults, or, under the simulator, small enough that a
# case takes seconds (2-5 channels, two conv blocks, images of 6-11 pixels, up to 4 classes)
CASES = (dict(max_classes=4, min_size=6, max_size=11, max_batch=2, max_blocks=2, max_width=5) if SIMULATED
         else {})


def examples(n: int, simulated: int):
    """hypothesis settings: ``n`` examples, or ``simulated`` under the CUDA simulator."""
    # the backend fixture is a name (a string): nothing in it needs resetting between examples
    return settings(max_examples=simulated if SIMULATED else n,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def wrong_backend(name: str):
    """A known-wrong backend of tests/wrong_backends (a module with the contract's functions)."""
    return importlib.import_module(f"tests.wrong_backends.{name}")


def _reference_activations(net, x):
    """Each layer's float64 input, for judging near-ties."""
    out, a = [], np.asarray(x, dtype=np.float64)
    for layer in net.layers:
        out.append(a)
        if isinstance(layer, Conv):
            a = ref.conv2d(a, layer.weight, layer.bias, layer.stride, layer.padding)
        elif isinstance(layer, ReLU):
            a = np.maximum(a, 0)
        else:
            a = ref.max_pool_with_switches(a, layer.kernel, layer.stride, layer.padding)[0]
    out.append(a)
    return out


def assert_switches_match(got, want, x64, exact: bool, what: str):
    """Switches equal; where not, on real-valued cases, the two positions must be a float32 near-tie."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.int64, f"{what}: switches have dtype {got.dtype}; expected int64"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = got != want
    if not bad.any():
        return
    if exact:
        assert_equal(got, want, what)
    B, C = x64.shape[:2]
    flat = x64.reshape(B, C, -1)
    b, c = np.nonzero(bad)[:2]
    v_got = flat[b, c, got[bad]]
    v_want = flat[b, c, want[bad]]
    scale = np.abs(flat).reshape(B, -1).max(axis=1)[b]
    near_tie = (v_got != v_want) & (np.abs(v_got - v_want) <= CLASS_MARGIN * scale)
    if not near_tie.all():
        assert_equal(np.where(near_tie, want[bad], got[bad]), want[bad], f"{what} (not near-ties)")


# --------------------------------------------------------------------------------- the checkers
# One per property; ``impl`` is a backend module (or a known-wrong one). Each raises AssertionError with the
# first mismatches when the backend breaks the contract.

def check_forward(impl, case):
    """z, logits and probabilities close, layer sizes equal, switches identical (near-ties aside). Returns the
    backend's trace."""
    want = ref.forward(case.net, case.x)
    got = impl.forward(case.net, case.x)
    assert tuple(map(tuple, got.sizes)) == tuple(map(tuple, want.sizes))
    assert_close(got.z, want.z, RTOL_F32, "z_L")
    assert_close(got.logits, want.logits, RTOL_F32, "logits")
    assert_close(got.probabilities, want.probabilities, RTOL_F32, "probabilities")
    assert set(got.switches) == set(want.switches)
    acts = _reference_activations(case.net, case.x)
    exact = case.integer and max(np.abs(a).max() for a in acts) < EXACT_F32
    for i in want.switches:
        assert_switches_match(got.switches[i], want.switches[i], acts[i], exact, f"switches of layer {i}")
    return got


def check_clear(got, want, responses_ref, hues, vmax, what):
    """A backend's Clear against the reference's (responses may be None in both)."""
    assert_close(got.responses, want.responses, RTOL_F32, f"{what}: responses")
    assert_close(got.dominant_response, want.dominant_response, RTOL_F32, f"{what}: dominant response")
    mask = decisive(responses_ref)
    assert_equal(np.asarray(got.dominant_index)[mask], want.dominant_index[mask], f"{what}: dominant class "
                 f"on decisive pixels ({mask.mean():.1%} of pixels)")
    assert got.rgb.dtype == np.uint8 and got.rgb.shape == want.rgb.shape
    own = ref.compose(np.asarray(got.dominant_index), np.asarray(got.dominant_response, dtype=np.float64), hues,
                      vmax, num_classes=responses_ref.shape[1])
    assert_equal(got.rgb, own, f"{what}: rgb vs reference.compose of the backend's own D")
    diff = np.abs(got.rgb.astype(int) - want.rgb.astype(int))[mask]
    assert diff.max(initial=0) <= 1, f"{what}: rgb differs by {diff.max()} bytes on a decisive pixel"


def check_back_projection(impl, case, classes, rectify=True, reduce="sum", vmax=None, hues=None):
    """R(x|c), r(x|c), dominant class and response, and the composite from the reference's own trace, with
    and without the (B, K, H, W) maps kept."""
    trace = ref.forward(case.net, case.x)
    R = impl.backproject(case.net, trace, classes, rectify)
    R_ref = ref.backproject(case.net, trace, classes, rectify)
    assert_close(R, R_ref, RTOL_F32, "R(x|c)")
    want = ref.clear_from_trace(case.net, trace, classes, rectify, reduce, hues, vmax)
    got = impl.clear_from_trace(case.net, trace, classes, rectify, reduce, hues, vmax)
    check_clear(got, want, want.responses, hues, vmax, "keep_responses=True")
    lean = impl.clear_from_trace(case.net, trace, classes, rectify, reduce, hues, vmax, keep_responses=False)
    assert lean.responses is None
    assert_equal(lean.dominant_index, got.dominant_index, "keep_responses=False: dominant class")
    assert_equal(lean.dominant_response, got.dominant_response, "keep_responses=False: dominant response")
    assert_equal(lean.rgb, got.rgb, "keep_responses=False: rgb")


def check_operators(impl, seed, k, stride, padding, h, w, c_in, c_out, integer):
    """conv2d, conv_transpose2d (output padding too), max pool with switches, unpool, dominant, compose and
    the channel reductions, each against the reference's."""
    rng = np.random.default_rng(seed)
    padding = min(padding, k // 2)
    draw = (lambda *s: rng.integers(-2, 3, s).astype(float)) if integer else (lambda *s: rng.normal(size=s))
    x, weight, bias = draw(2, c_in, h, w), draw(c_out, c_in, k, k), draw(c_out)
    y = ref.conv2d(x, weight, bias, stride, padding)
    assert_close(impl.conv2d(x, weight, bias, stride, padding), y, RTOL_F32, "conv2d")
    g = draw(*y.shape)
    assert_close(impl.conv_transpose2d(g, weight, stride, padding, (h, w)),
                 ref.conv_transpose2d(g, weight, stride, padding, (h, w)), RTOL_F32, "conv_transpose2d")
    for pk, ps, pp in [(2, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1)]:
        if min(h, w) + 2 * pp < pk:
            continue
        ties = rng.integers(0, 3, (2, c_in, h, w)).astype(float)  # small integers: many ties
        pooled, sw = ref.max_pool_with_switches(ties, pk, ps, pp)
        got_p, got_sw = impl.max_pool_with_switches(ties, pk, ps, pp)
        assert_equal(got_sw, sw, f"switches of a {pk}/{ps}/{pp} pool")
        assert_equal(got_p, pooled, "pooled values")
        v = draw(*pooled.shape)
        assert_close(impl.unpool(v, sw, (h, w)), ref.unpool(v, sw, (h, w)), RTOL_F32, "unpool")
    r = draw(2, c_out, h, w)
    index, response = impl.dominant(r)
    want_i, want_r = ref.dominant(r)
    assert_equal(index, want_i, "dominant index (first maximum)")
    assert_close(response, want_r, RTOL_F32, "dominant response")
    assert_equal(impl.compose(want_i, want_r, num_classes=c_out),
                 ref.compose(want_i, want_r, num_classes=c_out), "compose")
    R = draw(2, 3, c_in, h, w)
    for how in ref.REDUCTIONS:
        assert_close(impl.reduce_channels(R, how), ref.reduce_channels(R, how), RTOL_F32, f"reduce {how}")


# --------------------------------------------------------------------------------- every backend

@examples(40, simulated=6)
@given(clear_cases(**CASES))
def test_forward_matches_reference(backend, case):
    check_forward(get_backend(backend), case)


@st.composite
def _classes(draw, batch, num_classes):
    """(B, K) class ids; half the time every image gets its own order and subset, as top-k gives."""
    k = draw(st.integers(1, num_classes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        return np.tile(rng.permutation(num_classes)[:k], (batch, 1)).astype(np.int64)
    return np.stack([rng.permutation(num_classes)[:k] for _ in range(batch)]).astype(np.int64)


@examples(40, simulated=8)
@given(clear_cases(**CASES), st.data())
def test_back_projection_matches_reference(backend, case, data):
    classes = data.draw(_classes(case.x.shape[0], case.net.num_classes), label="classes")
    check_back_projection(
        get_backend(backend), case, classes, rectify=data.draw(st.booleans(), label="rectify"),
        reduce=data.draw(st.sampled_from(ref.REDUCTIONS), label="reduce"),
        vmax=data.draw(st.sampled_from([None, "batch", "p90", 3.0]), label="vmax"),
        hues=(np.random.default_rng(0).uniform(0, 1, classes.shape[1]) if data.draw(st.booleans(), label="palette")
              else None))


@examples(25, simulated=4)
@given(clear_cases(integer=True, **CASES))
def test_explain_end_to_end(backend, case):
    """explain(..., backend=...) against the reference, forward included (integer cases: exact forward)."""
    acts = _reference_activations(case.net, case.x)
    assume(max(np.abs(a).max() for a in acts) < EXACT_F32)
    want = clearmaps.explain(case.net, case.x, backend="reference")
    got = clearmaps.explain(case.net, case.x, backend=backend)
    assert_close(got.logits, want.logits, RTOL_F32, "logits")
    assert_close(got.responses, want.responses, RTOL_F32, "responses")
    mask = decisive(want.responses)
    assert_equal(got.dominant_class[mask], want.dominant_class[mask], "dominant class on decisive pixels")
    diff = np.abs(got.rgb.astype(int) - want.rgb.astype(int))[mask]
    assert diff.max(initial=0) <= 1
    top = clearmaps.explain(case.net, case.x, classes="top2", backend=backend, keep_responses=False)
    top_ref = clearmaps.explain(case.net, case.x, classes="top2", backend="reference")
    if np.array_equal(top.classes, top_ref.classes):  # equal logits may order differently in float32
        mask = decisive(top_ref.responses)
        assert_equal(top.dominant_class[mask], top_ref.dominant_class[mask], "top-2 dominant class")


# under the simulator: smaller planes (at least the largest kernel, 5) and fewer channels (out_channels 1 takes
# the direct kernel, 5 the GEMM)
_OPS = dict(h=(5, 9), w=(5, 9), c_in=[1, 2, 3], c_out=[1, 5]) if SIMULATED else dict(
    h=(5, 17), w=(5, 17), c_in=[1, 2, 3, 9], c_out=[1, 4, 16])


@examples(40, simulated=6)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.integers(0, 2),
       st.integers(*_OPS["h"]), st.integers(*_OPS["w"]), st.sampled_from(_OPS["c_in"]),
       st.sampled_from(_OPS["c_out"]), st.booleans())
def test_operators_match_reference(backend, seed, k, stride, padding, h, w, c_in, c_out, integer):
    check_operators(get_backend(backend), seed, k, stride, padding, h, w, c_in, c_out, integer)


def _small_net():
    rng = np.random.default_rng(0)
    return Network([Conv(rng.normal(size=(3, 1, 3, 3)), np.zeros(3), 1, 1), ReLU(), MaxPool(2),
                    Conv(rng.normal(size=(2, 3, 1, 1)), np.zeros(2))], input_shape=(1, None, None))


@pytest.mark.parametrize("call, message", [
    (lambda m, net, tr: m.forward(net, np.zeros((1, 2, 6, 6))), "channels"),
    (lambda m, net, tr: m.forward(net, np.full((1, 1, 6, 6), np.nan)), r"NaN or Inf \(first at index \(0, 0, 0, 0\)\)"),
    (lambda m, net, tr: m.forward(net, np.zeros((1, 1, 6, 6), np.float16)), "float16"),
    (lambda m, net, tr: m.forward(net, np.zeros((1, 1, 1, 1))), "too small"),
    (lambda m, net, tr: m.clear_from_trace(net, tr, np.array([[5]])), "classes"),
    (lambda m, net, tr: m.clear_from_trace(net, tr, np.array([[0]]), reduce="mean"), "reduce"),
    (lambda m, net, tr: m.clear_from_trace(net, tr, np.array([[0]]), vmax=-1.0), "vmax"),
    (lambda m, net, tr: m.clear_from_trace(net, tr, np.array([[0, 1]]), palette=[0.5]), "palette"),
    (lambda m, net, tr: m.backproject(net, tr, np.array([[0]]), rectify="yes"), "rectify"),
    (lambda m, net, tr: m.conv2d(np.zeros((1, 2, 5, 5)), np.zeros((3, 1, 3, 3))), "channels"),
    (lambda m, net, tr: m.conv_transpose2d(np.zeros((1, 3, 3, 3)), np.zeros((3, 1, 3, 3)), 2, 0, (9, 9)),
     "does not fit"),
    (lambda m, net, tr: m.max_pool_with_switches(np.zeros((1, 1, 4, 4)), 2, 2, 2), "half the kernel"),
    (lambda m, net, tr: m.unpool(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 99), (4, 4)), "outside"),
    (lambda m, net, tr: m.compose(np.full((1, 2, 2), 3), np.zeros((1, 2, 2)), num_classes=2), "palette"),
    (lambda m, net, tr: m.compose(np.zeros((1, 2, 2), np.int64), np.zeros((1, 2, 2)), num_classes=0),
     "num_classes"),
    (lambda m, net, tr: m.dominant(np.zeros((1, 0, 2, 2))), "K = 0"),
])
def test_bad_input_gets_one_clear_error(backend, call, message):
    impl = get_backend(backend)
    net = _small_net()
    trace = ref.forward(net, np.ones((1, 1, 6, 6)))
    with pytest.raises(ClearmapsError, match=message):
        call(impl, net, trace)


# --------------------------------------------------------------------------------- negative controls
# The checkers above, run on known-wrong backends (tests/wrong_backends) with cases where the mistake
# matters, must fail: a checker that passed them would pass a broken backend too.

def _control_case(integer: bool, seed: int = 3):
    """A network with an overlapping pool between ReLUs and a head ReLU; integer cases tie everywhere."""
    from .strategies import Case

    rng = np.random.default_rng(seed)

    def conv(i, o, k=3, s=1, p=1):
        if integer:
            return Conv(rng.integers(-2, 3, (o, i, k, k)).astype(float), rng.integers(-1, 2, o).astype(float), s, p)
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, s, p)

    net = Network([conv(2, 4), ReLU(), MaxPool(3, 2, 1), conv(4, 4), ReLU(), MaxPool(2), conv(4, 3, 1, 1, 0), ReLU()])
    x = rng.integers(0, 3, (2, 2, 12, 11)).astype(float) if integer else rng.normal(size=(2, 2, 12, 11))
    return Case(net, x, integer)


@pytest.mark.parametrize("wrong, checker", [
    ("no_rectification", "back_projection"),
    ("dropped_switch", "back_projection"),
    ("last_maximum", "forward"),
    ("last_maximum", "operators"),
])
def test_known_wrong_backends_fail_the_checkers(wrong, checker):
    impl = wrong_backend(wrong)
    classes = np.array([[0, 1, 2], [2, 0, 1]])
    run = {"forward": lambda: check_forward(impl, _control_case(integer=True)),
           "back_projection": lambda: check_back_projection(impl, _control_case(integer=False), classes),
           "operators": lambda: check_operators(impl, 5, 3, 1, 1, 9, 8, 2, 4, True)}[checker]
    with pytest.raises(AssertionError):
        run()


@pytest.mark.parametrize("checker", ["forward", "back_projection", "operators"])
def test_the_control_cases_pass_on_the_reference(checker):
    """The positive twins of the negative controls: the same cases and checkers pass the reference itself, so
    the failures above are the wrong backends' mistakes, not the cases'."""
    classes = np.array([[0, 1, 2], [2, 0, 1]])
    {"forward": lambda: check_forward(ref, _control_case(integer=True)),
     "back_projection": lambda: check_back_projection(ref, _control_case(integer=False), classes),
     "operators": lambda: check_operators(ref, 5, 3, 1, 1, 9, 8, 2, 4, True)}[checker]()
