"""The graph path's primitives (kernels/cuda/graph.py's device ``ops``, on the kernels of graph_kernels.py)
against the reference's operations (reference/ops.py, float64): grouped, depthwise and dilated convs forward
and transposed on both routes (columns + GEMM for groups 1, direct kernels otherwise; the GEMM columns in
several blocks), max pools with padding, dilation and ceil_mode (switches exactly equal, ties included),
unpooling through shared switches, average and adaptive pools and their transposes, erf; every linear step the
adjoint of its forward; and negative controls, kernels with one known mistake each that the same checks must
catch. Shapes are tiny: under the simulator every GPU thread is a Python thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numba import cuda

from clearmaps import ClearmapsError
from clearmaps.kernels import cuda as kc
from clearmaps.reference import ops as R

from ..tolerances import RTOL_F32, assert_close, assert_equal

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import graph as G  # noqa: E402  (after the availability check)
from clearmaps.kernels.cuda import graph_kernels as gk  # noqa: E402
from clearmaps.kernels.cuda.device import asdevice, tohost  # noqa: E402

OPS = G.device_ops()


def examples(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def dev(a, dtype=np.float32):
    return asdevice(np.asarray(a), dtype)


def host(a):
    """A device result on the host, floats as float64 (what the reference computes in)."""
    a = np.asarray(tohost(a))
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def inner(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def assert_adjoint(lhs_pair, rhs_pair, what):
    """<f(x), y> = <x, f*(y)> in float32: the difference within 1e-5 of ||x||·||f*(y)|| + ||f(x)||·||y||."""
    (fx, y), (x, fty) = lhs_pair, rhs_pair
    lhs, rhs = inner(fx, y), inner(x, fty)
    scale = np.linalg.norm(np.ravel(x)) * np.linalg.norm(np.ravel(fty)) + \
        np.linalg.norm(np.ravel(fx)) * np.linalg.norm(np.ravel(y))
    assert abs(lhs - rhs) <= 1e-5 * scale, f"{what}: <f(x), y> = {lhs}, <x, f*(y)> = {rhs}"


# ---- convolutions ----------------------------------------------------------------------------------------------

class ConvCase:
    """x (B, G*Ig, H, W), w (G*Og, Ig, kh, kw), b, the conv's geometry, and a signal y of its output's shape."""

    def __init__(self, seed, B, groups, Ig, Og, kernel, stride, padding, dilation, size):
        rng = np.random.default_rng(seed)
        self.groups, self.stride, self.padding, self.dilation, self.size = groups, stride, padding, dilation, size
        self.x = rng.normal(size=(B, groups * Ig, *size))
        self.w = rng.normal(size=(groups * Og, Ig, *kernel))
        self.b = rng.normal(size=groups * Og)
        self.out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                         for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))
        self.y = rng.normal(size=(B, groups * Og, *self.out)) if min(self.out) >= 1 else None

    @property
    def geometry(self):
        return self.stride, self.padding, self.dilation, self.groups

    def __repr__(self):
        return (f"ConvCase(x {self.x.shape}, w {self.w.shape}, stride {self.stride}, padding {self.padding}, "
                f"dilation {self.dilation}, groups {self.groups})")


@st.composite
def conv_cases(draw):
    """groups 1 (the columns + GEMM route), 2-3 (grouped) or one input channel per group (depthwise, with a
    channel multiplier of 1 or 2): the direct kernels."""
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    Ig = 1 if kind == "depthwise" else draw(st.integers(1, 3))
    groups = {"plain": 1, "grouped": draw(st.integers(2, 3)), "depthwise": draw(st.integers(2, 4))}[kind]
    Og = draw(st.integers(1, 2)) if kind == "depthwise" else draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, (d * (k - 1)) // 2 + 1)) for k, d in zip(kernel, dilation))
    size = (draw(st.integers(3, 9)), draw(st.integers(3, 9)))
    case = ConvCase(draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 2)), groups, Ig, Og, kernel, stride, padding,
                    dilation, size)
    assume(min(case.out) >= 1)
    return case


def check_conv(ops, case: ConvCase):
    got = ops.conv2d(dev(case.x), case.w, case.b, *case.geometry)
    assert_close(host(got), R.conv2d(case.x, case.w, case.b, *case.geometry), RTOL_F32, f"conv2d {case!r}")


def check_conv_transpose(ops, case: ConvCase):
    """The transposed conv back to the conv's input size (which a strided conv's smallest size may not be)."""
    s, p, d, g = case.geometry
    got = ops.conv_transpose2d(dev(case.y), case.w, s, p, case.size, d, g)
    assert_close(host(got), R.conv_transpose2d(case.y, case.w, s, p, case.size, d, g), RTOL_F32,
                 f"conv_transpose2d {case!r}")


def check_conv_adjoint(ops, case: ConvCase):
    s, p, d, g = case.geometry
    fx = host(ops.conv2d(dev(case.x), case.w, None, s, p, d, g))
    fty = host(ops.conv_transpose2d(dev(case.y), case.w, s, p, case.size, d, g))
    assert_adjoint((fx, case.y), (case.x, fty), f"conv {case!r}")


@examples(40)
@given(conv_cases())
def test_conv_equals_the_reference(case):
    check_conv(OPS, case)


@examples(40)
@given(conv_cases())
def test_conv_transpose_equals_the_reference(case):
    check_conv_transpose(OPS, case)


@examples(25)
@given(conv_cases())
def test_conv_transpose_is_the_adjoint_of_the_conv(case):
    check_conv_adjoint(OPS, case)


def test_gemm_columns_in_many_blocks():
    """A workspace of a few columns: the forward's columns in blocks of 3 and the transposed conv's signals one
    at a time give the reference's results (the block offsets j0 and n0 are right)."""
    case = ConvCase(7, 3, 1, 2, 3, (3, 2), (2, 1), (1, 1), (2, 1), (7, 6))
    ops = G.device_ops(kc.CudaConfig(column_bytes=4 * 2 * 3 * 2 * 3))
    check_conv(ops, case)
    check_conv_transpose(ops, case)
    check_conv_adjoint(ops, case)


