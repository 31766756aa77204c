"""The graph oracle (tests/graph_oracle.py) and the torchvision-style architectures (tests/archs.py) tested
on their own, before anything is compared with them (issue 16; docs/design.md, "Networks as graphs").

What is shown here: the architectures have torchvision's parameter counts, seeded non-trivial norms, and
head declarations whose class maps average to the model's own logits; the ReLU swap finds every way of
writing a ReLU, keeps the forward pass bit for bit, and follows each response method's rule (checked against
rules applied by hand); the oracle equals the sequential oracle (tests/oracle.py) on sequential networks and
plain autograd for the gradient method; known-wrong variants (a functional ReLU left unswapped, a head
declaration missing its ReLU) are caught.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

from clearmaps.reference import ClearmapsError, Conv, MaxPool

from . import archs
from .graph_oracle import class_map, graph_responses, relu_rules
from .oracle import torch_responses
from .strategies import clear_cases
from .tolerances import RTOL_F64, assert_close, rel_err

NAMES = sorted(archs.ARCHS)
N_CLASSES = 5


@pytest.fixture(scope="module")
def tiny_models():
    """Every tiny architecture, built once for the module (float32 as built; the oracle casts)."""
    return {name: archs.build(name, N_CLASSES, tiny=True) for name in NAMES}


def _plain_class_map(model: nn.Module, head, x: torch.Tensor) -> torch.Tensor:
    """z_L with no oracle code: a hook of our own, and the head's Linear called as a module on the
    channel-last features (not the oracle's einsum)."""
    kind = head[0]
    if kind == "logits":
        return model(x)[:, :, None, None]
    store = {}
    handle = model.get_submodule(head[2] if kind == "linear_at_positions" else head[1]).register_forward_hook(
        lambda mod, inp, out: store.setdefault("f", out.clone()))
    try:
        model(x)
    finally:
        handle.remove()
    f = store["f"]
    if kind == "feature_map":
        return f
    if len(head) == 4:
        f = torch.relu(f)
    return model.get_submodule(head[1])(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ExactHardsigmoid(nn.Module):
    """clamp(x + 3, 0, 6) / 6: autograd's slope is the float64 1/6 (torch's float64 hardsigmoid backward
    uses 1/6 rounded to float32)."""

    def forward(self, x):
        return (x + 3).clamp(0, 6) / 6


def _plain_energy_gradients(model, head, x, classes) -> np.ndarray:
    """∂E_c/∂x by ordinary autograd, nothing swapped (but nn.Hardsigmoid by an exact composition): (B, K, C,
    H, W). ``classes``: K ids or (B, K)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _ExactHardsigmoid())
    xt = x.detach().clone().to(torch.float64).requires_grad_(True)
    z = _plain_class_map(model, head, xt)
    ids = np.broadcast_to(np.asarray(classes), (xt.shape[0], np.asarray(classes).shape[-1]))
    grads = [torch.autograd.grad(sum(0.5 * (z[b, int(ids[b, k])] ** 2).sum() for b in range(xt.shape[0])), xt,
                                 retain_graph=True)[0] for k in range(ids.shape[1])]
    return torch.stack(grads, 1).numpy()


def _top(model, x, k: int = 2) -> np.ndarray:
    """Each image's k classes of largest logit, (B, k): their class maps are not all zero, which a fixed
    class of a ReLU-topped head (SqueezeNet) can be, and then a comparison would hold vacuously."""
    with torch.no_grad():
        logits = copy.deepcopy(model).to(torch.float64)(x.to(torch.float64))
    return torch.topk(logits, k, dim=1).indices.numpy()


def _assert_every_map_nonzero(r: np.ndarray, what: str) -> None:
    peak = np.abs(r).reshape(r.shape[0] * r.shape[1], -1).max(axis=1)
    assert (peak > 0).all(), f"{what}: some R(x|c) is all zeros, so the comparison would prove nothing"


class _DeconvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _DeconvReLU(nn.Module):
    def forward(self, x):
        return _DeconvFn.apply(x)


def _module_swap_responses(model, head, x, classes) -> np.ndarray:
    """The deconvnet by replacing nn.ReLU modules (Captum's way): right where every ReLU is a module, and
    the known-wrong variant where some are functional."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    for parent in list(m.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, _DeconvReLU())
    return _plain_energy_gradients(m, head, x, classes)


# ---------------------------------------------------------------------------------------------------------
# the architectures


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_torchvision(name):
    """At width = depth = 1 and 1000 classes each builder has torchvision's parameter count (the number in
    torchvision's weights metadata, written down in archs.PARAMS)."""
    assert archs.count_parameters(name) == archs.PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_norms_are_never_the_identity(name, tiny_models):
    """Batch norms have random affine parameters and running statistics that are neither 0/1 nor missing;
    ConvNeXt's layer scales are far from torchvision's 1e-6."""
    model = tiny_models[name]
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert not mod.training and mod.track_running_stats
            assert (mod.running_mean != 0).all() and (mod.running_var != 1).all()
            assert (mod.weight != 1).all() and (mod.bias != 0).all()
        if isinstance(mod, archs.CNBlock):
            assert (mod.layer_scale >= 0.2).all()
    assert not model.training


def test_builders_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = archs.build("resnet18", 4, tiny=True, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = archs.build("resnet18", 4, tiny=True, seed=1)
    c = archs.build("resnet18", 4, tiny=True, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


@pytest.mark.parametrize("name", NAMES)
def test_declared_class_map_averages_to_the_models_logits(name, tiny_models):
    """z_L where HEADS says it is: its mean over positions is the model's own float64 output, and spatial
    heads are spatial at the tiny size (so the check is not trivially about one position)."""
    model = tiny_models[name]
    x = archs.example_input(name, 2)
    z, _ = class_map(model, archs.HEADS[name], x)
    with torch.no_grad():
        want = copy.deepcopy(model).to(torch.float64)(x).numpy()
    assert z.shape[:2] == (2, N_CLASSES)
    if archs.HEADS[name][0] != "logits":
        assert z.shape[2] * z.shape[3] > 1, f"the tiny {name} has a 1x1 class map; give it a bigger input"
    assert_close(z.mean(axis=(2, 3)), want, 1e-12, f"{name}: mean of z_L vs logits")


def test_a_head_declaration_missing_its_relu_is_caught(tiny_models):
    """Negative control: DenseNet declared without the functional ReLU between its features and the pool."""
    x = archs.example_input("densenet121", 2)
    z, logits = class_map(tiny_models["densenet121"], ("linear_at_positions", "classifier", "features"), x)
    assert rel_err(z.mean(axis=(2, 3)), logits) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_the_swap_changes_no_forward_value(name, tiny_models):
    """Under relu_rules (guided, with the ReLU rule for ReLU6 too: every swap active) the model computes
    exactly what it computes without, and the swap saw at least one call per nn.ReLU module."""
    model = copy.deepcopy(tiny_models[name]).to(torch.float64)
    x = archs.example_input(name, 2)
    with torch.no_grad():
        want = model(x)
        with relu_rules("guided", relu_like="relu") as mode:
            got = model(x)
    assert torch.equal(got, want)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    if archs.RELUS[name] != "none":
        assert mode.seen["relu"] + mode.seen["relu_like"] >= max(relus, 1)


class _ReadsAfterInPlace(nn.Module):
    """Reads a tensor again after an in-place ReLU overwrote it: y + relu_(y) is 2·relu(y), not y + relu(y)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(y, inplace=True)
        return (y + z).mean((2, 3))


def test_in_place_relus_stay_in_place():
    """An in-place ReLU under the swap still overwrites its input, so code that reads the input again sees
    the same values, and the gradient method still equals autograd through the in-place op."""
    torch.manual_seed(5)
    model = _ReadsAfterInPlace().to(torch.float64)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        with relu_rules():
            got = model(x)
    assert torch.equal(got, want)
    xt = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(0.5 * (model(xt)[:, 1] ** 2).sum(), xt)
    tapped = graph_responses(model, ("logits",), x, [1], method="gradient")[:, 0]
    assert_close(tapped, plain.numpy(), RTOL_F64, "gradient through an in-place ReLU")


def test_every_functional_relu_of_googlenet_is_found(tiny_models):
    """GoogLeNet's ReLUs are all F.relu(x, inplace=True) inside BasicConv2d: one per BasicConv2d call."""
    model = copy.deepcopy(tiny_models["googlenet"]).to(torch.float64)
    units = sum(isinstance(m, archs.BasicConv2d) for m in model.modules())
    with torch.no_grad(), relu_rules() as mode:
        model(archs.example_input("googlenet", 1))
    assert mode.seen == {"relu": units, "relu_like": 0}


# ---------------------------------------------------------------------------------------------------------
# the oracle against independent computations


def _sequential(net) -> nn.Sequential:
    """The Network's layer list as an nn.Sequential in float64 (dilation, groups and ceil_mode passed on
    where the Network's layers have them)."""
    layers = []
    for layer in net.layers:
        if isinstance(layer, Conv):
            w = torch.tensor(np.asarray(layer.weight), dtype=torch.float64)
            conv = nn.Conv2d(w.shape[1] * getattr(layer, "groups", 1), w.shape[0], tuple(w.shape[2:]),
                             layer.stride, layer.padding, dilation=getattr(layer, "dilation", 1),
                             groups=getattr(layer, "groups", 1), dtype=torch.float64)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(torch.tensor(np.asarray(layer.bias), dtype=torch.float64))
            layers.append(conv)
        elif isinstance(layer, MaxPool):
            layers.append(nn.MaxPool2d(layer.kernel, layer.stride, layer.padding,
                                       dilation=getattr(layer, "dilation", 1),
                                       ceil_mode=getattr(layer, "ceil_mode", False)))
        else:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@settings(max_examples=25)
@given(clear_cases(max_classes=6))
def test_equals_the_sequential_oracle(case):
    """On a sequential network (Conv/ReLU/MaxPool list, head conv optionally + ReLU) the graph oracle
    equals tests/oracle.py, which runs the layer list itself."""
    model = _sequential(case.net)
    head = ("feature_map", str(len(model) - 1))
    classes = list(range(case.net.num_classes))
    got = graph_responses(model, head, case.x, classes)
    assert_close(got, torch_responses(case.net, case.x, classes), RTOL_F64, "R(x|c)")


class FormsBody(nn.Module):
    """conv → ReLU → max pool → conv → ReLU, the ReLUs written as ``form``."""

    FORMS = ("module", "module_inplace", "F.relu", "F.relu_inplace", "F.relu_", "torch.relu", "torch.relu_",
             "Tensor.relu", "Tensor.relu_")

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv1 = nn.Conv2d(2, 6, 3)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act1 = nn.ReLU(inplace=form == "module_inplace")
        self.act2 = nn.ReLU(inplace=form == "module_inplace")

    def _relu(self, x, module):
        return {
            "module": module, "module_inplace": module,
            "F.relu": F.relu, "F.relu_inplace": lambda t: F.relu(t, inplace=True), "F.relu_": F.relu_,
            "torch.relu": torch.relu, "torch.relu_": torch.relu_,
            "Tensor.relu": lambda t: t.relu(), "Tensor.relu_": lambda t: t.relu_(),
        }[self.form](x)

    def forward(self, x):
        x = self.pool(self._relu(self.conv1(x), self.act1))
        return self._relu(self.conv2(x), self.act2)


class FormsNet(nn.Module):
    """FormsBody → mean over positions → Linear."""

    def __init__(self, form: str):
        super().__init__()
        self.body = FormsBody(form)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


FORMS_HEAD = ("linear_at_positions", "fc", "body")


def _forms_pair(form: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FormsNet(form)
    twin = FormsNet("module")
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 11, 12, dtype=torch.float64)
    return model, twin, x


@pytest.mark.parametrize("form", FormsBody.FORMS)
def test_the_swap_catches_every_way_of_writing_a_relu(form):
    """The oracle on a net whose ReLUs are written as ``form`` equals module replacement on its twin written
    with nn.ReLU modules, and differs from the plain gradient (so the swap did something)."""
    model, twin, x = _forms_pair(form)
    classes = [0, 1, 2, 3]
    got = graph_responses(model, FORMS_HEAD, x, classes)
    assert_close(got, _module_swap_responses(twin, FORMS_HEAD, x, classes), RTOL_F64, f"{form}")
    assert rel_err(got, graph_responses(model, FORMS_HEAD, x, classes, method="gradient")) > 1e-2


def test_negative_control_a_functional_relu_left_unswapped_is_caught():
    """Module replacement (Captum's way) agrees on nn.ReLU modules and misses F.relu: a variant that forgets
    the functional ReLUs must differ from the oracle."""
    classes = [0, 1, 2, 3]
    model, twin, x = _forms_pair("F.relu")
    assert rel_err(_module_swap_responses(model, FORMS_HEAD, x, classes),
                   graph_responses(model, FORMS_HEAD, x, classes)) > 1e-2
    assert_close(_module_swap_responses(twin, FORMS_HEAD, x, classes),
                 graph_responses(twin, FORMS_HEAD, x, classes), RTOL_F64, "module ReLUs")


@pytest.mark.parametrize("name", ["googlenet", "densenet121"])
def test_negative_control_on_architectures_with_functional_relus(name, tiny_models):
    x = archs.example_input(name, 1)
    head = archs.HEADS[name]
    ids = _top(tiny_models[name], x)
    assert rel_err(_module_swap_responses(tiny_models[name], head, x, ids),
                   graph_responses(tiny_models[name], head, x, ids)) > 1e-3


@pytest.mark.parametrize("name", [n for n in NAMES if archs.RELUS[n] == "module"])
def test_equals_module_replacement_where_every_relu_is_a_module(name, tiny_models):
    x = archs.example_input(name, 2)
    head = archs.HEADS[name]
    ids = _top(tiny_models[name], x)
    want = _module_swap_responses(tiny_models[name], head, x, ids)
    _assert_every_map_nonzero(want, name)
    assert_close(graph_responses(tiny_models[name], head, x, ids), want, RTOL_F64, name)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_method_equals_plain_autograd(name, tiny_models):
    """method="gradient" (every ReLU swapped for one with autograd's own rule) is ordinary autograd on E_c,
    and input_x_gradient is that times the input."""
    x = archs.example_input(name, 2)
    head = archs.HEADS[name]
    ids = _top(tiny_models[name], x)
    want = _plain_energy_gradients(copy.deepcopy(tiny_models[name]).to(torch.float64), head, x, ids)
    _assert_every_map_nonzero(want, name)
    assert_close(graph_responses(tiny_models[name], head, x, ids, method="gradient"), want, RTOL_F64, name)
    assert_close(graph_responses(tiny_models[name], head, x, ids, method="input_x_gradient"),
                 want * x.numpy()[:, None], RTOL_F64, name)


class _OneReLU(nn.Module):
    """x → conv1 → act → conv2 → mean: one activation, so each rule can be applied by hand."""

    def __init__(self, act):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(5, 3, 3)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x))).mean((2, 3))


def _by_hand(model, x, c, rule, mask=lambda pre: pre > 0):
    """conv1ᵀ(rule(g, mask(pre))), g = ∂E_c/∂(activation output) by autograd, conv1ᵀ by autograd."""
    xt = x.clone().requires_grad_(True)
    pre = model.conv1(xt)
    positive = mask(pre.detach())
    post = model.act(pre.detach().clone()).requires_grad_(True)
    z = model.conv2(post)
    (g,) = torch.autograd.grad(0.5 * (z[:, c] ** 2).sum(), post)
    (r,) = torch.autograd.grad(pre, xt, rule(g, positive))
    return r.numpy()


RULES_BY_HAND = {
    ("deconvnet", True): lambda g, p: torch.where(g > 0, g, 0.0),
    ("deconvnet", False): lambda g, p: g,
    ("guided", True): lambda g, p: torch.where((g > 0) & p, g, 0.0),
    ("guided", False): lambda g, p: torch.where(p, g, 0.0),
    ("gradient", True): lambda g, p: torch.where(p, g, 0.0),
}


@pytest.mark.parametrize("method,rectify", list(RULES_BY_HAND))
def test_each_methods_relu_rule_by_hand(method, rectify):
    torch.manual_seed(3)
    model = _OneReLU(nn.ReLU()).to(torch.float64)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    head = ("feature_map", "conv2")
    got = graph_responses(model, head, x, [0, 2], method=method, rectify=rectify)
    want = np.stack([_by_hand(model, x, c, RULES_BY_HAND[method, rectify]) for c in (0, 2)], 1)
    assert_close(got, want, RTOL_F64, f"{method}, rectify={rectify}")
    if (method, rectify) != ("deconvnet", False):  # that one is the identity rule
        assert rel_err(got, np.stack([_by_hand(model, x, c, lambda g, p: g) for c in (0, 2)], 1)) > 1e-2


def test_hardsigmoid_has_the_float64_slope():
    """The oracle's hardsigmoid backward is g/6 in float64 inside (-3, 3), zero outside."""
    torch.manual_seed(6)
    model = _OneReLU(nn.Hardsigmoid()).to(torch.float64)
    x = 3 * torch.randn(2, 2, 9, 8, dtype=torch.float64)
    want = np.stack([_by_hand(model, x, c, lambda g, p: torch.where(p, g / 6, 0.0),
                              lambda pre: (pre > -3) & (pre < 3)) for c in (0, 1)], 1)
    for method in ("gradient", "deconvnet"):  # no ReLU: every method is the gradient here
        assert_close(graph_responses(model, ("feature_map", "conv2"), x, [0, 1], method=method), want, 1e-14)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.ReLU6(inplace=True), nn.LeakyReLU(0.1), nn.Hardtanh(0.0, 0.4)],
                         ids=["ReLU6", "ReLU6_inplace", "LeakyReLU", "Hardtanh"])
