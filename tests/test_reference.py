"""The reference against the torch autograd oracle, and the mathematical properties of docs/design.md."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clearmaps import reference as ref
from clearmaps.reference import ClearmapsError, Conv, MaxPool, Network, ReLU

from .oracle import reference_layer, switch_flips, torch_logits, torch_responses, torch_switches
from .strategies import clear_cases
from .tolerances import RTOL_F64, assert_close, assert_equal, rel_err

WORST = {"rel_err": 0.0, "networks": 0}  # reported by test_zz_report_oracle_agreement


@settings(max_examples=60)
@given(clear_cases())
def test_reference_equals_torch_autograd_oracle(case):
    """R(x|c) of the reference equals the input gradient of ½Σz_L[c]² with deconvnet ReLUs (float64)."""
    trace = ref.forward(case.net, case.x)
    assert_close(trace.logits, torch_logits(case.net, case.x), RTOL_F64, "logits")
    # a near-tie that torch's summation order breaks the other way moves whole values: not comparable
    assume(switch_flips(case.net, case.x, trace) == 0)
    classes = np.arange(case.net.num_classes)
    got = ref.backproject(case.net, trace, classes)
    want = torch_responses(case.net, case.x, classes)
    assert_close(got, want, RTOL_F64, "R(x|c)")
    WORST["rel_err"] = max(WORST["rel_err"], rel_err(got, want))
    WORST["networks"] += 1


def test_zz_report_oracle_agreement():
    """Prints the worst relative error seen against the torch oracle (run with -s to see it)."""
    if WORST["networks"]:
        print(f"\nreference vs torch autograd oracle: worst relative error {WORST['rel_err']:.2e} over "
              f"{WORST['networks']} networks")
        assert WORST["rel_err"] <= RTOL_F64


@settings(max_examples=40)
@given(clear_cases())
def test_switches_equal_torch_max_pool_indices(case):
    """Every max pool's switches are torch's return_indices on the same pool input (first maximum in
    row-major window order): exactly, ties included."""
    trace = ref.forward(case.net, case.x)
    x = case.x
    for i, layer in enumerate(case.net.layers):
        if isinstance(layer, MaxPool):
            assert_equal(trace.switches[i], torch_switches(x, layer.kernel, layer.stride, layer.padding),
                         f"switches of layer {i}")
        x = reference_layer(layer, x)


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(2, 2, 0), (3, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1)]),
       st.integers(3, 13), st.integers(3, 13))
def test_unpool_is_the_adjoint_of_gathering_at_the_switches(seed, pool, h, w):
    """<unpool(y, s), x> = <y, gather(x, s)> for any y and x: unpooling adds, even where windows overlap."""
    rng = np.random.default_rng(seed)
    k, s, p = pool
    if (h + 2 * p - k) // s + 1 < 1 or (w + 2 * p - k) // s + 1 < 1:
        return
    pooled, switches = ref.max_pool_with_switches(rng.integers(0, 3, (2, 2, h, w)).astype(float), k, s, p)
    y = rng.normal(size=pooled.shape)
    x = rng.normal(size=(2, 2, h, w))
    lhs = np.vdot(ref.unpool(y, switches, (h, w)), x)
    rhs = np.vdot(y, ref.gather_at_switches(x, switches))
    assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3]), st.integers(0, 2),
       st.integers(5, 17), st.integers(5, 17))
def test_conv_transpose_is_the_adjoint_of_conv_and_matches_torch(seed, k, stride, padding, h, w):
    """<conv(x), y> = <x, conv_transpose(y)>; and conv / conv_transpose equal torch's (output padding too)."""
    rng = np.random.default_rng(seed)
    padding = min(padding, k // 2)
    x = rng.normal(size=(2, 3, h, w))
    weight = rng.normal(size=(4, 3, k, k))
    y = ref.conv2d(x, weight, None, stride, padding)
    g = rng.normal(size=y.shape)
    back = ref.conv_transpose2d(g, weight, stride, padding, (h, w))
    assert math.isclose(np.vdot(y, g), np.vdot(x, back), rel_tol=1e-10, abs_tol=1e-10)
    tx, tw, tg = (torch.from_numpy(a) for a in (x, weight, g))
    assert_close(y, F.conv2d(tx, tw, None, stride, padding).numpy(), 1e-12, "conv2d")
    out_pad = tuple(n - ((m - 1) * stride - 2 * padding + k) for n, m in zip((h, w), y.shape[2:]))
    assert_close(back, F.conv_transpose2d(tg, tw, None, stride, padding, out_pad).numpy(), 1e-12,
                 "conv_transpose2d")


@settings(max_examples=30)
@given(clear_cases(), st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 2**32 - 1))
def test_without_rectification_the_map_is_linear_in_z(case, a, b, seed):
    """rectify=False is Eq. 2 literally: R is linear in z_L (for fixed switches)."""
    trace = ref.forward(case.net, case.x)
    rng = np.random.default_rng(seed)
    z1, z2 = rng.normal(size=trace.z.shape), rng.normal(size=trace.z.shape)
    R = lambda z: ref.backproject(case.net, dataclasses.replace(trace, z=z), None, rectify=False)  # noqa: E731
    assert_close(R(a * z1 + b * z2), a * R(z1) + b * R(z2), 1e-10, "R(a z1 + b z2)")