def test_a_conv_that_does_not_fit_is_refused():
    case = ConvCase(0, 1, 2, 2, 1, (3, 3), (1, 1), (0, 0), (1, 1), (5, 5))
    with pytest.raises(ClearmapsError, match="groups=3"):
        OPS.conv2d(dev(case.x), case.w, None, 1, 0, 1, 3)
    with pytest.raises(ClearmapsError, match="output_size"):
        OPS.conv_transpose2d(dev(case.y), case.w, 1, 0, (6, 6), 1, 2)


# ---- pools ---------------------------------------------------------------------------------------------------

@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, (d * (k - 1) + 1) // 2)) for k, d in zip(kernel, dilation))
    ceil = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(2, 8)))
    # small integers after a ReLU: windows of equal values everywhere, exact in float32
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float64)
    try:
        want = R.max_pool_with_switches(x, kernel, stride, padding, dilation, ceil)
    except ClearmapsError:
        assume(False)
    return x, (kernel, stride, padding, dilation, ceil), want, rng


def check_max_pool(ops, x, geometry, want):
    pooled, switches = ops.max_pool_with_switches(dev(x), *geometry)
    assert_equal(host(pooled), want[0], f"pooled values, pool {geometry}")
    assert_equal(tohost(switches), want[1], f"switches (first maximum in row-major order), pool {geometry}")
    assert tohost(switches).dtype == np.int64


def check_unpool(ops, y, switches, size):
    got = ops.unpool(dev(y), dev(switches, np.int64), size)
    assert_equal(host(got), R.unpool(y, switches, size), "unpool")


@examples(40)
@given(pool_cases())
def test_max_pool_switches_equal_the_reference(case):
    x, geometry, want, _ = case
    check_max_pool(OPS, x, geometry, want)


