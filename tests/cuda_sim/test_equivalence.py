"""The CUDA backend against the float64 reference: the pipeline, every single operator, memory splitting,
options, negative controls and errors. Shapes are tiny: under the simulator every GPU thread is a Python
thread. The same file runs on a real GPU (bench/device.sh) where the arrays are CuPy arrays."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clearmaps
from clearmaps import ClearmapsError
from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from ..strategies import clear_cases
from .signals import signals
from ..tolerances import RTOL_F32, assert_close, assert_equal, decisive, rel_err

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import backend  # noqa: E402  (after the availability check)
from clearmaps.kernels.cuda import sparse_kernels as sk  # noqa: E402
TINY = dict(max_classes=4, min_size=6, max_size=11, max_batch=2, max_blocks=2, max_width=5)


def host(a):
    from clearmaps.kernels.cuda.device import tohost

    return None if a is None else tohost(a)


def check_against_reference(net, x, classes, rectify=True, reduce="sum", vmax=None, integer=False,
                            keep_responses=True):
    """Run forward + clear_from_trace on the GPU backend and compare every output with the reference."""
    trace = kc.forward(net, x)
    want_trace = ref.forward(net, x)
    for i, sw in want_trace.switches.items():
        assert_equal(host(trace.switches[i]), sw, f"switches of layer {i}")
        # and what the pool kernel wrote beside them for the back-projection: the same as int32, and each
        # switch's place in its window as the formula for a foreign trace computes it
        mine = trace.device["switches32"][i]
        assert_equal(host(mine.index), sw.astype(np.int32), f"int32 switches of layer {i}")
        offsets, inside = sk.window_offsets(sw, backend._geometry(net.layers[i]), want_trace.sizes[i])
        assert inside
        assert_equal(host(mine.offsets), offsets, f"window offsets of layer {i}")
    assert_close(host(trace.z), want_trace.z, RTOL_F32, "z_L")
    assert_close(host(trace.logits), want_trace.logits, RTOL_F32, "logits")
    got = kc.clear_from_trace(net, trace, classes, rectify, reduce, vmax=vmax, keep_responses=keep_responses)
    want = ref.clear_from_trace(net, want_trace, classes, rectify, reduce, vmax=vmax)
    if keep_responses:
        assert_close(host(got.responses), want.responses, RTOL_F32, "responses r(x|c)")
    else:
        assert got.responses is None
    assert_close(host(got.dominant_response), want.dominant_response, RTOL_F32, "dominant response D")
    mask = decisive(want.responses)
    index, rgb = host(got.dominant_index), host(got.rgb)
    assert index.dtype == np.int64 and rgb.dtype == np.uint8 and rgb.shape == want.rgb.shape
    assert_equal(index[mask], want.dominant_index[mask], "dominant class on decisive pixels")
    diff = np.abs(rgb.astype(np.int16) - want.rgb.astype(np.int16))
    assert diff[mask].max(initial=0) <= 1, f"rgb differs by {diff[mask].max()} on a decisive pixel"
    if integer and reduce != "norm":  # small integers: float32 is exact, so everything is equal, ties
        # included — but not through the L2 norm's square root, which float32 rounds (a composite byte at a
        # .5 boundary can then differ by one, as hypothesis found)
        assert_equal(index, want.dominant_index, "dominant class (integer case)")
        assert_equal(rgb, want.rgb, "rgb (integer case)")
    return got, want


@settings(max_examples=6)
@given(clear_cases(**TINY), st.booleans(), st.sampled_from(["sum", "max", "norm"]), st.data())
def test_pipeline_equals_reference(case, rectify, reduce, data):
    """forward + clear_from_trace equal the float64 reference: switches exactly, maps to 1e-5, the
    dominant class on every decisive pixel, and the composite to one byte there."""
    K = data.draw(st.integers(1, case.net.num_classes), label="K")
    classes = np.stack([np.random.default_rng(b).permutation(case.net.num_classes)[:K]
                        for b in range(case.x.shape[0])])
    check_against_reference(case.net, case.x, classes, rectify, reduce, integer=case.integer)


def _net(seed=0, channels=3, width=6, classes=3):
    """A fixed network with every path: direct and GEMM transposed convs, an overlapping padded pool and a
    plain 2x2 one, a strided conv, a head ReLU."""
    rng = np.random.default_rng(seed)

    def conv(i, o, k=3, s=1, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, s, p)

    return Network([conv(channels, width), ReLU(), MaxPool(3, 2, 1), conv(width, width, 3, 2, 1), ReLU(),
                    conv(width, width), ReLU(), MaxPool(2), conv(width, classes, 1, 1, 0), ReLU()])


# how the transposed convs of more than 4 output channels run: (DIRECT_MAX_CHANNELS, SPARSE_TRANSPOSE, the
# sparse kernel's output channels per thread: None as it chooses, 2 forced even for these narrow layers,
# its switch offsets loaded ahead of the zero tests: sk.EAGER_OFFSETS)
WAYS = {"sparse": (0, True, None, False), "sparse-2-per-thread": (0, True, 2, False),
        "sparse-eager-2-per-thread": (0, True, 2, True), "gemm": (0, False, None, False),
        "direct": (8, False, None, False)}


def _route(monkeypatch, way):
    from clearmaps.kernels.cuda import sparse_kernels as sk

    direct, sparse, cpt, eager = WAYS[way]
    monkeypatch.setattr(backend, "DIRECT_MAX_CHANNELS", direct)
    monkeypatch.setattr(backend, "SPARSE_TRANSPOSE", sparse)
    monkeypatch.setattr(sk, "EAGER_OFFSETS", eager)
    # these nets' few channels would send their dense convs to the GEMM (sk.dense_pays): not here
    monkeypatch.setattr(sk, "DENSE_MIN_SOURCE_CHANNELS", 1)
    if cpt is not None:
        monkeypatch.setattr(sk, "channels_per_thread", lambda channels: cpt)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_way_of_transposed_convs_agrees_with_reference(monkeypatch, way):
    """The three ways of doing a transposed conv (the sparse tiled kernel where the stride is 1, columns +
    GEMM, or the direct kernel) each meet the contract."""
    _route(monkeypatch, way)
    x = np.random.default_rng(1).normal(size=(2, 3, 11, 10))
    check_against_reference(_net(), x, np.array([[0, 2, 1], [2, 1, 0]]))


@pytest.mark.parametrize("way", sorted(WAYS))
def test_more_pool_sources(monkeypatch, way):
    """Unpooled sources beyond those of _net (whose overlapping 3x3/2 pool and plain 2x2 pool are read by both
    the GEMM gather and the direct kernel in the test above): a padded non-overlapping pool as the first layer
    (its plane is materialised at the end), windows with gaps (kernel 2 < stride 3) read by the gather
    (gemm), the sparse kernel (sparse) and the direct kernel (direct), two pools in a row (the upper one's
    plane materialised). Small integers: float32 is exact and ties are everywhere, so everything must be
    equal."""
    _route(monkeypatch, way)
    rng = np.random.default_rng(11)

    def conv(i, o, k=3, s=1, p=1):
        return Conv(rng.integers(-2, 3, (o, i, k, k)).astype(float), rng.integers(-1, 2, o).astype(float), s, p)

    net = Network([MaxPool(2, 2, 1), conv(2, 5), ReLU(), MaxPool(2, 3), MaxPool(2), conv(5, 3, 1, 1, 0)])
    x = rng.integers(0, 3, size=(1, 2, 21, 20)).astype(np.float64)
    assert net.layer_sizes((21, 20)) == [(21, 20), (11, 11), (11, 11), (11, 11), (4, 4), (2, 2), (2, 2)]
    check_against_reference(net, x, np.array([[0, 2, 1]]), integer=True)


@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("head_relu", [True, False])
@pytest.mark.parametrize("below", ["relu", "none"])
def test_folded_head_equals_reference(rectify, head_relu, below):
    """A 1x1 head over a conv (through a ReLU, or directly) runs as one two-channel step: z+ and z- through
    class c's folded kernels (kernels/fold.py) in head_signal(folded=True), with conv j's stride 2 and
    padding; the maps are the reference's with and without rectification and a head ReLU."""
    rng = np.random.default_rng(5)
    layers = [Conv(rng.normal(size=(5, 2, 3, 3)), rng.normal(size=5), 1, 1), ReLU(), MaxPool(2),
              Conv(rng.normal(size=(6, 5, 3, 3)) / 3, rng.normal(size=6), 2, 1)] + (
        [ReLU()] if below == "relu" else []) + [Conv(rng.normal(size=(3, 6, 1, 1)), rng.normal(size=3))] + (
        [ReLU()] if head_relu else [])
    net = Network(layers)
    assert backend._plan(net)["fold"][0] == 3
    x = rng.normal(size=(2, 2, 11, 9))
    trace = kc.forward(net, x)
    want = ref.backproject(net, ref.forward(net, x), None, rectify)
    assert_close(host(kc.backproject(net, trace, None, rectify)), want, RTOL_F32, "R(x|c) through the folded head")