def test_rectification_breaks_linearity():
    """Negative control for the test above: with rectify=True a ReLU below the head makes R non-linear."""
    rng = np.random.default_rng(1)
    net = Network([Conv(rng.normal(size=(3, 1, 3, 3)), np.zeros(3), 1, 1), ReLU(),
                   Conv(rng.normal(size=(2, 3, 1, 1)), np.zeros(2))])
    trace = ref.forward(net, rng.normal(size=(1, 1, 6, 6)))
    z = rng.normal(size=trace.z.shape)
    R = lambda z: ref.backproject(net, dataclasses.replace(trace, z=z), None, rectify=True)  # noqa: E731
    assert rel_err(R(-z), -R(z)) > 0.1


def _no_rectify_variant(net, trace, classes):
    """Known-wrong: the back-projection without rectification, standing in for a backend that forgot it."""
    return ref.backproject(net, trace, classes, rectify=False)


def _last_max_pool(x, kernel, stride, padding):
    """Known-wrong: the last maximum of each window wins ties (NumPy's reversed scan) instead of the first."""
    flipped = x[:, :, ::-1, ::-1]
    H, W = x.shape[2:]
    pooled, sw = ref.max_pool_with_switches(flipped, kernel, stride, padding)
    rows, cols = sw // W, sw % W
    return pooled, (H - 1 - rows) * W + (W - 1 - cols)


