"""lab/direct_rows.py: the row-blocked direct transposed conv against the product's direct kernel (the same
bits: the same summation order) and the float64 reference; and in the pipeline through lab.variants.RowsDirect."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU
from tests.tolerances import RTOL_F32, assert_close, assert_equal

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import backproject_kernels as bk  # noqa: E402
from clearmaps.kernels.cuda.device import THREADS  # noqa: E402
from tests.cuda_sim.test_routes import check_pipeline  # noqa: E402

from lab import direct_rows as dr  # noqa: E402
from lab.variants import RowsDirect  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([(1, 1, 0, 0), (2, 2, 1, 1), (3, 3, 0, 0), (3, 3, 1, 1), (5, 5, 2, 2),
                                                (3, 1, 1, 0), (2, 5, 0, 2)]),
       st.integers(1, 5), st.integers(1, 3), st.integers(1, 2), st.integers(1, 9), st.integers(1, 11), st.booleans(),
       st.sampled_from([1, 3, 4]))
def test_row_direct_kernel_equals_the_direct_kernel_bit_for_bit(seed, conv, O, I, n, H, W, pre, px):
    """The row-blocked direct kernel (px pixels of a row per thread, sharing their loads) against the direct
    kernel it may replace: the same bits (same summation order), and the reference to float32 tolerance.
    Kernels 1-5, square or not, with and without padding, rows shorter than, equal to and not a multiple of
    px (a ragged last run), several signals, rectified or not."""
    kh, kw, ph, pw = conv
    Hs, Ws = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1  # the source plane a stride-1 transposed conv maps to (H, W)
    if Hs < 1 or Ws < 1:
        return
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, O, Hs, Ws))
    weight = rng.normal(size=(O, I, kh, kw))
    want = ref.conv_transpose2d(np.maximum(y, 0) if pre else y, weight, 1, (ph, pw))
    assert want.shape[2:] == (H, W)
    src = np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32).reshape(-1)
    w32 = weight.astype(np.float32).reshape(-1)
    rows = np.full(I * n * H * W, np.nan, np.float32)
    dr.direct_rows(I, kh, kw, ph, pw, px)[-(-(n * H * -(-W // px)) // THREADS), THREADS](
        src, w32, rows, O, n, Hs, Ws, H, W, pre)
    plain = np.full(I * n * H * W, np.nan, np.float32)
    bk.direct_transpose(I, kh, kw, 1, 1, ph, pw, bk.DENSE, None)[-(-(n * H * W) // THREADS), THREADS](
        src, np.zeros(1, np.int32), w32, plain, O, n, Hs, Ws, Hs, Ws, H, W, 0, 1, pre, False)
    assert_equal(rows, plain, "row-blocked vs plain direct kernel")
    assert_close(rows.reshape(I, n, H, W).transpose(1, 0, 2, 3), want, RTOL_F32, "row-blocked direct kernel")


def test_row_direct_kernel_in_the_pipeline(monkeypatch):
    """The RowsDirect variant: the last transposed conv (2 channels, a dense rectified source, rows of 10 that
    are not a multiple of 4 pixels) runs as the row-blocked kernel, and the pipeline meets the contract."""
    used = []
    real = dr.direct_rows
    monkeypatch.setattr(dr, "direct_rows", lambda *a: used.append(a) or real(*a))
    rng = np.random.default_rng(5)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    net = Network([conv(2, 6), ReLU(), conv(6, 6), ReLU(), MaxPool(2), conv(6, 3, 1, 0), ReLU()])
    x = rng.normal(size=(2, 2, 11, 10))
    check_pipeline(net, x, np.array([[0, 2, 1], [2, 1, 0]]), kc.CudaConfig(variants=(RowsDirect(),)))
    assert used and set(used) == {(2, 3, 3, 1, 1, dr.DIRECT_ROW_PIXELS)}
