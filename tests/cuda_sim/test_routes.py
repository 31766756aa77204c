"""What only the CUDA backend has: its routes (every kernel a conv can take, forced by a CudaConfig), the sparse
kernel alone, the folded head, the switches it keeps for the back-projection, foreign traces, memory
splitting and its negative controls. The contract itself (forward, back-projection, operators, errors) is
tests/test_backends.py's, which the simulator child runs for "cuda" too. Shapes are tiny: under the simulator
every GPU thread is a Python thread. On a real GPU (bench/device.sh) the arrays are CuPy arrays."""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearmaps import ClearmapsError
from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU

from ..strategies import Case
from ..test_backends import check_clear, check_forward
from ..tolerances import RTOL_F32, assert_close, assert_equal, rel_err
from .signals import signals

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import backproject_kernels as bk  # noqa: E402  (after the availability check)
from clearmaps.kernels.cuda import memory, routing  # noqa: E402
from clearmaps.kernels.cuda import sparse_kernels as sk  # noqa: E402
from clearmaps.kernels.cuda.plans import geometry, network_plan  # noqa: E402

TILE = kc.CudaConfig().tile


def host(a):
    from clearmaps.kernels.cuda.device import tohost

    return None if a is None else tohost(a)


def configured(config):
    """The CUDA backend with ``config`` bound: what the checkers of tests/test_backends.py take."""
    return SimpleNamespace(**{name: functools.partial(getattr(kc, name), config=config)
                              for name in ("forward", "backproject", "clear_from_trace")})


def check_pipeline(net, x, classes, config=None, integer=False):
    """The contract's forward check with ``config``; what the pool kernel wrote beside the switches for the
    back-projection (the same as int32, and each switch's place in its window as the formula for a foreign
    trace computes it); and the maps made from the backend's own trace."""
    impl = configured(config or kc.CudaConfig())
    trace, want = check_forward(impl, Case(net, x, integer)), ref.forward(net, x)
    for i, sw in want.switches.items():
        mine = trace.device["switches32"][i]
        assert_equal(host(mine.index), sw.astype(np.int32), f"int32 switches of layer {i}")
        offsets, inside = sk.window_offsets(sw, geometry(net.layers[i]), want.sizes[i])
        assert inside
        assert_equal(host(mine.offsets), offsets, f"window offsets of layer {i}")
    expected = ref.clear_from_trace(net, want, classes)
    check_clear(impl.clear_from_trace(net, trace, classes), expected, expected.responses, None, None, "maps")


def _net(seed=0, channels=3, width=6, classes=3):
    """A fixed network with every path: direct and GEMM transposed convs, an overlapping padded pool and a
    plain 2x2 one, a strided conv, a head ReLU."""
    rng = np.random.default_rng(seed)

    def conv(i, o, k=3, s=1, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, s, p)

    return Network([conv(channels, width), ReLU(), MaxPool(3, 2, 1), conv(width, width, 3, 2, 1), ReLU(),
                    conv(width, width), ReLU(), MaxPool(2), conv(width, classes, 1, 1, 0), ReLU()])


# how the transposed convs of more than 4 output channels run. These nets' few channels would send their
# dense convs to the GEMM (dense_min_source_channels): not here. "sparse-2-per-thread": the sparse kernel's
# two output channels per thread, forced even for these narrow layers.
WAYS = {"sparse": kc.CudaConfig(direct_max_channels=0, dense_min_source_channels=1),
        "sparse-2-per-thread": kc.CudaConfig(direct_max_channels=0, dense_min_source_channels=1),
        "gemm": kc.CudaConfig(direct_max_channels=0, sparse=False),
        "direct": kc.CudaConfig(direct_max_channels=8, sparse=False)}


def _way(monkeypatch, way):
    if way == "sparse-2-per-thread":
        monkeypatch.setattr(sk, "channels_per_thread", lambda channels, most=2: 2)
    return WAYS[way]


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_way_of_transposed_convs_agrees_with_reference(monkeypatch, way):
    """The three ways of doing a transposed conv (the sparse tiled kernel where the stride is 1, columns +
    GEMM, or the direct kernel) each meet the contract."""
    x = np.random.default_rng(1).normal(size=(2, 3, 11, 10))
    check_pipeline(_net(), x, np.array([[0, 2, 1], [2, 1, 0]]), _way(monkeypatch, way))


