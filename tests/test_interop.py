"""clearmaps.explain on NumPy arrays, torch tensors and JAX arrays (CPU): results in the caller's framework,
equal to the NumPy path, crossing without copies; and the policy for inputs that cannot cross as they are.

GPU variants (CuPy, CUDA torch, JAX on a GPU) are in test_interop_gpu.py.
"""

from __future__ import annotations

import importlib.util
import types
import warnings

import numpy as np
import pytest
import torch

import clearmaps
from clearmaps import ClearmapsError, Conv, MaxPool, Network, ReLU, interop, reference
from clearmaps.interop import CopyWarning

FIELDS = ("responses", "classes", "dominant_class", "dominant_response", "rgb", "logits", "probabilities",
          "palette")


def tiny_net(seed=0, channels=2, classes=3, head_relu=True):
    """Conv-ReLU-overlapping MaxPool-strided Conv-ReLU-head with small integer weights: with small integer
    images every sum is exact in float32 and float64, so paths can be compared exactly, ties included."""
    rng = np.random.default_rng(seed)
    layers = [Conv(rng.integers(-2, 3, (4, channels, 3, 3)).astype(float), rng.integers(-1, 2, 4).astype(float),
                   padding=1), ReLU(), MaxPool(3, 2, 1),
              Conv(rng.integers(-2, 3, (5, 4, 3, 3)).astype(float), np.zeros(5), stride=2, padding=1), ReLU(),
              Conv(rng.integers(-2, 3, (classes, 5, 1, 1)).astype(float), rng.integers(-1, 2, classes).astype(float))]
    return Network(layers + [ReLU()] if head_relu else layers, [f"c{i}" for i in range(classes)])


def tiny_images(seed=1, batch=2, channels=2, size=(9, 8)):
    return np.random.default_rng(seed).integers(0, 3, (batch, channels, *size)).astype(np.float32)


def host_backends():
    """The host backends of this install; "cpu" whenever its module exists (as conftest.py does), so a
    broken Numba install fails here instead of dropping the backend."""
    return ["reference"] + (["cpu"] if importlib.util.find_spec("clearmaps.kernels.cpu") else [])


@pytest.fixture(scope="module")
def jax():
    return pytest.importorskip("jax")


def enable_x64(jax):
    """JAX's 64-bit mode as a context (jax.enable_x64 in new releases, jax.experimental.enable_x64 before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy
    return legacy()


def as_framework(x, framework):
    if framework == "numpy":
        return x
    if framework == "torch":
        return torch.from_numpy(x)
    import jax.numpy as jnp
    return jnp.asarray(x)


def pointer(a) -> int:
    """Address of an array's first element, whatever its framework."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.unsafe_buffer_pointer()  # JAX


def assert_explanations_equal(got, want, exact_dtypes=True):
    for field in FIELDS:
        g, w = np.asarray(getattr(got, field)), getattr(want, field)
        if exact_dtypes:
            assert g.dtype == w.dtype, field
        np.testing.assert_array_equal(g, w, err_msg=field)
    assert got.class_names == want.class_names


# --- results: the caller's framework, equal to the NumPy path -------------------------------------------------

@pytest.mark.parametrize("backend", host_backends())
@pytest.mark.parametrize("classes", [None, "top2", ["c2", 0]])
def test_torch_tensors_give_torch_tensors_equal_to_numpy(backend, classes):
    net, x = tiny_net(), tiny_images()
    want = clearmaps.explain(net, x, classes=classes, backend=backend)
    got = clearmaps.explain(net, torch.from_numpy(x), classes=classes, backend=backend)
    for field in FIELDS:
        t = getattr(got, field)
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu", field
    assert isinstance(got.predicted, torch.Tensor)
    assert torch.equal(got.predicted, torch.from_numpy(want.predicted))
    assert_explanations_equal(got, want)


@pytest.mark.parametrize("backend", host_backends())
def test_jax_arrays_give_jax_arrays_equal_to_numpy(jax, backend):
    net, x = tiny_net(), tiny_images()
    want = clearmaps.explain(net, x, classes="top2", backend=backend)
    with enable_x64(jax):  # 64-bit mode: JAX keeps the backend's float64 / int64 results as they are
        got = clearmaps.explain(net, jax.numpy.asarray(x), classes="top2", backend=backend)
        for field in FIELDS:
            a = getattr(got, field)
            assert isinstance(a, jax.Array) and a.devices() == {jax.devices("cpu")[0]}, field
        assert_explanations_equal(got, want)