def test_relu_like_activations_follow_the_chosen_rule(act):
    """relu_like="relu": the deconvnet rectifies at ReLU6 / LeakyReLU / Hardtanh; "derivative": their
    ordinary derivative, so the deconvnet is the plain gradient on a net with no other activation."""
    torch.manual_seed(4)
    model = _OneReLU(act).to(torch.float64)
    x = 2 * torch.randn(2, 2, 9, 8, dtype=torch.float64)
    head = ("feature_map", "conv2")
    rectified = np.stack([_by_hand(model, x, c, lambda g, p: torch.where(g > 0, g, 0.0)) for c in (0, 1)], 1)
    assert_close(graph_responses(model, head, x, [0, 1], relu_like="relu"), rectified, RTOL_F64, "relu rule")
    plain = _plain_energy_gradients(model, head, x, [0, 1])
    assert_close(graph_responses(model, head, x, [0, 1]), plain, RTOL_F64, "derivative")
    assert rel_err(plain, rectified) > 1e-2


def test_mobilenet_v2_relu6_under_both_rules(tiny_models):
    """MobileNetV2 has only ReLU6: with their derivative the deconvnet is the gradient, with the ReLU rule
    it is not."""
    model, head, x = tiny_models["mobilenet_v2"], archs.HEADS["mobilenet_v2"], archs.example_input(
        "mobilenet_v2", 1)
    ids = _top(model, x)
    grad = graph_responses(model, head, x, ids, method="gradient")
    _assert_every_map_nonzero(grad, "mobilenet_v2")
    assert_close(graph_responses(model, head, x, ids), grad, RTOL_F64, "derivative rule")
    assert rel_err(graph_responses(model, head, x, ids, relu_like="relu"), grad) > 1e-3