@pytest.mark.parametrize("way", sorted(WAYS))
def test_more_pool_sources(monkeypatch, way):
    """Unpooled sources beyond those of _net (whose overlapping 3x3/2 pool and plain 2x2 pool are read by both
    the GEMM gather and the direct kernel in the test above): a padded non-overlapping pool as the first layer
    (its plane is materialised at the end), windows with gaps (kernel 2 < stride 3) read by the gather
    (gemm), the sparse kernel (sparse) and the direct kernel (direct), two pools in a row (the upper one's
    plane materialised). Small integers: float32 is exact and ties are everywhere."""
    rng = np.random.default_rng(11)

    def conv(i, o, k=3, s=1, p=1):
        return Conv(rng.integers(-2, 3, (o, i, k, k)).astype(float), rng.integers(-1, 2, o).astype(float), s, p)

    net = Network([MaxPool(2, 2, 1), conv(2, 5), ReLU(), MaxPool(2, 3), MaxPool(2), conv(5, 3, 1, 1, 0)])
    x = rng.integers(0, 3, size=(1, 2, 21, 20)).astype(np.float64)
    assert net.layer_sizes((21, 20)) == [(21, 20), (11, 11), (11, 11), (11, 11), (4, 4), (2, 2), (2, 2)]
    check_pipeline(net, x, np.array([[0, 2, 1]]), _way(monkeypatch, way), integer=True)


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
    assert network_plan(net)["fold"][0] == 3
    x = rng.normal(size=(2, 2, 11, 9))
    trace = kc.forward(net, x)
    want = ref.backproject(net, ref.forward(net, x), None, rectify)
    assert_close(host(kc.backproject(net, trace, None, rectify)), want, RTOL_F32, "R(x|c) through the folded head")


@pytest.mark.parametrize("relu_after_pool", [True, False])
def test_overlapping_pool_through_the_sparse_kernel(monkeypatch, relu_after_pool):
    """An overlapping pool (3x3/2) read by a stride-1 conv's sparse kernel: each window's value goes to its
    switch, summed where windows share one. The ReLU before the pool (conv, ReLU, pool) rectifies AFTER
    unpooling, i.e. after that sum, which the kernel cannot do; unless a ReLU after the pool already made
    every value >= 0, the routing keeps that layer on the GEMM path. The negative control sends it to the
    sparse kernel anyway and must fail."""
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
        monkeypatch.setattr(routing, "sparse_takes", lambda src, layer, config: sk.supports(
            *layer.kernel, *layer.stride, *layer.padding, src.pool, sk.tile_shape(src.pool, config.tile)))
        assert rel_err(host(kc.backproject(net, trace, None, True)), want) > RTOL_F32


# on a real GPU (bench/device.sh) every drawn geometry is a new specialisation to compile (5-15 s each)
@settings(max_examples=4 if os.environ.get("CLEARMAPS_CUDA_REAL") == "1" else 10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (5, 2)]),
       st.sampled_from([None, (2, 2, 0), (2, 2, 1), (2, 3, 1), (3, 2, 1), (3, 3, 0)]),
       st.sampled_from([1, 3, 33]), st.sampled_from([1, 5, 33]), st.sampled_from([1, 2]), st.integers(1, 2),
       st.integers(1, 2), st.integers(5, 12), st.integers(5, 12), st.booleans())
