"""clearmaps.torch: the forward pass run by torch (its switches are the reference's), the back-projection
by a backend, the conversion cached per module, and the custom op clearmaps::clear_map under
torch.compile (CPU). CUDA variants are in test_interop_gpu.py."""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import clearmaps
import clearmaps.torch as ct
from clearmaps import ClearmapsError, interop, reference

FIELDS = ("responses", "classes", "dominant_class", "dominant_response", "rgb", "logits", "probabilities",
          "palette")


def integer_module(seed=0, pool=nn.MaxPool2d(3, 2, 1), head_relu=True, classes=3):
    """A small torch classifier with integer weights: with integer images every sum is exact, in torch's
    float32 kernels as in the float64 reference, so switches and maps can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(),
              nn.Conv2d(5, classes, 1)] + ([nn.ReLU()] if head_relu else [])
    module = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).to(p.dtype))
    return module


def integer_images(seed=1, batch=2, size=(11, 10), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (batch, 2, *size), generator=g).to(dtype)


def pointer(a) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]


def test_clearmaps_torch_imports_the_real_torch():
    assert ct.__name__ == "clearmaps.torch"
    assert ct.torch is sys.modules["torch"] and ct.torch_forward.F is torch.nn.functional
    assert "bindings" not in torch.__file__


# --- the forward pass: torch's switches are the reference's ---------------------------------------------

@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1),
                                  nn.MaxPool2d((2, 3), (1, 2), (1, 1))],
                         ids=["2x2", "3x3-s2-p1", "3x3-s1-p1", "2x3-s(1,2)-p1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_switches_equal_the_reference_switches(pool, dtype):
    module = integer_module(pool=pool)
    net = clearmaps.from_torch(module)
    x = integer_images(dtype=dtype)
    want = reference.forward(net, x.numpy())
    sizes, switches, z, logits, *_ = ct.trace(net, x)
    assert sizes == want.sizes
    assert switches.keys() == want.switches.keys()
    for i, s in switches.items():
        assert s.dtype == torch.int64
        np.testing.assert_array_equal(s.numpy(), want.switches[i], err_msg=f"layer {i}")
    np.testing.assert_array_equal(z.numpy(), want.z)  # integer sums: exact in float32 too
    np.testing.assert_allclose(logits.numpy(), want.logits, rtol=1e-6)  # a mean: rounded in float32
    assert tied_windows(net, x.numpy()) > 10  # the first-maximum rule is exercised, not just assumed


def tied_windows(net, x) -> int:
    """How many windows of the first max-pool hold their maximum more than once."""
    first = next(i for i, layer in enumerate(net.layers) if isinstance(layer, clearmaps.MaxPool))
    h = x.astype(np.float64)
    for layer in net.layers[:first]:
        h = reference.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding) \
            if isinstance(layer, clearmaps.Conv) else np.maximum(h, 0)
    pool = net.layers[first]
    (ph, pw), (sh, sw) = pool.padding, pool.stride
    padded = np.pad(h, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, pool.kernel, axis=(2, 3))[:, :, ::sh, ::sw]
    return int(((windows == windows.max(axis=(-2, -1), keepdims=True)).sum(axis=(-2, -1)) > 1).sum())


# --- clearmaps.torch.explain equals the NumPy path ------------------------------------------------------

@pytest.mark.parametrize("head_relu", [True, False])
@pytest.mark.parametrize("classes", [None, "top2", [2, 0]])
def test_torch_explain_equals_the_numpy_path_exactly(head_relu, classes):
    module = integer_module(head_relu=head_relu)
    x = integer_images(dtype=torch.float64)
    want = clearmaps.explain(clearmaps.from_torch(module), x.numpy(), classes=classes, backend="reference")
    got = ct.explain(module, x, classes=classes, backend="reference")
    for field in FIELDS:
        t = getattr(got, field)
        assert isinstance(t, torch.Tensor) and t.device == x.device, field
        assert t.numpy().dtype == getattr(want, field).dtype, field
        if field in ("logits", "probabilities"):  # torch's mean and softmax round in another order
            np.testing.assert_allclose(t.numpy(), getattr(want, field), rtol=1e-13, atol=0)
        else:
            np.testing.assert_array_equal(t.numpy(), getattr(want, field), err_msg=field)


def test_torch_explain_in_float32_keeps_float32_and_equals_the_numpy_path():
    module = integer_module()
    x = integer_images()
    want = clearmaps.explain(clearmaps.from_torch(module), x.numpy(), backend="reference")
    got = ct.explain(module, x, backend="reference")
    assert got.responses.dtype == torch.float32 and got.logits.dtype == torch.float32
    for field in FIELDS:  # integer sums are exact in float32 too; only the logits' mean and softmax round
        if field in ("logits", "probabilities"):
            np.testing.assert_allclose(getattr(got, field).numpy(), getattr(want, field), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(getattr(got, field).numpy(), getattr(want, field), err_msg=field)


def test_torch_explain_on_a_trained_looking_network_meets_the_float32_tolerance():
    """Random weights and images, BatchNorm folded and a GAP→Linear head: float32 torch forward against
    the float64 NumPy path. ‖Δ‖/‖ref‖ ≤ 1e-5 and the dominant class equal wherever the top two responses
    differ by more than the float32 error bound (a relative 1e-4 of the image's largest response)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 4)).eval()
    with torch.no_grad():
        module[1].running_mean.uniform_(-0.5, 0.5)
        module[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 12, 12)
    net = clearmaps.from_torch(module)
    want = clearmaps.explain(net, x.numpy().astype(np.float64), backend="reference")
    got = ct.explain(module, x, backend="reference")
    torch.testing.assert_close(got.logits, module(x).detach(), rtol=1e-5, atol=1e-5)
    r, ref = got.responses.double().numpy(), want.responses
    assert np.linalg.norm(r - ref) / np.linalg.norm(ref) <= 1e-5
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear_margin = (top2[:, 1] - top2[:, 0]) > 1e-4 * np.abs(ref).max(axis=(1, 2, 3))[:, None, None]
    assert clear_margin.mean() > 0.9
    np.testing.assert_array_equal(got.dominant_class.numpy()[clear_margin], want.dominant_class[clear_margin])


def test_torch_path_crosses_without_copies(monkeypatch):
    """The Trace the backend receives is a view of torch's own tensors, and the logits come back shared."""
    seen = {}
    real_trace = ct.trace

    def recording_trace(net, x):
        seen["torch"] = real_trace(net, x)
        return seen["torch"]

    def clear_from_trace(net, trace, classes, **options):
        seen["backend"] = trace
        return reference.clear_from_trace(net, trace, classes, **options)

    spy = type("Spy", (), {"clear_from_trace": staticmethod(clear_from_trace)})
    monkeypatch.setattr(ct, "trace", recording_trace)
    monkeypatch.setattr(interop, "get_backend", lambda name: spy)
    got = ct.explain(integer_module(), integer_images(), backend="reference")
    _, switches, z, logits, probabilities, *_ = seen["torch"]
    trace = seen["backend"]
    assert isinstance(trace.z, np.ndarray) and pointer(trace.z) == pointer(z)
    assert pointer(trace.logits) == pointer(logits) and pointer(trace.probabilities) == pointer(probabilities)
    for i, s in switches.items():
        assert pointer(trace.switches[i]) == pointer(s)
    assert pointer(got.logits) == pointer(logits)


def test_torch_explain_refuses_what_it_cannot_take():
    module = integer_module()
    with pytest.raises(ClearmapsError, match="clearmaps.torch takes a torch tensor"):
        ct.explain(module, integer_images().numpy())
    with pytest.raises(ClearmapsError, match="requires grad"):
        ct.explain(module, integer_images().requires_grad_())
    with pytest.raises(ClearmapsError, match="has 3 channels"):
        ct.explain(module, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ClearmapsError, match="backend='cuda' computes on a GPU"):
        ct.explain(module, integer_images(), backend="cuda")
    with pytest.raises(ClearmapsError, match="not supported"):
        ct.explain(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softplus()), integer_images())
    with pytest.raises(ClearmapsError, match="reduce="):
        ct.explain(module, integer_images(), reduce="mean")