def test_jax_default_32_bit_mode_gets_jax_dtypes(jax):
    """Without x64, JAX has no float64/int64 arrays: those results arrive as float32/int32 (JAX's rule)."""
    net, x = tiny_net(), tiny_images()
    want = clearmaps.explain(net, x)
    got = clearmaps.explain(net, jax.numpy.asarray(x))
    assert got.rgb.dtype == np.uint8
    assert got.dominant_class.dtype == np.int32 and got.responses.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got.rgb), want.rgb)
    np.testing.assert_array_equal(np.asarray(got.dominant_class), want.dominant_class)
    np.testing.assert_allclose(np.asarray(got.responses), want.responses, rtol=1e-6)


def test_lists_still_work_and_give_numpy():
    net, x = tiny_net(), tiny_images(batch=1)
    got = clearmaps.explain(net, x.tolist())
    assert isinstance(got.rgb, np.ndarray)
    assert_explanations_equal(got, clearmaps.explain(net, x))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_classes_and_palette_given_as_the_images_framework(framework, request):
    if framework == "jax":
        request.getfixturevalue("jax")
    net, x = tiny_net(), tiny_images()
    hues = np.array([0.1, 0.5])
    want = clearmaps.explain(net, x, classes=[2, 0], palette=hues)
    got = clearmaps.explain(net, as_framework(x, framework), classes=as_framework(np.array([2, 0]), framework),
                            palette=as_framework(hues.astype(np.float32), framework))
    np.testing.assert_array_equal(np.asarray(got.rgb), want.rgb)
    np.testing.assert_array_equal(np.asarray(got.dominant_class), want.dominant_class)


# --- zero copy: a spy backend records the buffers it was handed and the ones it returned ---------------------