def test_negative_controls_are_caught():
    """The oracle comparison bites: a back-projection without rectification and a max pool with the wrong tie
    rule both fail it, on networks where it matters."""
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(4, 1, 3, 3)), rng.normal(size=4), 1, 1), ReLU(),
                   MaxPool((2, 2)), Conv(rng.normal(size=(3, 4, 3, 3)), rng.normal(size=3), 1, 1)])
    x = rng.normal(size=(1, 1, 10, 10))
    want = torch_responses(net, x, range(3))
    assert rel_err(ref.backproject(net, ref.forward(net, x), None), want) <= RTOL_F64
    with pytest.raises(AssertionError):
        assert_close(_no_rectify_variant(net, ref.forward(net, x), None), want, RTOL_F64, "no-rectify variant")
    ties = np.zeros((1, 1, 4, 4))  # a window of zeros: every element ties
    ties[0, 0, 3, 3] = 1.0
    with pytest.raises(AssertionError):
        assert_equal(_last_max_pool(ties, (2, 2), (2, 2), (0, 0))[1], torch_switches(ties, 2, 2, 0), "last-max")
    assert_equal(ref.max_pool_with_switches(ties, 2)[1], torch_switches(ties, 2, 2, 0), "first-max")


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.booleans())
def test_dominant_is_max_and_first_argmax(seed, k, integer):
    """D = max_c r and C = the first c reaching it, pixel by pixel (Eqs. 4–5)."""
    rng = np.random.default_rng(seed)
    r = rng.integers(-2, 3, (2, k, 5, 4)).astype(float) if integer else rng.normal(size=(2, k, 5, 4))
    index, response = ref.dominant(r)
    for b, i, j in np.ndindex(2, 5, 4):
        values = list(r[b, :, i, j])
        assert response[b, i, j] == max(values)
        assert index[b, i, j] == values.index(max(values))


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.sampled_from([None, 2.0, "batch", "p90"]))
def test_compose_equals_colorsys_per_pixel(seed, k, vmax):
    """Eq. 6: each pixel is colorsys.hsv_to_rgb(palette[C], 1, V) with bytes rounded half up."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, k, (2, 4, 5))
    response = rng.normal(size=(2, 4, 5))
    response[0, 0, 0] = 0.0
    palette = rng.uniform(0, 1, k) if seed % 2 else None
    rgb = ref.compose(index, response, palette, vmax, num_classes=k)
    hues = palette if palette is not None else [c / k for c in range(k)]
    for b in range(2):
        if vmax is None:
            level = max(float(response[b].max()), 0.0)
        elif vmax == "batch":
            level = max(float(response.max()), 0.0)
        elif vmax == "p90":
            pos = response[b][response[b] > 0]
            level = float(np.percentile(pos, 90)) if pos.size else 0.0
        else:
            level = vmax
        for i, j in np.ndindex(4, 5):
            d = float(response[b, i, j])
            v = min(max(d, 0.0), level) / level if level > 0 else 0.0
            want = [math.floor(255 * c + 0.5) for c in colorsys.hsv_to_rgb(hues[index[b, i, j]], 1.0, v)]
            assert rgb[b, i, j].tolist() == want, (b, i, j, d, level)


def test_hsv_to_rgb_equals_colorsys_on_a_grid():
    h, s, v = np.meshgrid(np.linspace(0, 1, 37), np.linspace(0, 1, 5), np.linspace(0, 1, 5), indexing="ij")
    got = ref.hsv_to_rgb(h, s, v)
    for idx in np.ndindex(h.shape):
        assert tuple(got[idx]) == colorsys.hsv_to_rgb(h[idx], s[idx], v[idx])


def test_default_palette_is_evenly_spaced_pure_hues():
    assert ref.default_palette(4).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert ref.palette_rgb(ref.default_palette(3)).tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_non_positive_responses_are_black():
    rgb = ref.compose(np.zeros((1, 1, 3), int), np.array([[[-1.0, 0.0, 2.0]]]), num_classes=2)
    assert rgb[0, 0].tolist() == [[0, 0, 0], [0, 0, 0], [255, 0, 0]]
    assert not ref.compose(np.zeros((1, 2, 2), int), -np.ones((1, 2, 2)), num_classes=1).any()


def test_reduce_channels():
    R = np.array([[[[1.0]], [[-2.0]], [[2.0]]]])[None]  # (1, 1, 3, 1, 1)
    assert ref.reduce_channels(R, "sum").item() == 1.0
    assert ref.reduce_channels(R, "max").item() == 2.0
    assert ref.reduce_channels(R, "norm").item() == 3.0
    with pytest.raises(ClearmapsError, match="reduce"):
        ref.reduce_channels(R, "mean")


def test_backproject_refuses_a_non_boolean_rectify():
    net = Network([Conv(np.ones((2, 1, 1, 1)), np.zeros(2))])
    trace = ref.forward(net, np.ones((1, 1, 3, 3)))
    with pytest.raises(ClearmapsError, match="rectify='no'"):
        ref.backproject(net, trace, None, rectify="no")


def test_float32_input_computes_in_float32_when_asked():
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(2, 1, 3, 3)), np.zeros(2))])
    x = rng.normal(size=(1, 1, 5, 5)).astype(np.float32)
    assert ref.attentive_responses(net, x).dtype == np.float64
    assert ref.attentive_responses(net, x, dtype=np.float32).dtype == np.float32