def test_half_precision_torch_images_are_refused():
    module, x = integer_module(), integer_images()
    with pytest.raises(ClearmapsError, match=r"dtype float16; expected float32 or float64"):
        ct.explain(module, x.half())
    with pytest.raises(ClearmapsError, match=r"dtype bfloat16; expected float32 or float64"):
        torch.ops.clearmaps.clear_map(x.bfloat16(), ct.register(module))


# --- the conversion cache --------------------------------------------------------------------------------

def test_conversion_is_cached_until_parameters_change():
    module = integer_module()
    net = ct.network_for(module)
    assert ct.network_for(module) is net
    with torch.no_grad():
        module[0].weight.add_(1)  # in place, as an optimiser step
    changed = ct.network_for(module)
    assert changed is not net
    np.testing.assert_array_equal(changed.layers[0].weight, module[0].weight.detach().double().numpy())
    module.load_state_dict(integer_module(seed=5).state_dict())
    reloaded = ct.network_for(module)
    assert reloaded is not changed
    module[3] = nn.Conv2d(4, 5, 3, stride=2, padding=1)  # a replaced layer
    assert ct.network_for(module) is not reloaded
    assert ct.network_for(module, class_names=["a", "b", "c"]).class_names == ("a", "b", "c")


def test_conversion_cache_does_not_keep_modules_alive():
    module = integer_module()
    net = ct.network_for(module)
    alive = weakref.ref(module)
    del module
    gc.collect()
    assert alive() is None
    assert all(entry[1] is not net for entry in ct._NETWORKS.values())


