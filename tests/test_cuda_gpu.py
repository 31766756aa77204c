"""CUDA backend tests that need a real GPU (marked ``gpu``; skipped cleanly where none is present).

What the simulator cannot show: the cuBLAS GEMM really is float32 in the exact mode (and TF32 in the fast
one), CuPy / torch GPU arrays in and out without a host round trip, the memory splitting with CuPy's
allocator, the preset networks at realistic sizes against float64 oracles, and the graph path (every tiny
architecture of tests/archs.py and every response method, its array-module side on CuPy).
"""

from __future__ import annotations

import numpy as np
import pytest

from . import archs
from .tolerances import RTOL_F32, assert_close, assert_equal, decisive

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kc():
    from clearmaps.kernels import cuda

    assert cuda.is_available(), cuda.why_unavailable()
    return cuda


def _preset(arch, seed=0):
    import torch

    import clearmaps

    torch.manual_seed(seed)
    spec = clearmaps.read_arch(arch)
    return clearmaps.from_torch(clearmaps.build_module(arch), spec["class_names"], spec["input_shape"])


def test_exact_gemm_is_float32_even_when_cupy_is_told_tf32(kc):
    """CuPy's global compute type set to TF32 (what CUPY_TF32=1 does) must not reach the exact mode; the
    fast mode must really be TF32 (a positive control: its error is 10-100x larger)."""
    import cupy as cp
    from cupy._core import _routines_linalg as rl

    from clearmaps.kernels.cuda.device import gemm_into

    rng = np.random.default_rng(0)
    a = rng.normal(size=(96, 4096)).astype(np.float32)
    b = rng.normal(size=(4096, 3000)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    before = rl.get_compute_type(np.float32)
    rl.set_compute_type(np.float32, rl.COMPUTE_TYPE_TF32)
    try:
        errs = {}
        for fast in (False, True):
            out = cp.full((96, 3000 + 17), np.nan, dtype=np.float32)
            gemm_into(cp.asarray(a), cp.asarray(b), out, 17, fast)
            got = cp.asnumpy(out)
            assert np.isnan(got[:, :17]).all(), "columns before col0 were written"
            errs[fast] = np.linalg.norm(got[:, 17:] - want) / np.linalg.norm(want)
    finally:
        rl.set_compute_type(np.float32, before)
    assert errs[False] < 2e-6, errs
    assert 2e-5 < errs[True] < 1e-2, errs


def test_allcnn_mnist_against_the_reference(kc):
    """The built-in allcnn-mnist model on four held-out digits, all ten classes: the float64 NumPy
    reference's responses to 1e-5, dominant classes on decisive pixels, composite within a byte."""
    from clearmaps import builtin
    from clearmaps import reference as ref

    net = builtin.load_model()
    images, _ = builtin.heldout()
    x = builtin.to_input(images[::250])
    classes = np.tile(np.arange(10), (4, 1))
    got = kc.clear_from_trace(net, kc.forward(net, x), classes)
    want = ref.clear_from_trace(net, ref.forward(net, x), classes)
    assert_close(got.responses, want.responses, RTOL_F32, "responses")
    mask = decisive(want.responses)
    assert mask.mean() > 0.5  # the comparison is not vacuous: most pixels have a clear dominant class
    assert_equal(got.dominant_index[mask], want.dominant_index[mask], "dominant class")
    assert np.abs(got.rgb.astype(int) - want.rgb)[mask].max() <= 1


def test_vgg16_fcn_against_the_torch_oracle(kc):
    """vgg16-fcn at 64x64 (four pools, a 512-channel head conv): R(x|c) against the float64 torch autograd
    oracle, every class as one batch, GPU arrays in (torch) and out (CuPy)."""
    import cupy as cp
    import torch

    from .oracle import torch_responses

    net = _preset("vgg16-fcn")
    x = np.random.default_rng(2).uniform(size=(1, 3, 64, 64))
    classes = np.arange(10)[None]
    trace = kc.forward(net, torch.from_numpy(x).float().cuda())
    assert isinstance(trace.z, cp.ndarray) and isinstance(trace.switches[4], cp.ndarray)
    R = kc.backproject(net, trace, classes)
    assert isinstance(R, cp.ndarray)
    assert_close(cp.asnumpy(R), torch_responses(net, x, classes[0]), RTOL_F32, "R(x|c)")


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_and_gemm_routes_on_the_gpu(kc, sparse):
    """vgg16-fcn at 64x64 through the default routing (the sparse kernel behind pools and on narrow layers,
    GEMMs on wide ones) and through columns + GEMM everywhere (CudaConfig(sparse=False)), compiled for the
    real GPU: R(x|c) against the float64 torch oracle. (The benchmark's other variants,
    bench.device_bench.VARIANT_METHODS, each meet the float32 contract before they are timed.)"""
    from .oracle import torch_responses

    net = _preset("vgg16-fcn")
    x = np.random.default_rng(3).uniform(size=(2, 3, 64, 64))
    config = kc.CudaConfig(sparse=sparse)
    R = kc.backproject(net, kc.forward(net, x, config=config), np.arange(10)[None].repeat(2, 0), config=config)
    assert_close(R, torch_responses(net, x, np.arange(10)), RTOL_F32, f"R(x|c), sparse={sparse}")


def test_memory_splitting_on_the_gpu(kc, monkeypatch):
    """A limit that holds fewer (image, class) signals than one image's ten classes: the work is split over
    images and classes, with the same maps as one pass, on CuPy's allocator."""
    import cupy as cp

    from clearmaps.kernels.cuda import memory

    net = _preset("allcnn-mnist", 3)
    x = cp.asarray(np.random.default_rng(3).uniform(size=(6, 1, 28, 28)), dtype=cp.float32)
    trace = kc.forward(net, x)
    whole = kc.clear_from_trace(net, trace, np.tile(np.arange(10), (6, 1)))
    seen = []
    real_chunks = memory.chunks
    monkeypatch.setattr(memory, "chunks", lambda *a: seen.append(real_chunks(*a)) or seen[-1])
    kc.set_memory_limit(1_600_000)
    try:
        split = kc.clear_from_trace(net, trace, np.tile(np.arange(10), (6, 1)))
    finally:
        kc.set_memory_limit(None)
    assert len(seen[0]) > 6 and all(kc_ < 10 for _, _, _, kc_ in seen[0]), seen
    assert_close(cp.asnumpy(split.responses), cp.asnumpy(whole.responses), 1e-6, "responses")
    assert_equal(cp.asnumpy(split.dominant_index), cp.asnumpy(whole.dominant_index), "dominant class")


def test_fast_mode_reports_its_agreement(kc):
    net = _preset("allcnn-mnist", 4)
    x = np.random.default_rng(4).uniform(size=(8, 1, 28, 28)).astype(np.float32)
    report = kc.agreement(net, x)
    assert report["pixels"] == 8 * 28 * 28
    assert report["decisive_agreement"] >= 0.97 and report["agreement"] >= 0.9, report


def test_auto_picks_cuda_and_explain_runs(kc):
    import clearmaps

    assert clearmaps.get_backend("auto") is kc
    net = _preset("allcnn-mnist", 5)
    x = np.random.default_rng(5).uniform(size=(2, 1, 28, 28))
    got = clearmaps.explain(net, x, classes="top3", backend="auto", keep_responses=False)
    want = clearmaps.explain(net, x, classes="top3", backend="reference")
    assert got.responses is None
    assert_equal(got.classes, want.classes, "classes")
    mask = decisive(want.responses)
    assert_equal(got.dominant_class[mask], want.dominant_class[mask], "dominant class")


def test_warm_compiles_into_the_cache_that_explain_loads(kc, monkeypatch, tmp_path):
    """kc.warm compiles a network's sparse kernels in worker processes into a fresh file cache; this
    process's first call then loads every one of them from there (cache hits, no compile), and a second
    warm finds nothing left to do."""
    from clearmaps.kernels.cuda import sparse_kernels as sk
    from clearmaps.kernels.cuda import warmup

    from .cuda_sim.signals import small_net

    monkeypatch.setenv("CLEARMAPS_CACHE_DIR", str(tmp_path))
    sk.sparse_transpose.cache_clear()  # this process's dispatchers of earlier tests: built with another cache
    try:
        rng = np.random.default_rng(6)
        net = small_net(rng, classes=4)  # small, so that its few kernels compile in seconds
        x = rng.uniform(size=(2, 2, 8, 8))
        calls = warmup.record(net, x)
        done = kc.warm(net, x, jobs=4)
        assert calls and set(done) == set(calls)
        kc.clear_from_trace(net, kc.forward(net, x), np.array([[0, 1], [2, 3]]), keep_responses=False)
        for name, call in calls.items():
            stats = warmup.kernel_of(call).stats
            assert sum(stats.cache_misses.values()) == 0 and sum(stats.cache_hits.values()) >= 1, (name, stats)
        assert kc.warm(net, x) == {}
    finally:
        sk.sparse_transpose.cache_clear()


def test_kernels_run_on_cupys_current_stream(kc, monkeypatch):
    """Every numba launch goes to CuPy's current stream (bindings/interop.py makes it torch's), where the
    CuPy ops and cuBLAS GEMMs go too: on a non-blocking side stream the maps equal the default stream's, and
    every launch named the side stream (a kernel left on the legacy default stream would race with the
    GEMMs on the side stream)."""
    import cupy as cp

    from clearmaps.kernels.cuda import device

    net = _preset("allcnn-mnist", 6)
    x = cp.asarray(np.random.default_rng(6).uniform(size=(256, 1, 28, 28)), dtype=cp.float32)
    classes = np.tile(np.arange(10), (256, 1))
    want = kc.clear_from_trace(net, kc.forward(net, x), classes, keep_responses=False)
    cp.cuda.Device().synchronize()
    seen = []
    real = device.launch_stream
    monkeypatch.setattr(device, "launch_stream", lambda: seen.append(real()) or seen[-1])
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        got = kc.clear_from_trace(net, kc.forward(net, x), classes, keep_responses=False)
        rgb, index = got.rgb.copy(), got.dominant_index.copy()
    side.synchronize()
    assert seen and {int(s) for s in seen} == {side.ptr}, (len(seen), {int(s) for s in seen}, side.ptr)
    assert_equal(cp.asnumpy(index), cp.asnumpy(want.dominant_index), "dominant class on a side stream")
    assert_equal(cp.asnumpy(rgb), cp.asnumpy(want.rgb), "rgb on a side stream")


# ---- the graph path (kernels/cuda/graph.py): every graph, every method ----------------------------------------

def _arch(name, batch=2):
    import torch

    import clearmaps

    model = archs.build(name, 5, tiny=True, dtype=torch.float64)
    x = archs.example_input(name, batch)
    return model, clearmaps.from_torch(model, input_shape=tuple(x.shape[1:])), x.numpy()


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
def test_every_architecture_and_method_on_the_graph_path(kc, name):
    """Each tiny torchvision-style classifier of tests/archs.py, every response method, compiled for the real
    GPU: z_L and R(x|c) of two classes within RTOL_F32 of the float64 reference; a torch CUDA tensor in, CuPy
    arrays out (trace, saved signs and R), nothing through the host."""
    import cupy as cp
    import torch

    from clearmaps import reference as ref

    _, net, x = _arch(name)
    want_trace = ref.forward(net, x)
    for method in ref.METHODS:
        trace = kc.forward(net, torch.from_numpy(x).float().cuda(), method=method)
        assert isinstance(trace.z, cp.ndarray) and all(
            isinstance(v, cp.ndarray) for v in trace.saved.values() if not isinstance(v, tuple))
        assert_close(cp.asnumpy(trace.z), want_trace.z, RTOL_F32, f"{name}: z_L")
        R = kc.backproject(net, trace, [0, 3], method=method)
        assert isinstance(R, cp.ndarray)
        assert_close(cp.asnumpy(R), ref.backproject(net, want_trace, [0, 3], method=method), RTOL_F32,
                     f"{name}, {method}: R(x|c)")


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_clearmaps_torch_explains_a_cuda_graph(kc, method):
    """clearmaps.torch.explain on a ResNet-18 on the GPU: torch's own forward pass (its trace viewed as CuPy
    arrays, the graph path reading a trace it did not make) and the CUDA back-projection give the
    reference's dominant classes on decisive pixels, as torch CUDA tensors."""
    import torch

    import clearmaps
    from clearmaps import torch as ctorch

    model, net, x = _arch("resnet18")
    got = ctorch.explain(model.float().cuda(), torch.from_numpy(x).float().cuda(), backend="auto", method=method)
    want = clearmaps.explain(net, x, backend="reference", method=method)
    assert got.rgb.is_cuda
    mask = decisive(want.responses)
    assert_equal(got.dominant_class.cpu().numpy()[mask], want.dominant_class[mask], f"{method}: dominant class")
    assert_close(got.responses.cpu().numpy(), want.responses, RTOL_F32, f"{method}: responses")


def test_graph_path_is_deterministic_and_splits_on_the_gpu(kc):
    """No atomics on the graph path: two calls give the same bytes, and keep_responses=False the same
    dominant classes and colours as keeping them; a memory limit that splits images and classes gives the same
    maps to float32 rounding (GEMMs of other widths may sum in another order)."""
    import cupy as cp

    _, net, x = _arch("densenet121", 3)
    xd = cp.asarray(x, dtype=cp.float32)
    trace = kc.forward(net, xd, method="gradient")
    a = kc.clear_from_trace(net, trace, None, method="gradient")
    b = kc.clear_from_trace(net, trace, None, method="gradient")
    lean = kc.clear_from_trace(net, trace, None, method="gradient", keep_responses=False)
    for name in ("responses", "dominant_index", "dominant_response", "rgb"):
        assert_equal(cp.asnumpy(getattr(a, name)), cp.asnumpy(getattr(b, name)), f"a second call: {name}")
    assert_equal(cp.asnumpy(lean.dominant_index), cp.asnumpy(a.dominant_index), "lean: dominant class")
    assert_equal(cp.asnumpy(lean.rgb), cp.asnumpy(a.rgb), "lean: rgb")
    from clearmaps.kernels.cuda import graph

    per_signal = graph.backward_bytes_per_signal(net, net.shapes(x.shape[2:]), x.shape[1:])
    split = kc.clear_from_trace(net, trace, None, method="gradient",
                                config=kc.CudaConfig(memory_limit=int(4 / 3 * (3 * per_signal + 10 * 2**20))))
    assert_close(cp.asnumpy(split.responses), cp.asnumpy(a.responses), 1e-6, "responses in chunks")