def test_per_image_classes(tiny_models):
    """(B, K) class ids give each image its own classes: the same as explaining the images one at a time."""
    model, head = tiny_models["resnet18"], archs.HEADS["resnet18"]
    x = archs.example_input("resnet18", 2)
    got = graph_responses(model, head, x, [[0, 3], [4, 1]])
    assert_close(got[0], graph_responses(model, head, x[:1], [0, 3])[0], RTOL_F64, "image 0")
    assert_close(got[1], graph_responses(model, head, x[1:], [4, 1])[0], RTOL_F64, "image 1")


@pytest.mark.skipif(importlib.util.find_spec("captum") is None, reason="Captum is not installed (bench extra)")
@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_agrees_with_captum_where_captum_sees_every_relu(name, tiny_models):
    """Captum's Deconvolution / GuidedBackprop on E_c equal the oracle on ResNet-18 (nn.ReLU modules) and
    differ on GoogLeNet (F.relu only), as Captum documents."""
    from captum.attr import Deconvolution, GuidedBackprop

    model = copy.deepcopy(tiny_models[name]).to(torch.float64)
    head = archs.HEADS[name]

    class Energy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return 0.5 * (_plain_class_map(self.model, head, x) ** 2).sum((2, 3))

    x = archs.example_input(name, 2)
    for method, attribution in (("deconvnet", Deconvolution), ("guided", GuidedBackprop)):
        theirs = np.stack([attribution(Energy()).attribute(x.clone(), target=c).detach().numpy()
                           for c in (0, 3)], 1)
        ours = graph_responses(model, head, x, [0, 3], method=method)
        _assert_every_map_nonzero(ours, f"{name} {method}")
        if name == "googlenet":
            assert rel_err(theirs, ours) > 1e-3
        else:
            assert_close(theirs, ours, RTOL_F64, f"Captum {method}")