def test_a_network_can_be_passed_instead_of_a_module():
    module, x = integer_module(), integer_images()
    net = clearmaps.from_torch(module)
    assert torch.equal(ct.explain(net, x, backend="reference").rgb, ct.explain(module, x, backend="reference").rgb)


# --- the custom op ----------------------------------------------------------------------------------------

def explain_as_op(module, x, **options):
    e = ct.explain(module, x, backend="reference", keep_responses=False, **options)
    return e.rgb, e.dominant_class, e.dominant_response


def assert_same(got, want):
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("op_options, explain_options", [
    ({}, {}),
    ({"top_k": 2}, {"classes": "top2"}),
    ({"classes": [2, 0]}, {"classes": [2, 0]}),
    ({"vmax": 3.0}, {"vmax": 3.0}),
    ({"vmax_rule": "batch"}, {"vmax": "batch"}),
    ({"vmax_rule": "p90", "reduce": "max", "rectify": False}, {"vmax": "p90", "reduce": "max", "rectify": False}),
])
def test_the_op_equals_explain(op_options, explain_options):
    module, x = integer_module(), integer_images()
    handle = ct.register(module)
    got = torch.ops.clearmaps.clear_map(x, handle, backend="reference", **op_options)
    assert_same(got, explain_as_op(module, x, **explain_options))


def test_the_op_passes_opcheck():
    module = integer_module()
    torch.library.opcheck(ct.clear_map, (integer_images(), ct.register(module)), {"backend": "reference"})


def test_the_op_under_torch_compile_eager_backend():
    module = integer_module()
    handle = ct.register(module)

    def fn(images):
        rgb, dominant_class, response = torch.ops.clearmaps.clear_map(images * 1.0, handle, top_k=2)
        return rgb.float().mean(dim=-1), dominant_class, response

    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
    for batch in (1, 3):  # dynamic batch size through the fake implementation
        images = integer_images(batch=batch)
        got = compiled(images)
        want = fn(images)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_the_op_under_torch_compile_inductor():
    """The default backend. Only the op is in the graph, so inductor emits no C++ (that would add ~15 s)."""
    module, x = integer_module(), integer_images()
    handle = ct.register(module)
    compiled = torch.compile(lambda images: torch.ops.clearmaps.clear_map(images, handle), fullgraph=True)
    assert_same(compiled(x), explain_as_op(module, x))


def test_a_handle_follows_its_module_and_never_serves_stale_weights():
    module, x = integer_module(), integer_images()
    handle = ct.register(module)
    assert ct.register(module) == handle
    before = torch.ops.clearmaps.clear_map(x, handle, backend="reference")
    with torch.no_grad():
        module[5].weight.mul_(-1)
    after = torch.ops.clearmaps.clear_map(x, handle, backend="reference")
    assert not torch.equal(before[0], after[0])
    assert_same(after, explain_as_op(module, x))


def test_the_op_refuses_bad_arguments():
    module, x = integer_module(), integer_images()
    handle = ct.register(module)
    with pytest.raises(ClearmapsError, match="choose one"):
        torch.ops.clearmaps.clear_map(x, handle, classes=[0], top_k=1)
    with pytest.raises(ClearmapsError, match="both given"):
        torch.ops.clearmaps.clear_map(x, handle, vmax=1.0, vmax_rule="batch")
    with pytest.raises(ClearmapsError, match="register"):
        ct.register("not a module")
    gone = integer_module()
    stale = ct.register(gone)
    del gone
    gc.collect()
    with pytest.raises(ClearmapsError, match=f"handle {stale} is not registered"):
        torch.ops.clearmaps.clear_map(x, stale)