def spy_backend(align=False):
    """The reference backend, recording what crosses. With ``align`` its results are copied into 64-byte
    aligned buffers first (XLA's CPU import shares only such buffers; NumPy aligns to 16)."""
    seen = {}

    def aligned(a):
        if a is None or not align:
            return a
        raw = np.empty(a.nbytes + 64, np.uint8)
        offset = (-raw.__array_interface__["data"][0]) % 64
        out = raw[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out

    def forward(net, x):
        seen["x"] = x
        t = reference.forward(net, x)
        trace = reference.Trace(t.sizes, t.switches, t.z, aligned(t.logits), aligned(t.probabilities))
        seen["trace"] = trace
        return trace

    def clear_from_trace(net, trace, classes, **options):
        seen["trace_in"] = trace
        out = reference.Clear(*(aligned(a) for a in reference.clear_from_trace(net, trace, classes, **options)))
        seen["out"] = out
        return out

    return types.SimpleNamespace(forward=forward, clear_from_trace=clear_from_trace), seen


@pytest.fixture
def spy(monkeypatch):
    def install(align=False):
        backend, seen = spy_backend(align)
        monkeypatch.setattr(interop, "get_backend", lambda name: backend)
        return seen
    return install


def test_numpy_images_reach_the_backend_as_themselves(spy):
    seen = spy()
    net, x = tiny_net(), tiny_images()
    got = clearmaps.explain(net, x)
    assert seen["x"] is x
    assert got.rgb is seen["out"].rgb and got.responses is seen["out"].responses


def test_torch_cpu_zero_copy_both_ways(spy):
    seen = spy()
    net, x = tiny_net(), torch.from_numpy(tiny_images())
    got = clearmaps.explain(net, x)
    assert isinstance(seen["x"], np.ndarray) and pointer(seen["x"]) == x.data_ptr()
    out = seen["out"]
    for name in ("responses", "dominant_response", "rgb"):
        assert pointer(getattr(got, name)) == pointer(getattr(out, name)), name
    assert pointer(got.logits) == pointer(seen["trace"].logits)
    # shared, not equal by chance: a write through the backend's array shows in the tensor
    out.rgb[0, 0, 0, 0] = 7
    assert int(got.rgb[0, 0, 0, 0]) == 7


def test_jax_cpu_zero_copy_both_ways(jax, spy):
    seen = spy(align=True)
    net = tiny_net()
    x = jax.numpy.asarray(tiny_images())
    with enable_x64(jax):
        got = clearmaps.explain(net, x)
    assert isinstance(seen["x"], np.ndarray) and pointer(seen["x"]) == x.unsafe_buffer_pointer()
    out = seen["out"]
    for name in ("responses", "dominant_response", "rgb"):
        assert pointer(getattr(got, name)) == pointer(getattr(out, name)), name
    assert pointer(got.probabilities) == pointer(seen["trace"].probabilities)


def test_jax_cpu_copies_unaligned_results_once(jax, spy):
    """NumPy's 16-byte aligned buffers are copied by JAX on import (it needs 64): documented, values equal."""
    seen = spy(align=False)
    net = tiny_net()
    with enable_x64(jax):
        got = clearmaps.explain(net, jax.numpy.asarray(tiny_images()))
    np.testing.assert_array_equal(np.asarray(got.rgb), seen["out"].rgb)


# --- inputs that cannot cross as they are -----------------------------------------------------------------

@pytest.mark.parametrize("make, dtype, conversion", [
    (lambda x: torch.from_numpy(x).half(), "float16", r"x\.float\(\)"),
    (lambda x: torch.from_numpy(x).bfloat16(), "bfloat16", r"x\.float\(\)"),
    (lambda x: x.astype(np.float16), "float16", r"x\.astype\(np\.float32\)"),
], ids=["torch-float16", "torch-bfloat16", "numpy-float16"])
def test_half_precision_is_refused_with_the_conversion_to_write(make, dtype, conversion):
    with pytest.raises(ClearmapsError, match=rf"dtype {dtype}; expected float32 or float64 .*{conversion}"):
        clearmaps.explain(tiny_net(), make(tiny_images()))


def test_jax_bfloat16_is_refused_with_the_conversion_to_write(jax):
    x = jax.numpy.asarray(tiny_images(), dtype=jax.numpy.bfloat16)
    with pytest.raises(ClearmapsError, match=r"dtype bfloat16; .*x\.astype\(jnp\.float32\)"):
        clearmaps.explain(tiny_net(), x)


@pytest.mark.parametrize("make", [
    lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))).transpose(2, 3),
    lambda x: torch.from_numpy(x).contiguous(memory_format=torch.channels_last),
    lambda x: np.repeat(x, 2, axis=3)[..., ::2],
], ids=["torch-transposed", "torch-channels_last", "numpy-strided"])
def test_non_contiguous_images_are_copied_once_with_a_warning(make):
    net, x = tiny_net(), tiny_images()
    strided = make(x)
    np.testing.assert_array_equal(np.asarray(strided), x)
    with pytest.warns(CopyWarning, match="not contiguous"):
        got = clearmaps.explain(net, strided)
    assert_explanations_equal(got, clearmaps.explain(net, x))


def test_contiguous_float32_images_warn_nothing():
    net, x = tiny_net(), tiny_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clearmaps.explain(net, torch.from_numpy(x))
        clearmaps.explain(net, x.astype(np.float64))


@pytest.mark.parametrize("make", [
    lambda x: torch.from_numpy(x).to(torch.uint8),
    lambda x: torch.from_numpy(x).to(torch.int64),
    lambda x: torch.from_numpy(x) > 0,
    lambda x: x.astype(np.uint8),
    lambda x: x.astype(np.complex64),
], ids=["torch-uint8", "torch-int64", "torch-bool", "numpy-uint8", "numpy-complex"])
def test_integer_bool_and_complex_images_are_refused(make):
    with pytest.raises(ClearmapsError, match=r"expected floating point images \(float32 or float64\)"):
        clearmaps.explain(tiny_net(), make(tiny_images()))


