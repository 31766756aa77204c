"""GPU variants of the interop tests: CuPy arrays, CUDA torch tensors and JAX arrays on a GPU in, the same
framework out, on the same device, without copies and on the caller's stream.

Marked ``gpu``; the whole file skips cleanly where CuPy or a CUDA GPU is missing. Run it on a GPU machine:

    python -m pytest -q -m gpu tests/test_interop_gpu.py

Two kinds of test:
- the plumbing, with a stand-in for the CUDA backend that records what crosses (pointers, device, stream)
  and computes with the reference on host copies: independent of the CUDA kernels;
- the real CUDA backend (clearmaps.kernels.cuda) against the NumPy path: these fail, not skip, on a GPU
  machine where that backend cannot be loaded.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy", reason="CuPy is not installed: GPU interop tests skipped")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no device
    _GPUS = 0
if _GPUS == 0:
    pytest.skip("no CUDA GPU: GPU interop tests skipped", allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import clearmaps  # noqa: E402
import clearmaps.torch as ct  # noqa: E402
from clearmaps import ClearmapsError, Conv, MaxPool, Network, ReLU, interop, reference  # noqa: E402
from clearmaps.reference import Clear, Trace  # noqa: E402

FIELDS = ("responses", "classes", "dominant_class", "dominant_response", "rgb", "logits", "probabilities",
          "palette")
HAS_TORCH_CUDA = torch.cuda.is_available()
needs_torch_cuda = pytest.mark.skipif(not HAS_TORCH_CUDA, reason="this torch build has no CUDA")


def tiny_net(seed=0, channels=2, classes=3):
    """Small integer weights (as in test_interop.py): exact sums in float32, so paths compare exactly."""
    rng = np.random.default_rng(seed)
    return Network([Conv(rng.integers(-2, 3, (4, channels, 3, 3)).astype(float),
                         rng.integers(-1, 2, 4).astype(float), padding=1), ReLU(), MaxPool(3, 2, 1),
                    Conv(rng.integers(-2, 3, (5, 4, 3, 3)).astype(float), np.zeros(5), stride=2, padding=1), ReLU(),
                    Conv(rng.integers(-2, 3, (classes, 5, 1, 1)).astype(float), np.zeros(classes)), ReLU()],
                   [f"c{i}" for i in range(classes)])


def tiny_images(seed=1, batch=2, channels=2, size=(9, 8)):
    return np.random.default_rng(seed).integers(0, 3, (batch, channels, *size)).astype(np.float32)


def integer_module(seed=0):
    g = torch.Generator().manual_seed(seed)
    module = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                           nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 1), nn.ReLU()).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    return module


def host(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.cpu().numpy()
    if isinstance(a, cupy.ndarray):
        return a.get()
    return np.asarray(a)


def pointer(a) -> int:
    if isinstance(a, cupy.ndarray):
        return a.data.ptr
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.unsafe_buffer_pointer()  # JAX


def assert_equal_to_numpy_path(got, want, float_fields_exact=True):
    for field in FIELDS:
        g, w = host(getattr(got, field)), getattr(want, field)
        if w.dtype.kind == "f" and not float_fields_exact:
            assert np.linalg.norm(g - w) <= 1e-5 * max(np.linalg.norm(w), 1e-30), field
        else:
            np.testing.assert_array_equal(g, w, err_msg=field)


# --- the plumbing, with a recording stand-in for the CUDA backend -----------------------------------------

def stand_in_backend():
    """Takes and returns CuPy arrays like the CUDA backend; computes with the reference on host copies."""
    seen = {}

    def forward(net, x):
        seen.update(x=x, stream=cupy.cuda.get_current_stream().ptr, device=cupy.cuda.Device().id)
        t = reference.forward(net, x.get())
        seen["trace"] = Trace(t.sizes, {i: cupy.asarray(s) for i, s in t.switches.items()}, cupy.asarray(t.z),
                              cupy.asarray(t.logits), cupy.asarray(t.probabilities))
        return seen["trace"]

    def clear_from_trace(net, trace, classes, **options):
        seen.update(trace_in=trace, clear_stream=cupy.cuda.get_current_stream().ptr)
        on_host = Trace(trace.sizes, {i: s.get() for i, s in trace.switches.items()}, trace.z.get(),
                        trace.logits.get(), trace.probabilities.get())
        out = reference.clear_from_trace(net, on_host, classes, **options)
        seen["out"] = Clear(*(None if a is None else cupy.asarray(a) for a in out))
        return seen["out"]

    return types.SimpleNamespace(forward=forward, clear_from_trace=clear_from_trace), seen


@pytest.fixture
def stand_in(monkeypatch):
    backend, seen = stand_in_backend()
    real = interop.get_backend
    # "cuda" is the stand-in; "reference" stays real, for the NumPy path the results are compared with
    monkeypatch.setattr(interop, "get_backend",
                        lambda name: backend if name == "cuda" else real(name) if name == "reference"
                        else pytest.fail(name))
    return seen


def assert_results_are_the_backends(got, seen):
    for name in ("responses", "dominant_response", "rgb"):
        assert pointer(getattr(got, name)) == pointer(getattr(seen["out"], name)), name
    assert pointer(got.logits) == pointer(seen["trace"].logits)


def test_cupy_in_cupy_out_without_copies(stand_in):
    net, x_host = tiny_net(), tiny_images()
    x = cupy.asarray(x_host)
    got = clearmaps.explain(net, x, backend="cuda")
    assert stand_in["x"] is x
    for field in FIELDS:
        assert isinstance(getattr(got, field), cupy.ndarray), field
    assert_results_are_the_backends(got, stand_in)
    assert stand_in["stream"] == cupy.cuda.get_current_stream().ptr
    assert_equal_to_numpy_path(got, clearmaps.explain(net, x_host))


@needs_torch_cuda
def test_torch_cuda_in_torch_cuda_out_without_copies_on_torch_stream(stand_in):
    net, x_host = tiny_net(), tiny_images()
    x = torch.from_numpy(x_host).cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = clearmaps.explain(net, x, backend="cuda")
    assert isinstance(stand_in["x"], cupy.ndarray) and pointer(stand_in["x"]) == x.data_ptr()
    assert stand_in["stream"] == side.cuda_stream == stand_in["clear_stream"]  # the caller's stream, not CuPy's
    for field in FIELDS:
        t = getattr(got, field)
        assert isinstance(t, torch.Tensor) and t.device == x.device, field
    assert_results_are_the_backends(got, stand_in)
    torch.cuda.synchronize()
    assert_equal_to_numpy_path(got, clearmaps.explain(net, x_host))


def test_jax_gpu_in_jax_gpu_out_without_copies(stand_in):
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("this JAX has no GPU backend")
    net, x_host = tiny_net(), tiny_images()
    x = jax.device_put(x_host, gpu)
    with jax.enable_x64(True):
        got = clearmaps.explain(net, x, backend="cuda")
    assert pointer(stand_in["x"]) == x.unsafe_buffer_pointer()
    for field in FIELDS:
        assert getattr(got, field).devices() == {gpu}, field
    assert_results_are_the_backends(got, stand_in)
    assert_equal_to_numpy_path(got, clearmaps.explain(net, x_host))


@needs_torch_cuda
def test_clearmaps_torch_on_cuda_hands_torch_switches_to_the_backend(stand_in, monkeypatch):
    module, x_host = integer_module(), tiny_images()
    recorded = {}
    real_trace = ct.trace
    monkeypatch.setattr(ct, "trace", lambda net, x: recorded.setdefault("torch", real_trace(net, x)))
    x = torch.from_numpy(x_host).cuda()
    got = ct.explain(module.cuda(), x, backend="cuda")
    _, switches, z, logits, _ = recorded["torch"]
    trace = stand_in["trace_in"]
    assert pointer(trace.z) == z.data_ptr() and pointer(trace.logits) == logits.data_ptr()
    net = clearmaps.from_torch(module.cpu())
    want_trace = reference.forward(net, x_host)
    for i, s in switches.items():  # torch's CUDA pooling keeps the first maximum too
        assert pointer(trace.switches[i]) == s.data_ptr()
        np.testing.assert_array_equal(s.cpu().numpy(), want_trace.switches[i])
    assert got.rgb.device == x.device
    want = clearmaps.explain(net, x_host)
    np.testing.assert_array_equal(host(got.rgb), want.rgb)
    np.testing.assert_array_equal(host(got.dominant_class), want.dominant_class)


# --- refusals that need a GPU array -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gpu_arrays_with_a_host_backend_are_refused(backend):
    x = cupy.asarray(tiny_images())
    with pytest.raises(ClearmapsError, match=rf"backend='{backend}' computes on the host but the images are on cuda"):
        clearmaps.explain(tiny_net(), x, backend=backend)
    if HAS_TORCH_CUDA:
        with pytest.raises(ClearmapsError, match=r"computes on the host but the images are on cuda:0 \(torch\)"):
            clearmaps.explain(tiny_net(), torch.from_numpy(tiny_images()).cuda(), backend=backend)


def test_auto_sends_gpu_arrays_to_the_cuda_backend(monkeypatch):
    asked = []
    backend, _ = stand_in_backend()
    monkeypatch.setattr(interop, "get_backend", lambda name: asked.append(name) or backend)
    clearmaps.explain(tiny_net(), cupy.asarray(tiny_images()), backend="auto")
    assert asked == ["cuda"]


@needs_torch_cuda
def test_mixed_frameworks_on_the_gpu_are_refused():
    x = torch.from_numpy(tiny_images()).cuda()
    with pytest.raises(ClearmapsError, match=r"torch float32 tensor on cuda:0 but palette is a CuPy .*mixed"):
        clearmaps.explain(tiny_net(), x, palette=cupy.asarray([0.1, 0.2, 0.3]), backend="cuda")


def test_gpu_images_are_checked_on_the_device(stand_in):
    bad = tiny_images()
    bad[0, 1, 3, 4] = np.inf
    with pytest.raises(ClearmapsError, match=r"NaN or Inf \(first at index \(0, 1, 3, 4\)\)"):
        clearmaps.explain(tiny_net(), cupy.asarray(bad), backend="cuda")
    with pytest.raises(ClearmapsError, match="has 3 channels"):
        clearmaps.explain(tiny_net(), cupy.zeros((1, 3, 8, 8), cupy.float32), backend="cuda")
    with pytest.raises(ClearmapsError, match="dtype uint8; expected floating point"):
        clearmaps.explain(tiny_net(), cupy.zeros((1, 2, 8, 8), cupy.uint8), backend="cuda")


def test_gpu_half_precision_is_refused_and_strided_arrays_are_copied_on_the_device(stand_in):
    net, x_host = tiny_net(), tiny_images()
    want = clearmaps.explain(net, x_host)
    with pytest.raises(ClearmapsError, match=r"dtype float16; .*x\.astype\(cupy\.float32\)"):
        clearmaps.explain(net, cupy.asarray(x_host, dtype=cupy.float16), backend="cuda")
    if HAS_TORCH_CUDA:
        with pytest.raises(ClearmapsError, match=r"dtype bfloat16; .*x\.float\(\)"):
            clearmaps.explain(net, torch.from_numpy(x_host).cuda().bfloat16(), backend="cuda")
    strided = cupy.asarray(np.ascontiguousarray(x_host.transpose(0, 1, 3, 2))).transpose(0, 1, 3, 2)
    with pytest.warns(interop.CopyWarning, match="not contiguous"):
        got = clearmaps.explain(net, strided, backend="cuda")
    assert_equal_to_numpy_path(got, want)


# --- the real CUDA backend ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_backend():
    try:
        return clearmaps.get_backend("cuda")
    except ClearmapsError as exc:
        pytest.fail(f"a GPU is present but the CUDA backend cannot be used: {exc}")


@pytest.fixture
def recording_cuda(cuda_backend, monkeypatch):
    """The real CUDA backend, wrapped to record the arrays it is handed and returns."""
    seen = {}

    def forward(net, x):
        seen["x"] = x
        seen["trace"] = cuda_backend.forward(net, x)
        return seen["trace"]

    def clear_from_trace(net, trace, classes, **options):
        seen["out"] = cuda_backend.clear_from_trace(net, trace, classes, **options)
        return seen["out"]

    wrapper = types.SimpleNamespace(forward=forward, clear_from_trace=clear_from_trace)
    monkeypatch.setattr(interop, "get_backend", lambda name: wrapper)
    return seen


@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_cuda_backend_equals_the_numpy_path_without_copies(recording_cuda, framework):
    if framework == "torch" and not HAS_TORCH_CUDA:
        pytest.skip("this torch build has no CUDA")
    net, x_host = tiny_net(), tiny_images()
    x = cupy.asarray(x_host) if framework == "cupy" else torch.from_numpy(x_host).cuda()
    got = clearmaps.explain(net, x, classes="top2", backend="cuda")
    assert pointer(recording_cuda["x"]) == pointer(x)
    for name in ("dominant_response", "rgb"):
        assert pointer(getattr(got, name)) == pointer(getattr(recording_cuda["out"], name)), name
    want = clearmaps.explain(net, x_host, classes="top2")
    # integer images and weights: float32 sums are exact, so class maps and colours must agree exactly
    assert_equal_to_numpy_path(got, want, float_fields_exact=False)
    np.testing.assert_array_equal(host(got.rgb), want.rgb)
    np.testing.assert_array_equal(host(got.dominant_class), want.dominant_class)


@needs_torch_cuda
def test_cuda_backend_on_a_torch_side_stream(cuda_backend):
    """The backend runs on torch's current stream: every launch (CuPy's and numba's) must follow it, or a
    kernel on another stream races with the GEMMs. A batch big enough to keep the GPU busy makes a race
    show as wrong maps."""
    net, x_host = tiny_net(), np.tile(tiny_images(size=(64, 64)), (16, 1, 1, 1))
    want = clearmaps.explain(net, x_host, backend="reference")
    side = torch.cuda.Stream()
    x = torch.from_numpy(x_host).cuda()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = clearmaps.explain(net, x, backend="cuda")
        rgb = got.rgb.clone()  # read on the side stream, as the caller would
    side.synchronize()
    np.testing.assert_array_equal(host(rgb), want.rgb)
    np.testing.assert_array_equal(host(got.dominant_class), want.dominant_class)


@needs_torch_cuda
def test_clearmaps_torch_with_the_cuda_backend(cuda_backend):
    module, x_host = integer_module(), tiny_images()
    want = clearmaps.explain(clearmaps.from_torch(module), x_host)
    got = ct.explain(module.cuda(), torch.from_numpy(x_host).cuda(), backend="cuda")
    assert got.rgb.is_cuda and got.responses.is_cuda
    assert_equal_to_numpy_path(got, want, float_fields_exact=False)
    np.testing.assert_array_equal(host(got.rgb), want.rgb)


@needs_torch_cuda
@pytest.mark.parametrize("compile_backend", [None, "eager", "inductor"])
def test_the_op_on_cuda(cuda_backend, compile_backend):
    module, x = integer_module().cuda(), torch.from_numpy(tiny_images()).cuda()
    handle = ct.register(module)
    e = ct.explain(module, x, backend="cuda", keep_responses=False)

    def fn(images):
        return torch.ops.clearmaps.clear_map(images, handle)

    run = fn if compile_backend is None else torch.compile(fn, backend=compile_backend, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", interop.CopyWarning)
        rgb, dominant_class, response = run(x)
    assert rgb.device == x.device and rgb.dtype == torch.uint8 and response.dtype == x.dtype
    assert torch.equal(rgb, e.rgb) and torch.equal(dominant_class, e.dominant_class)