@pytest.mark.parametrize("relu_after_pool", [True, False])
def test_overlapping_pool_through_the_sparse_kernel(monkeypatch, relu_after_pool):
    """An overlapping pool (3x3/2) read by a stride-1 conv's sparse kernel: each window's value goes to its
    switch, summed where windows share one. The ReLU before the pool (conv, ReLU, pool) rectifies AFTER
    unpooling, i.e. after that sum, which the kernel cannot do; unless a ReLU after the pool already made
    every value >= 0, the driver keeps that layer on the GEMM path. The negative control sends it to the
    sparse kernel anyway and must fail."""
    monkeypatch.setattr(backend, "SPARSE_TRANSPOSE", True)
    rng = np.random.default_rng(21)
    layers = [Conv(rng.normal(size=(6, 5, 3, 3)), rng.normal(size=6), 1, 1), ReLU(), MaxPool(3, 2, 1)] + (
        [ReLU()] if relu_after_pool else []) + [Conv(rng.normal(size=(6, 6, 3, 3)) / 4, rng.normal(size=6), 1, 1),
                                                Conv(rng.normal(size=(3, 6, 1, 1)), rng.normal(size=3))]
    net = Network(layers)
    x = rng.normal(size=(2, 5, 9, 10))
    want = ref.backproject(net, ref.forward(net, x), None, True)
    trace = kc.forward(net, x)
    assert_close(host(kc.backproject(net, trace, None, True)), want, RTOL_F32, "R(x|c), overlapping pool")
    if not relu_after_pool:  # the pool's values reach the ReLU below it unrectified: the guard matters
        monkeypatch.setattr(backend._Source, "sparse",
                            lambda self, layer: backend.SPARSE_TRANSPOSE and backend.sk.supports(
                                *layer.kernel, *layer.stride, *layer.padding, self.pool))
        assert rel_err(host(kc.backproject(net, trace, None, True)), want) > RTOL_F32