@examples(30)
@given(pool_cases())
def test_unpool_equals_the_reference_and_is_the_adjoint_of_reading_at_the_switches(case):
    x, geometry, (pooled, switches), rng = case
    y = rng.integers(-3, 4, size=pooled.shape).astype(np.float64)  # integers: float32 sums are exact
    check_unpool(OPS, y, switches, x.shape[2:])
    probe = rng.normal(size=x.shape)
    back = host(OPS.unpool(dev(y), dev(switches, np.int64), x.shape[2:]))
    assert_adjoint((R.gather_at_switches(probe, switches), y), (probe, back), "unpool")


@st.composite
def avg_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    options = (draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([None, 3])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 8)),
                         draw(st.integers(2, 8))))
    try:
        fx = R.avg_pool2d(x, kernel, stride, padding, *options)
    except ClearmapsError:
        assume(False)
    return x, (kernel, stride, padding, *options), fx, rng.normal(size=fx.shape)


@examples(30)
@given(avg_cases())
def test_average_pool_and_its_transpose_equal_the_reference(case):
    x, (kernel, stride, padding, *options), fx, y = case
    assert_close(host(OPS.avg_pool2d(dev(x), kernel, stride, padding, *options)), fx, RTOL_F32, "avg_pool2d")
    back = host(OPS.avg_pool2d_transpose(dev(y), x.shape[2:], kernel, stride, padding, *options))
    assert_close(back, R.avg_pool2d_transpose(y, x.shape[2:], kernel, stride, padding, *options), RTOL_F32,
                 "avg_pool2d_transpose")
    assert_adjoint((fx, y), (x, back), f"avg_pool2d {kernel, stride, padding, *options}")


