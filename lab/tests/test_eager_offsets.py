"""lab/eager_offsets.py: the sparse kernel with its switch offsets loaded ahead of the zero tests computes the
product kernel's bits, and the pipeline through lab.variants.EagerOffsets meets the contract."""

from __future__ import annotations

import numpy as np
import pytest

from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU
from tests.cuda_sim.signals import signals
from tests.tolerances import assert_equal

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import sparse_kernels as sk  # noqa: E402
from tests.cuda_sim.test_routes import check_pipeline  # noqa: E402

from lab import eager_offsets as eo  # noqa: E402
from lab.variants import EagerOffsets  # noqa: E402


@pytest.mark.parametrize("pool, cpt", [((2, 2, 0), 2), ((3, 2, 1), 1)])
def test_eager_offsets_change_the_schedule_not_the_bits(pool, cpt):
    """Each window's switch offset loaded beside its value, before the zero test, and tested there (so the
    compiler cannot sink the load into the branch); the FMAs and their order are the lazy walk's, so the
    outputs are the same bits. The sources must differ as intended (else this test proves nothing), and a
    dense source has no offsets: its kernel is the product's."""
    rng = np.random.default_rng(3)
    B, kc_, O, I, Hu, Wu = 2, 1, 5, 33, 10, 9
    y, offsets, geo, _ = signals(rng, B, kc_, O, Hu, Wu, pool)
    n, Hs, Ws = B * kc_, *y.shape[2:]
    weight = np.ascontiguousarray(rng.normal(size=(O, 3, 3, I)), np.float32).reshape(-1)
    src = np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32).reshape(-1)
    threads = sk.block_threads(I, cpt)
    TY, TX = sk.tile_shape(geo, kc.CudaConfig().tile)
    H, W = Hu, Wu
    lazy = sk.kernel_source(3, 3, 1, 1, geo, threads, False, (TY, TX), cpt)
    eager = eo.eager_source(lazy)
    windows = len(sk.layout(3, 3, 1, 1, geo, (TY, TX))[-1])
    assert lazy.count("if s != zero:") == windows and eager.count("if (s != zero) & (d >= 0):") == windows
    assert lazy.count("d = soff[") == eager.count("d = soff[") == windows and "if s != zero:" not in eager
    outs = []
    for build in (sk.sparse_transpose, eo.sparse_transpose):
        out = np.zeros(I * n * H * W, np.float32)
        build(3, 3, 1, 1, geo, threads, False, (TY, TX), cpt)[
            (n * -(-H // TY) * -(-W // TX), -(-I // (threads * cpt))), threads](
            src, offsets.reshape(-1), weight, np.zeros(1, np.float32), out, O, I, n, Hs, Ws, H, W, -(-W // TX),
            -(-H // TY), 0, kc_, True)
        outs.append(out)
    assert np.abs(outs[0]).max() > 0
    assert_equal(outs[1], outs[0], "eager against lazy offsets")
    assert eo.sparse_transpose(3, 3, 1, 1, None, threads, False, (4, 8), cpt) is sk.sparse_transpose(
        3, 3, 1, 1, None, threads, False, (4, 8), cpt)
    assert eo.kernel_name(3, 3, 1, 1, geo, threads, False, (TY, TX), cpt).endswith("_eager")


def test_eager_offsets_in_the_pipeline(monkeypatch):
    """The EagerOffsets variant runs the sparse kernel's transposed convs behind pools (2x2 and overlapping
    3x3/2) with its kernels, and the pipeline meets the contract."""
    built = []
    real = eo.sparse_transpose
    monkeypatch.setattr(eo, "sparse_transpose", lambda *a: built.append(a[4]) or real(*a))
    rng = np.random.default_rng(6)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    net = Network([conv(2, 16), ReLU(), conv(16, 16), ReLU(), MaxPool(3, 2, 1), ReLU(), conv(16, 16), ReLU(), MaxPool(2),
                   conv(16, 3, 1, 0)])
    x = rng.normal(size=(2, 2, 12, 11))
    check_pipeline(net, x, np.array([[0, 2, 1], [2, 1, 0]]), kc.CudaConfig(variants=(EagerOffsets(),)))
    assert {(3, 3, 2, 2, 1, 1), (2, 2, 2, 2, 0, 0)} <= set(built), built