# on a real GPU (bench/device.sh) every drawn geometry is a new specialisation to compile (5-15 s each)
@settings(max_examples=4 if os.environ.get("CLEARMAPS_CUDA_REAL") == "1" else 10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (5, 2)]),
       st.sampled_from([None, (2, 2, 0), (2, 2, 1), (2, 3, 1), (3, 2, 1), (3, 3, 0)]),
       st.sampled_from([1, 3, 33]), st.sampled_from([1, 5, 33]), st.sampled_from([1, 2]), st.integers(1, 2),
       st.integers(1, 2), st.integers(5, 12), st.integers(5, 12), st.booleans(), st.booleans())
def test_sparse_transpose_kernel_equals_reference(seed, conv, pool, O, I, cpt, B, kc_, Hu, Wu, rect, eager):
    """The sparse kernel alone against reference unpool + conv_transpose2d: every pool kind (windows that
    tile, leave gaps, are padded, overlap) or a dense source; kernels 1-5 with and without padding; 33 input
    channels (two staged chunks) and 33 output channels (two warps, or one warp of two channels per thread,
    with idle lanes either way); several images with several classes each (the switches are the signal's
    image's); the offsets read in the branch or ahead of the zero test (``eager``)."""
    from clearmaps.kernels.cuda import sparse_kernels as sk

    rng = np.random.default_rng(seed)
    k, p = conv
    n = B * kc_
    drawn = signals(rng, B, kc_, O, Hu, Wu, pool)
    if drawn is None:
        return
    y, offsets, geo, unpool = drawn
    U = unpool(np.maximum(y, 0) if rect else y)
    weight = rng.normal(size=(O, I, k, k))
    want = ref.conv_transpose2d(U, weight, 1, p)
    H, W = want.shape[2:]
    TY, TX = sk.tile_shape(geo)
    threads = sk.block_threads(I, cpt)
    out = np.zeros(I * n * H * W, np.float32)
    Hs, Ws = y.shape[2:]
    kernel = sk.sparse_transpose(k, k, p, p, geo, threads, False, None, cpt, eager)
    kernel[(n * -(-H // TY) * -(-W // TX), -(-I // (threads * cpt))), threads](
        np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32).reshape(-1), offsets.reshape(-1),
        np.ascontiguousarray(weight.transpose(0, 2, 3, 1), np.float32).reshape(-1), np.zeros(1, np.float32),
        out, O, I, n, Hs, Ws, H, W, -(-W // TX), -(-H // TY), 0, kc_, rect)
    assert_close(out.reshape(I, n, H, W).transpose(1, 0, 2, 3), want, RTOL_F32, "sparse transposed conv")


@pytest.mark.parametrize("pool, cpt", [((2, 2, 0), 2), ((3, 2, 1), 1)])
def test_eager_offsets_change_the_schedule_not_the_bits(pool, cpt):
    """sk.EAGER_OFFSETS loads each window's switch offset beside its value, before the zero test, and tests
    it there (so the compiler cannot sink the load into the branch); the FMAs and their order are the lazy
    walk's, so the outputs are the same bits. The sources must differ as intended (else this test proves
    nothing), and a dense source has no offsets: its walk is the same either way."""
    rng = np.random.default_rng(3)
    B, kc_, O, I, Hu, Wu = 2, 1, 5, 33, 10, 9
    y, offsets, geo, _ = signals(rng, B, kc_, O, Hu, Wu, pool)
    n, Hs, Ws = B * kc_, *y.shape[2:]
    weight = np.ascontiguousarray(rng.normal(size=(O, 3, 3, I)), np.float32).reshape(-1)
    src = np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32).reshape(-1)
    threads = sk.block_threads(I, cpt)
    TY, TX = sk.tile_shape(geo)
    H, W = Hu, Wu
    outs = []
    for eager in (False, True):
        code = sk._source(3, 3, 1, 1, geo, threads, False, (TY, TX), cpt, eager)
        assert ("if (s != zero) & (d >= 0):" in code) == eager
        assert code.count("d = soff[") == len(sk.layout(3, 3, 1, 1, geo)[-1])
        out = np.zeros(I * n * H * W, np.float32)
        sk.sparse_transpose(3, 3, 1, 1, geo, threads, False, None, cpt, eager)[
            (n * -(-H // TY) * -(-W // TX), -(-I // (threads * cpt))), threads](
            src, offsets.reshape(-1), weight, np.zeros(1, np.float32), out, O, I, n, Hs, Ws, H, W, -(-W // TX),
            -(-H // TY), 0, kc_, True)
        outs.append(out)
    assert np.abs(outs[0]).max() > 0
    assert_equal(outs[1], outs[0], "eager against lazy offsets")
    assert (sk._source(3, 3, 1, 1, None, threads, False, None, cpt, True) ==
            sk._source(3, 3, 1, 1, None, threads, False, None, cpt, False))
    assert sk.kernel_name(3, 3, 1, 1, geo, threads, False, (TY, TX), cpt, True).endswith("_eager")


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
    from clearmaps.kernels.cuda import backproject_kernels as bk
    from clearmaps.kernels.cuda.device import THREADS

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
    bk.direct_rows(I, kh, kw, ph, pw, px)[-(-(n * H * -(-W // px)) // THREADS), THREADS](
        src, w32, rows, O, n, Hs, Ws, H, W, pre)
    plain = np.full(I * n * H * W, np.nan, np.float32)
    bk.direct_transpose(I, kh, kw, 1, 1, ph, pw, bk.DENSE, None)[-(-(n * H * W) // THREADS), THREADS](
        src, np.zeros(1, np.int32), w32, plain, O, n, Hs, Ws, Hs, Ws, H, W, 0, 1, pre, False)
    assert_equal(rows, plain, "row-blocked vs plain direct kernel")
    assert_close(rows.reshape(I, n, H, W).transpose(1, 0, 2, 3), want, RTOL_F32, "row-blocked direct kernel")


def test_row_direct_kernel_in_the_pipeline(monkeypatch):
    """backend.ROWS_DIRECT on: the last transposed conv (2 channels, a dense rectified source, rows of 10
    that are not a multiple of 4 pixels) runs as the row-blocked kernel, and the pipeline meets the
    contract."""
    from clearmaps.kernels.cuda import backproject_kernels as bk

    monkeypatch.setattr(backend, "ROWS_DIRECT", True)
    used = []
    real = bk.direct_rows
    monkeypatch.setattr(bk, "direct_rows", lambda *a: used.append(a) or real(*a))
    rng = np.random.default_rng(5)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    net = Network([conv(2, 6), ReLU(), conv(6, 6), ReLU(), MaxPool(2), conv(6, 3, 1, 0), ReLU()])
    x = rng.normal(size=(2, 2, 11, 10))
    check_against_reference(net, x, np.array([[0, 2, 1], [2, 1, 0]]))
    assert used == [(2, 3, 3, 1, 1, bk.DIRECT_ROW_PIXELS)]


def test_sparse_kernel_shared_memory_fits_every_supported_shape():
    """The simulator does not enforce CUDA's 48 KB of static shared memory per block; a real GPU refuses to
    compile beyond it. For every shape the driver may send to the sparse kernel (supports() true), at the
    largest block, with one or two channels per thread, on every tile the bench tries, the shared arrays the
    generated source declares must fit; and a shape that cannot fit is refused."""
    import re

    from clearmaps.kernels.cuda import sparse_kernels as sk

    def declared(source):
        return sum(4 * int(n) for n in re.findall(r"cuda\.shared\.array\((\d+), (?:float32|int32)\)", source))

    pools = [None, (2, 2, 2, 2, 0, 0), (3, 3, 2, 2, 1, 1), (2, 2, 3, 3, 1, 1), (4, 4, 4, 4, 0, 0)]
    checked = 0
    for rows in (4, 8):
        for k in (1, 3, 5, 7, 11, 15):
            for pool in pools:
                tile = sk.tile_shape(pool, rows)
                for p in sorted({0, k // 2, k - 1}):
                    if sk.supports(k, k, 1, 1, p, p, pool, tile):
                        for cpt in (1, 2):
                            source = sk._source(k, k, p, p, pool, sk.BLOCK_CHANNELS, False, tile, cpt)
                            assert declared(source) == sk.shared_bytes(k, k, p, p, pool, sk.BLOCK_CHANNELS, tile)
                            assert declared(source) <= sk.SHARED_LIMIT
                            checked += 1
    assert checked > 100
    assert not sk.supports(15, 15, 1, 1, 7, 7, None, (8, 8))  # 22 x 22 windows x 32 channels: too many
    with pytest.raises(ValueError, match="shared"):
        sk.sparse_transpose(15, 15, 7, 7, None, 128, False, (8, 8))


def test_sparse_kernel_blocks_of_every_width():
    """Each warp of a block stages CHUNK / warps channels of every chunk, so a block of 3 warps would leave
    2 of 32 staged channels unwritten (found in review: 130 output channels at 2 per thread took 96
    threads, and read garbage). Blocks have 1, 2 or 4 warps for every width; another count is refused; and
    a 130-channel layer behind a pool (a 4-warp block, partly idle) meets the contract."""
    from clearmaps.kernels.cuda import sparse_kernels as sk

    for I in range(1, 600):
        for cpt in (1, 2):
            threads = sk.block_threads(I, cpt)
            assert threads in (32, 64, 128) and sk.CHUNK % (threads // 32) == 0
            assert threads * cpt >= I or threads == sk.BLOCK_CHANNELS
    with pytest.raises(ValueError, match="threads"):
        sk.sparse_transpose(3, 3, 1, 1, None, 96)
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(130, 2, 3, 3)), rng.normal(size=130), 1, 1), ReLU(),
                   Conv(rng.normal(size=(32, 130, 3, 3)) / 10, rng.normal(size=32), 1, 1), ReLU(), MaxPool(2),
                   Conv(rng.normal(size=(3, 32, 1, 1)), rng.normal(size=3))])
    x = rng.normal(size=(1, 2, 4, 4))
    assert sk.block_threads(130, sk.channels_per_thread(130)) == 128
    want = ref.backproject(net, ref.forward(net, x), None, True)
    assert_close(host(kc.backproject(net, kc.forward(net, x), None, True)), want, RTOL_F32, "R(x|c), 130 channels")


def test_dense_convs_take_the_sparse_kernel_only_where_it_pays():
    """sk.dense_pays, the routing GPU run 5 measured: narrow 3x3 convs on a source of many channels take the
    sparse kernel; wide outputs, a 1- or 3-channel source (an input conv) and 1x1 kernels take the GEMM."""
    assert sk.dense_pays(32, 32, 3, 3) and sk.dense_pays(64, 64, 3, 3) and sk.dense_pays(16, 64, 5, 5)
    assert not sk.dense_pays(64, 128, 3, 3) and not sk.dense_pays(512, 512, 3, 3)
    assert not sk.dense_pays(1, 32, 3, 3) and not sk.dense_pays(3, 64, 3, 3)
    assert not sk.dense_pays(1024, 10, 1, 1) and not sk.dense_pays(64, 64, 1, 1)


def test_sparse_kernel_source_file_and_its_fallback(monkeypatch, tmp_path):
    """Generated kernels live in a file named by their source's hash (so Numba can cache their compiled
    form across processes), the same file for the same source; where no folder can be written, or with
    CLEARMAPS_CUDA_CACHE=0, they are exec'd instead, uncached, and compute the same."""
    import inspect

    from clearmaps.kernels.cuda import sparse_kernels as sk

    code = sk._source(3, 3, 1, 1, (2, 2, 2, 2, 0, 0), 32, False, (4, 8), 1)
    monkeypatch.setenv("CLEARMAPS_CACHE_DIR", str(tmp_path / "cache"))
    fn, cached = sk._define(code, "probe")
    assert cached and fn.__name__ == "probe"
    path = inspect.getfile(fn)
    assert path.startswith(str(tmp_path / "cache")) and sk._define(code, "probe")[0].__code__.co_filename == path
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CLEARMAPS_CACHE_DIR", str(tmp_path / "file"))
    assert sk._define(code, "probe")[1] is False
    monkeypatch.setenv("CLEARMAPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CLEARMAPS_CUDA_CACHE", "0")
    fallback, cached = sk._define(code, "probe")
    assert not cached and fallback.__code__.co_filename == "<probe>"


def test_a_foreign_trace_with_bad_switches_is_refused():
    net, x = _net(), np.random.default_rng(12).normal(size=(1, 3, 11, 10))
    trace = ref.forward(net, x)
    bad = dict(trace.switches)
    bad[2] = bad[2] + 10_000
    with pytest.raises(ClearmapsError, match="switches"):
        kc.clear_from_trace(net, ref.Trace(trace.sizes, bad, trace.z, trace.logits, trace.probabilities), [0])


def test_a_trace_explained_with_another_networks_pools():
    """forward()'s pool kernel writes each switch's offset in ITS window; a trace explained with a network
    whose pools have other windows but the same sizes (2x2/2 and 3x3/2 padded, on 8x8) must not reuse them:
    the offsets are redone for that network's windows (and the reference's answer comes out), or, where a
    switch lies outside them, the trace is refused; the trace's own network still gets its own offsets."""
    rng = np.random.default_rng(1)

    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    c0, c1, c2, c3 = conv(2, 16), conv(16, 16), conv(16, 20), conv(20, 3, 1, 0)
    a = Network([c0, ReLU(), c1, MaxPool(2), ReLU(), c2, ReLU(), c3])
    b = Network([c0, ReLU(), c1, MaxPool(3, 2, 1), ReLU(), c2, ReLU(), c3])
    x = rng.uniform(size=(1, 2, 8, 8))
    assert a.layer_sizes((8, 8)) == b.layer_sizes((8, 8))
    trace = kc.forward(a, x)
    for net in (b, a):  # b first: a's offsets must survive it
        want = ref.clear_from_trace(net, ref.forward(a, x), [[0, 1]])
        assert_close(host(kc.clear_from_trace(net, trace, [[0, 1]]).responses), want.responses, RTOL_F32,
                     "responses")
    with pytest.raises(ClearmapsError, match="outside its pool window"):
        kc.clear_from_trace(a, kc.forward(b, x), [[0, 1]])


def test_memory_splitting_over_images_classes_and_columns(monkeypatch):
    """A memory limit that fits only part of the work: the results are those of one unsplit pass."""
    net, x = _net(2), np.random.default_rng(3).normal(size=(3, 3, 11, 10))
    classes = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    whole = kc.clear_from_trace(net, kc.forward(net, x), classes, vmax="batch")
    seen = []
    real_chunks = backend._chunks
    monkeypatch.setattr(backend, "_chunks", lambda *a: seen.append(real_chunks(*a)) or seen[-1])
    sizes = net.layer_sizes((11, 10))
    one_signal = backend._backward_bytes_per_signal(net, sizes) + 4 * 3 * 11 * 10
    fixed = 4 * 3 * 3 * 11 * 10 + 3 * 11 * 10 * (4 + 8 + 3)
    # room for two (image, class) signals: classes of one image are split too
    kc.set_memory_limit(int((fixed + 2.2 * one_signal) / 0.75))
    try:
        split = kc.clear_from_trace(net, kc.forward(net, x), classes, vmax="batch")
    finally:
        kc.set_memory_limit(None)
    assert len(seen[0]) > 3 and all(kc_ < 3 for _, _, _, kc_ in seen[0]), seen
    for name in ("responses", "dominant_response"):
        assert_close(host(getattr(split, name)), host(getattr(whole, name)), 1e-6, name)
    assert_equal(host(split.dominant_index), host(whole.dominant_index), "dominant class")
    assert_equal(host(split.rgb), host(whole.rgb), "rgb")


def test_too_little_memory_is_one_clear_error():
    net, x = _net(), np.zeros((1, 3, 11, 10))
    kc.set_memory_limit(1000)
    try:
        with pytest.raises(ClearmapsError, match="GPU memory"):
            kc.forward(net, x)
    finally:
        kc.set_memory_limit(None)


@pytest.mark.parametrize("vmax", [None, "batch", "p90", 0.5])
def test_vmax_and_keep_responses(vmax):
    """Every normaliser (the fixed one goes through the fused HSV in the epilogue) and keep_responses=False
    (the K maps are never stored) give the reference's composite."""
    x = np.random.default_rng(4).normal(size=(2, 3, 11, 10))
    check_against_reference(_net(5), x, np.array([[0, 1, 2], [1, 2, 0]]), vmax=vmax, keep_responses=False)


def test_explain_with_backend_cuda():
    x = np.random.default_rng(6).normal(size=(2, 3, 11, 10))
    net = _net(6)
    got = clearmaps.explain(net, x, classes="top2", backend="cuda")
    want = clearmaps.explain(net, x, classes="top2", backend="reference")
    assert_equal(got.classes, want.classes, "classes")
    assert_close(got.responses, want.responses, RTOL_F32, "responses")
    mask = decisive(want.responses)
    assert_equal(got.dominant_class[mask], want.dominant_class[mask], "dominant class")
    assert clearmaps.get_backend("cuda") is kc


# ------------------------------------------------------------------------------------ single operators

@settings(max_examples=8)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]), st.integers(0, 1),
       st.integers(4, 9), st.integers(4, 9), st.sampled_from([1, 5]))
def test_conv_and_transposed_conv_ops(seed, k, stride, padding, h, w, out_channels):
    """conv2d and conv_transpose2d (strided, with the output size picking the output padding) equal the
    reference; out_channels 1 takes the direct kernel, 5 the GEMM."""
    rng = np.random.default_rng(seed)
    padding = min(padding, k // 2)
    x = rng.normal(size=(2, out_channels, h, w))
    weight = rng.normal(size=(3, out_channels, k, k))
    bias = rng.normal(size=3)
    y = ref.conv2d(x, weight, bias, stride, padding)
    assert_close(kc.conv2d(x, weight, bias, stride, padding), y, RTOL_F32, "conv2d")
    g = rng.normal(size=y.shape)
    assert_close(kc.conv_transpose2d(g, weight, stride, padding, (h, w)),
                 ref.conv_transpose2d(g, weight, stride, padding, (h, w)), RTOL_F32, "conv_transpose2d")


@settings(max_examples=8)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(2, 2, 0), (3, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1)]),
       st.integers(3, 8), st.integers(3, 8))
def test_pool_and_unpool_ops(seed, pool, h, w):
    """Switches equal the reference's exactly on inputs full of ties; unpool adds where windows overlap."""
    rng = np.random.default_rng(seed)
    k, s, p = pool
    if (h + 2 * p - k) // s + 1 < 1 or (w + 2 * p - k) // s + 1 < 1:
        return
    x = rng.integers(0, 3, size=(2, 2, h, w)).astype(np.float64)
    pooled, switches = kc.max_pool_with_switches(x, k, s, p)
    want_pooled, want_switches = ref.max_pool_with_switches(x, k, s, p)
    assert switches.dtype == np.int64
    assert_equal(switches, want_switches, "switches")
    assert_equal(pooled, want_pooled, "pooled")
    y = rng.normal(size=pooled.shape)
    assert_close(kc.unpool(y, switches, (h, w)), ref.unpool(y, want_switches, (h, w)), RTOL_F32, "unpool")


def test_reduce_dominant_compose_ops():
    rng = np.random.default_rng(7)
    R = rng.normal(size=(2, 3, 4, 5, 6))
    for how in ("sum", "max", "norm"):
        assert_close(kc.reduce_channels(R, how), ref.reduce_channels(R, how), RTOL_F32, how)
    r = rng.integers(-2, 3, size=(2, 4, 5, 6)).astype(np.float32)  # ties everywhere: first maximum wins
    index, response = kc.dominant(r)
    want_index, want_response = ref.dominant(r)
    assert_equal(index, want_index, "dominant index")
    assert_equal(response, want_response, "dominant response")
    d = rng.normal(size=(2, 5, 6)).astype(np.float32)
    for vmax in (None, "batch", "p50", 0.7):
        assert_equal(kc.compose(index, d, vmax=vmax, num_classes=4),
                     ref.compose(index, d, vmax=vmax, num_classes=4), f"compose vmax={vmax}")
    palette = [0.1, 0.35, 0.6, 0.99]
    assert_equal(kc.compose(index, d, palette), ref.compose(index, d, palette), "compose with a palette")


# ------------------------------------------------------------------------------------ negative controls

def test_negative_controls_are_caught(monkeypatch):
    """The comparison bites: the backend without rectification, an overlapping pool read as if its windows
    did not overlap, the sparse kernel fed each switch's neighbour in its window (offsets computed from a
    foreign trace, and offsets written by forward()'s pool kernel), and a max pool that keeps
    the LAST maximum on ties all fail it on a network where that matters."""
    x = np.random.default_rng(8).integers(0, 3, size=(2, 3, 11, 10)).astype(np.float64)
    net = _net(9)
    trace = kc.forward(net, x)
    wrong = kc.clear_from_trace(net, trace, [0, 1, 2], rectify=False)
    want = ref.clear_from_trace(net, ref.forward(net, x), np.tile([0, 1, 2], (2, 1)))
    assert rel_err(host(wrong.responses), want.responses) > RTOL_F32
    # the one-window read of non-overlapping pools used for an overlapping pool misses the values of the
    # windows that share a pixel
    from clearmaps.kernels.cuda import backproject_kernels as bk

    real_kind = bk.source_kind
    bk.source_kind = lambda pool: bk.UNPOOLED
    try:
        one_window = kc.clear_from_trace(net, trace, [0, 1, 2])
    finally:
        bk.source_kind = real_kind
    assert rel_err(host(one_window.responses), want.responses) > RTOL_F32
    real_offsets = sk.window_offsets

    def shifted(switches, pool, plane, xp):
        d, inside = real_offsets(switches, pool, plane, xp)
        return (d + 1) % (pool[0] * pool[1]), inside

    monkeypatch.setattr(backend, "SPARSE_TRANSPOSE", True)
    monkeypatch.setattr(sk, "window_offsets", shifted)  # read for a trace forward() did not make
    neighbour = kc.clear_from_trace(net, ref.forward(net, x), [0, 1, 2])
    assert rel_err(host(neighbour.responses), want.responses) > RTOL_F32
    monkeypatch.setattr(sk, "window_offsets", real_offsets)
    assert rel_err(host(kc.clear_from_trace(net, ref.forward(net, x), [0, 1, 2]).responses),
                   want.responses) <= RTOL_F32
    trace = kc.forward(net, x)  # the offsets forward()'s pool kernel wrote, shifted the same way
    for i, s in trace.device["switches32"].items():
        pool = backend._geometry(net.layers[i])
        s.offsets[...] = (s.offsets + 1) % (pool[0] * pool[1])
    neighbour = kc.clear_from_trace(net, trace, [0, 1, 2])
    assert rel_err(host(neighbour.responses), want.responses) > RTOL_F32
    flipped = x[:, :, ::-1, ::-1]
    _, sw = kc.max_pool_with_switches(flipped, 3, 2, 1)
    H, W = x.shape[2:]
    last_rule = (H - 1 - sw // W) * W + (W - 1 - sw % W)
    _, want_sw = ref.max_pool_with_switches(x, 3, 2, 1)
    assert (host(last_rule) != want_sw).any()


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("call, message", [
    (lambda n, x: kc.forward(n, x[:, :2]), "channels"),
    (lambda n, x: kc.forward(n, np.where(x > 1, np.nan, x)), "NaN"),
    (lambda n, x: kc.forward(n, x.astype(np.float16)), "float16"),
    (lambda n, x: kc.forward("net", x), "Network"),
    (lambda n, x: kc.clear_from_trace(n, kc.forward(n, x), [[0, 7]]), "classes"),
    (lambda n, x: kc.clear_from_trace(n, kc.forward(n, x), [0], reduce="mean"), "reduce"),
    (lambda n, x: kc.clear_from_trace(n, kc.forward(n, x), [0], vmax=-1), "vmax"),
    (lambda n, x: kc.clear_from_trace(n, "trace", [0]), "Trace"),
    (lambda n, x: kc.clear_from_trace(_net(classes=4), kc.forward(n, x), [0]), "trace.z"),
    (lambda n, x: kc.max_pool_with_switches(x, 3, 2, 2), "padding"),
    (lambda n, x: kc.unpool(x, np.zeros(x.shape, np.int64) + 999, (11, 10)), "switches"),
    (lambda n, x: kc.conv2d(x, np.zeros((2, 5, 3, 3))), "channels"),
    (lambda n, x: kc.compose(np.zeros((1, 2, 2), np.int64), np.zeros((1, 2, 2)), num_classes=0), "num_classes"),
])
def test_bad_input_gets_one_clear_error(call, message):
    x = np.random.default_rng(10).normal(size=(1, 3, 11, 10))
    with pytest.raises(ClearmapsError, match=message):
        call(_net(), x)