# ---------------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("kwargs,match", [
    ({"head": ("pool",)}, "head="),
    ({"head": ("feature_map",)}, "wrong arguments"),
    ({"head": ("linear_at_positions", "fc", "body", "gelu")}, "wrong arguments"),
    ({"head": ("feature_map", "nope")}, "not a submodule"),
    ({"head": ("linear_at_positions", "body.conv1", "body")}, "expected nn.Linear"),
    ({"method": "smoothgrad"}, "method="),
    ({"method": "gradient", "rectify": False}, "no rectification"),
    ({"relu_like": "sometimes"}, "relu_like="),
    ({"classes": [9]}, "classes contains"),
    ({"classes": [0.5]}, "class ids"),
    ({"classes": [[0], [1], [2]]}, "rows for a batch"),
    ({"x": torch.zeros(2, 11, 12)}, "expected a non-empty float batch"),
    ({"x": torch.full((1, 2, 11, 12), float("nan"))}, "NaN"),
])
def test_bad_arguments_are_refused(kwargs, match):
    model, _, x = _forms_pair("F.relu")
    args = {"model": model, "head": FORMS_HEAD, "x": x, "classes": [0, 1]}
    args.update(kwargs)
    with pytest.raises(ClearmapsError, match=match):
        graph_responses(**args)


def test_bad_builder_arguments_are_refused():
    with pytest.raises(ClearmapsError, match="unknown architecture"):
        archs.build("resnet1000")
    with pytest.raises(ClearmapsError, match="num_classes"):
        archs.resnet18(0)
    with pytest.raises(ClearmapsError, match="width"):
        archs.resnet18(10, width=0)