def test_integer_images_get_a_hint_to_normalise():
    with pytest.raises(ClearmapsError, match=r"dtype uint8; .*x\.float\(\) / 255"):
        clearmaps.explain(tiny_net(), torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_tensors_that_require_grad_are_refused_and_detach_is_free():
    net = tiny_net()
    x = torch.from_numpy(tiny_images()).requires_grad_()
    with pytest.raises(ClearmapsError, match=r"requires grad.*x\.detach\(\)"):
        clearmaps.explain(net, x)
    detached = x.detach()
    assert detached.data_ptr() == x.data_ptr()
    clearmaps.explain(net, detached)


def test_jax_tracers_are_refused(jax):
    net = tiny_net()

    @jax.jit
    def inside(x):
        clearmaps.explain(net, x)
        return x

    with pytest.raises(ClearmapsError, match="tracer"):
        inside(jax.numpy.asarray(tiny_images()))


@pytest.mark.parametrize("framework, what, move", [("torch", "a torch tensor", r"x\.cuda\(\)"),
                                                  ("jax", "a JAX array", r"jax\.device_put")])
def test_torch_and_jax_host_arrays_with_the_cuda_backend_are_refused(framework, what, move, request):
    if framework == "jax":
        request.getfixturevalue("jax")
    x = as_framework(tiny_images(), framework)
    with pytest.raises(ClearmapsError, match=rf"backend='cuda' computes on a GPU but the images are {what} "
                                             rf"on the host; move them to the GPU first \({move}"):
        clearmaps.explain(tiny_net(), x, backend="cuda")


def test_numpy_arrays_go_to_any_backend_as_they_are(spy, monkeypatch):
    """NumPy has no device to keep: "cuda" takes NumPy arrays (copying them itself), and "auto" keeps the
    project-wide meaning of get_backend("auto")."""
    seen = spy()
    asked = []
    backend = interop.get_backend
    monkeypatch.setattr(interop, "get_backend", lambda name: asked.append(name) or backend(name))
    x = tiny_images()
    clearmaps.explain(tiny_net(), x, backend="cuda")
    assert seen["x"] is x
    clearmaps.explain(tiny_net(), x, backend="auto")
    assert asked == ["cuda", "auto"]


def test_devices_without_a_backend_are_refused():
    with pytest.raises(ClearmapsError, match=r"on meta.*CPU \(NumPy\) or on CUDA GPUs"):
        clearmaps.explain(tiny_net(), torch.zeros(1, 2, 8, 8, device="meta"))


def test_auto_follows_the_data_to_a_host_backend(spy, monkeypatch):
    calls = []
    real = interop.backend_for

    def recording(name, caller):
        calls.append((name, caller.on_gpu))
        return real(name, caller)
    monkeypatch.setattr(interop, "backend_for", recording)
    monkeypatch.setattr(interop, "get_backend", lambda name: calls.append(name) or reference)
    clearmaps.explain(tiny_net(), torch.from_numpy(tiny_images()), backend="auto")
    assert calls == [("auto", False), "cpu"]  # never "cuda" for a host tensor


def test_auto_falls_back_to_the_reference_without_the_cpu_backend(monkeypatch):
    def only_reference(name):
        if name != "reference":
            raise ClearmapsError(f"backend {name!r} is not available here")
        return reference
    monkeypatch.setattr(interop, "get_backend", only_reference)
    got = clearmaps.explain(tiny_net(), torch.from_numpy(tiny_images()), backend="auto")
    assert torch.equal(got.rgb, torch.from_numpy(clearmaps.explain(tiny_net(), tiny_images(), backend="reference").rgb))


def test_unknown_backend_names_are_refused():
    with pytest.raises(ClearmapsError, match="expected one of"):
        clearmaps.explain(tiny_net(), torch.from_numpy(tiny_images()), backend="gpu")


def test_mixed_frameworks_are_refused(jax):
    net, x = tiny_net(), tiny_images()
    with pytest.raises(ClearmapsError, match=r"x is a torch float32 tensor on cpu but palette is a JAX .*mixed"):
        clearmaps.explain(net, torch.from_numpy(x), palette=jax.numpy.asarray([0.1, 0.2, 0.3]))
    with pytest.raises(ClearmapsError, match=r"x is a NumPy float32 array but classes is a torch .*mixed"):
        clearmaps.explain(net, x, classes=torch.tensor([0, 1]))
    with pytest.raises(ClearmapsError, match=r"x is a JAX float32 array but classes is a torch .*mixed"):
        clearmaps.explain(net, jax.numpy.asarray(x), classes=torch.tensor([0, 1]))
    # NumPy arrays and lists go with any framework (they are what default_palette returns)
    clearmaps.explain(net, torch.from_numpy(x), palette=clearmaps.default_palette(3), classes=[0, 1, 2])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_shapes_and_values_get_the_reference_messages(framework, request):
    if framework == "jax":
        request.getfixturevalue("jax")
    net = tiny_net()
    with pytest.raises(ClearmapsError, match="has 3 channels"):
        clearmaps.explain(net, as_framework(np.zeros((1, 3, 8, 8), np.float32), framework))
    with pytest.raises(ClearmapsError, match="rank 3"):
        clearmaps.explain(net, as_framework(np.zeros((2, 8, 8), np.float32), framework))
    bad = tiny_images()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(ClearmapsError, match=r"NaN or Inf \(first at index \(1, 0, 2, 3\)\)"):
        clearmaps.explain(net, as_framework(bad, framework))


def test_a_wrong_crossing_would_be_caught(monkeypatch):
    """Negative control: if the images crossed transposed, the comparison with the NumPy path fails."""
    net, x = tiny_net(), tiny_images(size=(8, 8))
    want = clearmaps.explain(net, x)
    real = interop.Caller.to_backend
    monkeypatch.setattr(interop.Caller, "to_backend",
                        lambda self, a: real(self, a).transpose(0, 1, 3, 2) if a is not None and a.ndim == 4 else
                        real(self, a))
    got = clearmaps.explain(net, torch.from_numpy(x))
    with pytest.raises(AssertionError):
        assert_explanations_equal(got, want)


# --- one validation for host and device arrays -------------------------------------------------------------

class DeviceStandIn:
    """A GPU array as reference/errors.py recognises one (``__cuda_array_interface__`` and a NumPy dtype), with
    elementwise operators and reductions of its own. It cannot be converted to NumPy: a check that copied it
    to the host would fail here instead of passing quietly."""

    __cuda_array_interface__ = {}

    def __init__(self, a):
        self._a = np.asarray(a)

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)

    def __sub__(self, other):
        return DeviceStandIn(self._a - other._a)

    def __ne__(self, other):
        return DeviceStandIn(self._a != other)

    def any(self):
        return DeviceStandIn(self._a.any())

    def __bool__(self):
        return bool(self._a)

    def __int__(self):
        return int(self._a)

    def reshape(self, *shape):
        return DeviceStandIn(self._a.reshape(*shape))

    def nonzero(self):
        return tuple(DeviceStandIn(i) for i in self._a.nonzero())

    def __getitem__(self, key):
        return DeviceStandIn(self._a[key])

    def __array__(self, *args, **kwargs):
        raise AssertionError("a device array was copied to the host to be checked")


@pytest.mark.parametrize("make, message", [
    (lambda x: x[0], "rank 3"),
    (lambda x: x[:, :1], "has 1 channels"),
    (lambda x: x.astype(np.float16), "dtype float16"),
    (lambda x: x.astype(np.int32), "dtype int32"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 37, np.inf, x), r"NaN or Inf \(first at index \(0, 0, 2, 5\)\)"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) >= 40, np.nan, x), r"NaN or Inf \(first at index \(0, 0, 2, 8\)\)"),
])
def test_device_arrays_are_checked_where_they_are_with_the_host_words(make, message):
    """reference.check_input, and interop.check_images for every backend, refuse a bad GPU array with the same
    message as the same mistake in a NumPy array, computed with the array's own operators (never a host
    copy); a good one comes back as itself."""
    net = tiny_net()
    bad = make(tiny_images(size=(9, 16)))
    with pytest.raises(ClearmapsError, match=message) as on_host:
        reference.check_input(net, bad)
    for check in (reference.check_input, interop.check_images):
        with pytest.raises(ClearmapsError) as on_device:
            check(net, DeviceStandIn(bad))
        assert str(on_device.value) == str(on_host.value)
    good = DeviceStandIn(tiny_images())
    assert interop.check_images(net, good) is good