def test_sparse_transpose_kernel_equals_reference(seed, conv, pool, O, I, cpt, B, kc_, Hu, Wu, rect):
    """The sparse kernel alone against reference unpool + conv_transpose2d: every pool kind (windows that
    tile, leave gaps, are padded, overlap) or a dense source; kernels 1-5 with and without padding; 33 input
    channels (two staged chunks) and 33 output channels (two warps, or one warp of two channels per thread,
    with idle lanes either way); several images with several classes each (the switches are the signal's
    image's)."""
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
    TY, TX = sk.tile_shape(geo, TILE)
    threads = sk.block_threads(I, cpt)
    out = np.zeros(I * n * H * W, np.float32)
    Hs, Ws = y.shape[2:]
    kernel = sk.sparse_transpose(k, k, p, p, geo, threads, False, (TY, TX), cpt)
    kernel[(n * -(-H // TY) * -(-W // TX), -(-I // (threads * cpt))), threads](
        np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32).reshape(-1), offsets.reshape(-1),
        np.ascontiguousarray(weight.transpose(0, 2, 3, 1), np.float32).reshape(-1), np.zeros(1, np.float32),
        out, O, I, n, Hs, Ws, H, W, -(-W // TX), -(-H // TY), 0, kc_, rect)
    assert_close(out.reshape(I, n, H, W).transpose(1, 0, 2, 3), want, RTOL_F32, "sparse transposed conv")


def test_sparse_kernel_shared_memory_fits_every_supported_shape():
    """The simulator does not enforce CUDA's 48 KB of static shared memory per block; a real GPU refuses to
    compile beyond it. For every shape the routing may send to the sparse kernel (supports() true), at the
    largest block, with one or two channels per thread, on every tile the bench tries, the shared arrays the
    generated source declares must fit; and a shape that cannot fit is refused."""
    import re

    def declared(source):
        return sum(4 * int(n) for n in re.findall(r"cuda\.shared\.array\((\d+), (?:float32|int32)\)", source))

    pools = [None, (2, 2, 2, 2, 0, 0), (3, 3, 2, 2, 1, 1), (2, 2, 3, 3, 1, 1), (4, 4, 4, 4, 0, 0)]
    checked = 0
    for rows in (4, 8):
        for k in (1, 3, 5, 7, 11, 15):
            for pool in pools:
                tile = sk.tile_shape(pool, (rows, 8))
                for p in sorted({0, k // 2, k - 1}):
                    if sk.supports(k, k, 1, 1, p, p, pool, tile):
                        for cpt in (1, 2):
                            source = sk.kernel_source(k, k, p, p, pool, sk.BLOCK_CHANNELS, False, tile, cpt)
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
    for I in range(1, 600):
        for cpt in (1, 2):
            threads = sk.block_threads(I, cpt)
            assert threads in (32, 64, 128) and sk.CHUNK % (threads // 32) == 0
            assert threads * cpt >= I or threads == sk.BLOCK_CHANNELS
    with pytest.raises(ValueError, match="threads"):
        sk.sparse_transpose(3, 3, 1, 1, None, 96, False, TILE)
    rng = np.random.default_rng(0)
    net = Network([Conv(rng.normal(size=(130, 2, 3, 3)), rng.normal(size=130), 1, 1), ReLU(),
                   Conv(rng.normal(size=(32, 130, 3, 3)) / 10, rng.normal(size=32), 1, 1), ReLU(), MaxPool(2),
                   Conv(rng.normal(size=(3, 32, 1, 1)), rng.normal(size=3))])
    x = rng.normal(size=(1, 2, 4, 4))
    assert sk.block_threads(130, sk.channels_per_thread(130)) == 128
    want = ref.backproject(net, ref.forward(net, x), None, True)
    assert_close(host(kc.backproject(net, kc.forward(net, x), None, True)), want, RTOL_F32, "R(x|c), 130 channels")


def test_dense_convs_take_the_sparse_kernel_only_where_it_pays():
    """routing.dense_pays with the default configuration, the routing GPU run 5 measured: narrow 3x3 convs on a
    source of many channels take the sparse kernel; wide outputs, a 1- or 3-channel source (an input conv)
    and 1x1 kernels take the GEMM. The thresholds are the configuration's."""
    c = kc.CudaConfig()
    assert routing.dense_pays(c, 32, 32, 3, 3) and routing.dense_pays(c, 64, 64, 3, 3)
    assert routing.dense_pays(c, 16, 64, 5, 5)
    assert not routing.dense_pays(c, 64, 128, 3, 3) and not routing.dense_pays(c, 512, 512, 3, 3)
    assert not routing.dense_pays(c, 1, 32, 3, 3) and not routing.dense_pays(c, 3, 64, 3, 3)
    assert not routing.dense_pays(c, 1024, 10, 1, 1) and not routing.dense_pays(c, 64, 64, 1, 1)
    wide = c.replace(dense_max_channels=1 << 30, dense_min_source_channels=1)
    assert routing.dense_pays(wide, 512, 512, 3, 3) and routing.dense_pays(wide, 1, 32, 3, 3)


def test_sparse_kernel_source_file_and_its_fallback(monkeypatch, tmp_path):
    """Generated kernels live in a file named by their source's hash (so Numba can cache their compiled
    form across processes), the same file for the same source; where no folder can be written, or with
    CLEARMAPS_CUDA_CACHE=0, they are exec'd instead, uncached, and compute the same."""
    import inspect

    code = sk.kernel_source(3, 3, 1, 1, (2, 2, 2, 2, 0, 0), 32, False, (4, 8), 1)
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
    real_chunks = memory.chunks
    monkeypatch.setattr(memory, "chunks", lambda *a: seen.append(real_chunks(*a)) or seen[-1])
    sizes = net.layer_sizes((11, 10))
    one_signal = memory.backward_bytes_per_signal(net, sizes) + 4 * 3 * 11 * 10
    fixed = 4 * 3 * 3 * 11 * 10 + 3 * 11 * 10 * (4 + 8 + 3)
    # room for two (image, class) signals: classes of one image are split too
    config = kc.CudaConfig(memory_limit=int((fixed + 2.2 * one_signal) / 0.75))
    split = kc.clear_from_trace(net, kc.forward(net, x, config=config), classes, vmax="batch", config=config)
    assert len(seen[0]) > 3 and all(kc_ < 3 for _, _, _, kc_ in seen[0]), seen
    for name in ("responses", "dominant_response"):
        assert_close(host(getattr(split, name)), host(getattr(whole, name)), 1e-6, name)
    assert_equal(host(split.dominant_index), host(whole.dominant_index), "dominant class")
    assert_equal(host(split.rgb), host(whole.rgb), "rgb")


def test_too_little_memory_is_one_clear_error():
    net, x = _net(), np.zeros((1, 3, 11, 10))
    with pytest.raises(ClearmapsError, match="GPU memory"):
        kc.forward(net, x, config=kc.CudaConfig(memory_limit=1000))
    kc.set_memory_limit(1000)  # the same through the default configuration
    try:
        with pytest.raises(ClearmapsError, match="GPU memory"):
            kc.forward(net, x)
    finally:
        kc.set_memory_limit(None)


def test_negative_controls_are_caught(monkeypatch):
    """The comparison bites on what only this backend can get wrong: an overlapping pool read as if its
    windows did not overlap, and the sparse kernel fed each switch's neighbour in its window (offsets computed
    from a foreign trace, and offsets written by forward()'s pool kernel), on a network where that matters.
    (The contract's own mistakes, no rectification, last-maximum ties and a dropped switch, are the known-wrong
    backends of tests/wrong_backends.)"""
    x = np.random.default_rng(8).integers(0, 3, size=(2, 3, 11, 10)).astype(np.float64)
    net = _net(9)
    trace = kc.forward(net, x)
    want = ref.clear_from_trace(net, ref.forward(net, x), np.tile([0, 1, 2], (2, 1)))
    assert rel_err(host(kc.clear_from_trace(net, trace, [0, 1, 2]).responses), want.responses) <= RTOL_F32
    monkeypatch.setattr(bk, "source_kind", lambda pool: bk.UNPOOLED)
    one_window = kc.clear_from_trace(net, trace, [0, 1, 2])
    monkeypatch.undo()
    assert rel_err(host(one_window.responses), want.responses) > RTOL_F32
    real_offsets = sk.window_offsets

    def shifted(switches, pool, plane, xp):
        d, inside = real_offsets(switches, pool, plane, xp)
        return (d + 1) % (pool[0] * pool[1]), inside

    monkeypatch.setattr(sk, "window_offsets", shifted)  # read for a trace forward() did not make
    neighbour = kc.clear_from_trace(net, ref.forward(net, x), [0, 1, 2])
    assert rel_err(host(neighbour.responses), want.responses) > RTOL_F32
    monkeypatch.setattr(sk, "window_offsets", real_offsets)
    assert rel_err(host(kc.clear_from_trace(net, ref.forward(net, x), [0, 1, 2]).responses),
                   want.responses) <= RTOL_F32
    trace = kc.forward(net, x)  # the offsets forward()'s pool kernel wrote, shifted the same way
    for i, s in trace.device["switches32"].items():
        pool = geometry(net.layers[i])
        s.offsets[...] = (s.offsets + 1) % (pool[0] * pool[1])
    neighbour = kc.clear_from_trace(net, trace, [0, 1, 2])
    assert rel_err(host(neighbour.responses), want.responses) > RTOL_F32


@pytest.mark.parametrize("call, message", [
    (lambda n, x: kc.forward("net", x), "Network"),
    (lambda n, x: kc.clear_from_trace(n, "trace", [0]), "Trace"),
    (lambda n, x: kc.clear_from_trace(_net(classes=4), kc.forward(n, x), [0]), "trace.z"),
    (lambda n, x: kc.forward(n, x, config="fast"), "CudaConfig"),
    (lambda n, x: kc.forward(n, x, fast="yes"), "fast"),
])
def test_bad_arguments_only_this_backend_takes(call, message):
    x = np.random.default_rng(10).normal(size=(1, 3, 11, 10))
    with pytest.raises(ClearmapsError, match=message):
        call(_net(), x)