@examples(20)
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
def test_adaptive_pool_and_its_transpose_equal_the_reference(seed, H, W, oh, ow):
    """Any output size, smaller or larger than the input (windows then overlap or repeat)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 2, H, W))
    y = rng.normal(size=(2, 2, oh, ow))
    fx = host(OPS.adaptive_avg_pool2d(dev(x), (oh, ow)))
    assert_close(fx, R.adaptive_avg_pool2d(x, (oh, ow)), RTOL_F32, "adaptive_avg_pool2d")
    back = host(OPS.adaptive_avg_pool2d_transpose(dev(y), (H, W)))
    assert_close(back, R.adaptive_avg_pool2d_transpose(y, (H, W)), RTOL_F32, "adaptive_avg_pool2d_transpose")
    assert_adjoint((fx, y), (x, back), f"adaptive pool {H}x{W} -> {oh}x{ow}")


def test_erf():
    x = np.concatenate([np.linspace(-6, 6, 97), [0.0, -0.0, 1e-8, 30.0, -30.0]])
    want = np.array([math.erf(v) for v in x.astype(np.float32).astype(np.float64)])
    got = host(OPS.erf(dev(x.reshape(3, 34))))
    assert got.shape == (3, 34)
    np.testing.assert_allclose(got.ravel(), want, rtol=2e-7, atol=2e-7)


def test_constants_go_up_once_per_array():
    a = np.arange(6.0).reshape(2, 3)
    first = OPS.const(a, None)
    assert OPS.const(a, None) is first and first.dtype == np.float32
    assert_equal(host(first), a)
    assert OPS.const(None, None) is None


# ---- negative controls: one known mistake each, which the checks above must catch ------------------------------

@cuda.jit
def _transpose_ignoring_the_group_offset(y, w, out, groups, sh, sw, ph, pw, dh, dw):
    """graph_kernels.conv_transpose_direct with o = oo instead of g*Og + oo: every group reads group 0's kernels."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, I, H, W = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * H * W:
        return
    oh, ow = y.shape[2], y.shape[3]
    O, Ig, kh, kw = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    Og = O // groups
    ix = p % W
    iy = (p // W) % H
    n = p // (W * H)
    c0 = cuda.blockIdx.y * gk.CHANNELS
    for c in range(c0, min(c0 + gk.CHANNELS, I)):
        i = c % Ig
        acc = np.float32(0.0)
        for oo in range(Og):
            o = oo  # the mistake
            for ky in range(kh):
                ty = iy + ph - ky * dh
                if ty < 0 or ty % sh != 0 or ty // sh >= oh:
                    continue
                for kx in range(kw):
                    tx = ix + pw - kx * dw
                    if tx < 0 or tx % sw != 0 or tx // sw >= ow:
                        continue
                    acc += w[o, i, ky, kx] * y[n, o, ty // sh, tx // sw]
        out[n, c, iy, ix] = acc


@cuda.jit
def _max_pool_keeping_the_last_maximum(x, out, switches, kh, kw, sh, sw, ph, pw, dh, dw):
    """graph_kernels.max_pool_switches with '>=': the last maximum of a window wins its ties."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, oh, ow = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
    if p >= N * oh * ow:
        return
    H, W = x.shape[2], x.shape[3]
    ox = p % ow
    oy = (p // ow) % oh
    n = p // (ow * oh)
    c0 = cuda.blockIdx.y * gk.CHANNELS
    for c in range(c0, min(c0 + gk.CHANNELS, C)):
        best = np.float32(-math.inf)
        where = 0
        for ky in range(kh):
            iy = oy * sh - ph + ky * dh
            for kx in range(kw):
                ix = ox * sw - pw + kx * dw
                if iy >= 0 and iy < H and ix >= 0 and ix < W and x[n, c, iy, ix] >= best:  # the mistake
                    best = x[n, c, iy, ix]
                    where = iy * W + ix
        out[n, c, oy, ox] = best
        switches[n, c, oy, ox] = where


@cuda.jit
def _unpool_overwriting(y, switches, out):
    """graph_kernels.unpool_planes with '=' for '+=': windows that share a switch keep only the last value."""
    q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    N, C, oh, ow = y.shape[0], y.shape[1], y.shape[2], y.shape[3]
    if q >= N * C:
        return
    for u in range(oh):
        for v in range(ow):
            out[q // C, q % C, switches[q // C, q % C, u, v]] = y[q // C, q % C, u, v]  # the mistake


def _grouped_case():
    return ConvCase(3, 2, 3, 2, 2, (3, 2), (2, 1), (1, 0), (1, 2), (7, 6))


def _tied_pool():
    """A 3x3 stride-1 pool over a plane with a few peaks on zeros: windows tie on zeros and share peaks."""
    x = np.zeros((1, 2, 6, 7))
    x[0, 0, 2, 3] = x[0, 1, 4, 1] = x[0, 1, 1, 5] = 2.0
    geometry = ((3, 3), (1, 1), (1, 1), (1, 1), False)
    return x, geometry, R.max_pool_with_switches(x, *geometry)


NEGATIVE = {
    "transposed grouped conv ignoring the group offset":
        ("conv_transpose_direct", _transpose_ignoring_the_group_offset,
         lambda: (check_conv_transpose(OPS, _grouped_case()), check_conv_adjoint(OPS, _grouped_case()))),
    "max pool keeping the last maximum":
        ("max_pool_switches", _max_pool_keeping_the_last_maximum, lambda: check_max_pool(OPS, *_tied_pool())),
    "unpool overwriting shared switches":
        ("unpool_planes", _unpool_overwriting,
         lambda: check_unpool(OPS, np.arange(1.0, 1 + _tied_pool()[2][1].size).reshape(_tied_pool()[2][1].shape),
                              _tied_pool()[2][1], (6, 7))),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_the_known_wrong_kernels_fail_the_checks_the_true_ones_pass(monkeypatch, name):
    kernel, wrong, check = NEGATIVE[name]
    check()  # the positive twin: the true kernel passes
    monkeypatch.setattr(gk, kernel, wrong)
    with pytest.raises(AssertionError):
        check()
    if kernel == "conv_transpose_direct":  # the mistake breaks adjointness too, not only the reference match
        with pytest.raises(AssertionError, match="<f\\(x\\), y>"):
            check_conv_adjoint(OPS, _grouped_case())
