"""Response methods (issue 17; docs/design.md, "Response methods"): each method of clearmaps equals its Captum
counterpart on the same forward function E_c = ½·Σ z_L[c]² — Deconvolution, GuidedBackprop,
Saliency(abs=False), InputXGradient — for the float64 reference (≤ 1e-10) and the CPU backend (≤ 1e-5), on
hypothesis-drawn chain networks and on torchvision-style graphs whose ReLUs are all modules (Captum overrides
nn.ReLU modules only). Signed maps compose as Eqs. 4–6 say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import clearmaps
from clearmaps import ClearmapsError, get_backend
from clearmaps import reference as ref
from clearmaps.reference import Conv, MaxPool, ReLU

from . import archs
from .graph_oracle import run_with_class_map
from .strategies import clear_cases
from .tolerances import RTOL_F32, RTOL_F64, assert_close, assert_equal, decisive

CAPTUM = {"deconvnet": lambda m: (Deconvolution(m), {}), "guided": lambda m: (GuidedBackprop(m), {}),
          "gradient": lambda m: (Saliency(m), {"abs": False}), "input_x_gradient": lambda m: (InputXGradient(m), {})}


class Energy(nn.Module):
    """x → (B, N): E_c = ½·Σ z_L[c]² of every class c, z_L from ``class_map(x)``."""

    def __init__(self, body, class_map):
        super().__init__()
        self.body = body
        self.class_map = class_map

    def forward(self, x):
        z = self.class_map(x)
        return 0.5 * (z ** 2).sum(dim=(2, 3))


def _chain_module(net):
    layers = []
    for layer in net.layers:
        if isinstance(layer, Conv):
            c = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding).double()
            c.weight.data = torch.tensor(np.asarray(layer.weight))
            c.bias.data = torch.tensor(np.asarray(layer.bias))
            layers.append(c)
        elif isinstance(layer, ReLU):
            layers.append(nn.ReLU())
        else:
            layers.append(nn.MaxPool2d(layer.kernel, layer.stride, layer.padding))
    seq = nn.Sequential(*layers)
    return Energy(seq, seq)


def captum_responses(energy, x, classes, method):
    """Captum's attribution of E_c for each class of ``classes``: float64 (B, K, C, H, W)."""
    out = []
    for c in classes:
        xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
        attr, kwargs = CAPTUM[method](energy)
        out.append(attr.attribute(xt, target=int(c), **kwargs).detach().numpy())
    return np.stack(out, axis=1)


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clear_cases(max_size=20, max_classes=5), st.sampled_from(ref.METHODS))
def test_methods_equal_captum_on_chains(backend, case, method):
    classes = list(range(case.net.num_classes))
    want = captum_responses(_chain_module(case.net), case.x, classes, method)
    impl = get_backend(backend)
    trace = impl.forward(case.net, case.x, method=method)
    got = impl.backproject(case.net, trace, classes, method=method)
    assert_close(got, want, RTOL_F64 if backend == "reference" else RTOL_F32, f"{method} vs Captum")


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0"])
@pytest.mark.parametrize("method", ref.METHODS)
def test_methods_equal_captum_on_graphs(name, method):
    """Graphs whose every ReLU is an nn.ReLU module (Captum sees only those), converted by from_torch."""
    model = archs.build(name, 5, tiny=True, dtype=torch.float64)
    x = archs.example_input(name, 1).numpy()
    net = clearmaps.from_torch(model, input_shape=x.shape[1:])
    energy = Energy(model, lambda t: run_with_class_map(model, archs.HEADS[name], t)[0])
    classes = [0, 3]
    want = captum_responses(energy, x, classes, method)
    got = ref.backproject(net, ref.forward(net, x), classes, method=method)
    assert_close(got, want, RTOL_F64, f"{name}, {method}: reference vs Captum")
    cpu = get_backend("cpu")
    fast = cpu.backproject(net, cpu.forward(net, x, method=method), classes, method=method)
    assert_close(fast, got, RTOL_F32, f"{name}, {method}: cpu vs reference")


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clear_cases(max_size=16, max_classes=6), st.sampled_from(ref.METHODS[1:]), st.booleans())
def test_signed_maps_compose_as_eqs_4_to_6(backend, case, method, keep):
    """The dominant class is the largest (signed) response; pixels whose largest response is ≤ 0 are black;
    the CPU backend agrees with the reference on decisive pixels."""
    out = clearmaps.explain(case.net, case.x, backend=backend, method=method, keep_responses=True)
    want = ref.clear_from_trace(case.net, ref.forward(case.net, case.x), None, method=method)
    mask = decisive(want.responses)
    assert_equal(np.asarray(out.dominant_class)[mask], want.dominant_index[mask], "dominant class (decisive)")
    black = np.asarray(out.dominant_response) <= 0
    assert (np.asarray(out.rgb)[black] == 0).all(), "a pixel with no positive response is not black"
    lean = clearmaps.explain(case.net, case.x, backend=backend, method=method, keep_responses=False)
    assert_equal(lean.rgb, out.rgb, "keep_responses=False: rgb")


def test_method_names_and_refusals():
    net = clearmaps.Network([Conv(np.ones((2, 1, 3, 3)), np.zeros(2)), ReLU(), MaxPool(2)])
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8))
    a = clearmaps.explain(net, x, backend="reference", method="input×gradient")
    b = clearmaps.explain(net, x, backend="reference", method="input_x_gradient")
    np.testing.assert_array_equal(a.responses, b.responses)
    with pytest.raises(ClearmapsError, match="method='lrp'; expected one of"):
        clearmaps.explain(net, x, method="lrp")
    with pytest.raises(ClearmapsError, match="rectify=False applies to method='deconvnet'"):
        clearmaps.explain(net, x, method="guided", rectify=False)
    chain = clearmaps.Network([Conv(np.ones((2, 1, 3, 3)), np.zeros(2)), ReLU(), Conv(np.ones((3, 2, 1, 1)),
                                                                                       np.zeros(3))])
    assert chain.is_chain
    trace = get_backend("cpu").forward(chain, x)  # the fused chain's trace keeps what the deconvnet needs only
    with pytest.raises(ClearmapsError, match="forward.net, x, method=.... for the method you ask"):
        get_backend("cpu").backproject(chain, trace, None, method="guided")


def test_the_methods_differ_where_they_should():
    """On a net with a ReLU, gradient and deconvnet differ; input×gradient is the gradient times x."""
    rng = np.random.default_rng(4)
    net = clearmaps.Network([Conv(rng.normal(size=(4, 1, 3, 3)), rng.normal(size=4), padding=1), ReLU(),
                             Conv(rng.normal(size=(4, 4, 3, 3)), rng.normal(size=4), padding=1), ReLU(),
                             Conv(rng.normal(size=(3, 4, 1, 1)), rng.normal(size=3))])
    x = rng.normal(size=(1, 1, 7, 7))
    trace = ref.forward(net, x)
    R = {m: ref.backproject(net, trace, None, method=m) for m in ref.METHODS}
    assert np.abs(R["gradient"] - R["deconvnet"]).max() > 1e-3
    assert np.abs(R["guided"] - R["deconvnet"]).max() > 1e-3
    np.testing.assert_allclose(R["input_x_gradient"], R["gradient"] * x[:, None], rtol=1e-12)
    assert (R["guided"][..., :, :] != 0).sum() <= (R["deconvnet"] != 0).sum()
