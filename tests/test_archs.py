"""The CNNs people train (issue 16): all 15 torchvision classifiers of tests/archs.py, written without
torchvision, converted by from_torch and explained on every host backend, against the independent graph
oracle of tests/graph_oracle.py (torch autograd with every module or functional ReLU's backward swapped for
the method's rule, z_L taken where each architecture's declared head says — not where from_torch's analysis
finds it).

Tiny versions (a few channels, 32–64 px) so that all 15 run in float64 in seconds. A conversion is done once
per architecture (a module-scoped cache: torch.export takes 1–8 s each)."""

from __future__ import annotations

import numpy as np
import pytest

import clearmaps
from clearmaps import get_backend
from clearmaps import reference as ref

from . import archs
from .graph_oracle import graph_responses
from .tolerances import RTOL_F32, RTOL_F64, assert_close, assert_equal, decisive

NUM_CLASSES = 6
# how from_torch must find each class map (issue 16, "The class map z_L, for any head")
EXPECTED_Z = {"logits": (NUM_CLASSES, 1, 1)}


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(name):
        if name not in cache:
            model = archs.build(name, NUM_CLASSES, tiny=True, dtype=archs.torch.float64)
            x = archs.example_input(name, 2)
            cache[name] = (model, clearmaps.from_torch(model, input_shape=tuple(x.shape[1:])), x.numpy())
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
def test_every_architecture_converts_and_equals_the_oracle(name, converted):
    """Logits equal the module's; R(x|c) of the reference equals the oracle's to 1e-10 (deconvnet, the
    top-3 classes of each image); z_L is where the architecture's head says."""
    model, net, x = converted(name)
    trace = ref.forward(net, x)
    with archs.torch.no_grad():
        want_logits = model(archs.torch.from_numpy(x)).numpy()
    assert_close(trace.logits, want_logits, RTOL_F64, "logits")
    head = archs.HEADS[name]
    if head[0] == "logits":
        assert trace.z.shape[1:] == (NUM_CLASSES, 1, 1), f"z_L {trace.z.shape}: the MLP's logits expected"
    else:
        assert trace.z.shape[2:] != (1, 1) or x.shape[2] < 40, f"z_L {trace.z.shape}: a class map expected"
    classes = np.argsort(-trace.logits, axis=1, kind="stable")[:, :3]
    R = ref.backproject(net, trace, classes)
    assert_close(R, graph_responses(model, head, x, classes), RTOL_F64, f"{name}: R(x|c)")


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
def test_every_architecture_on_the_fast_host_backends(name, converted):
    """The CPU backend (float32) against the float64 reference on the same trace: R(x|c) ≤ 1e-5, dominant
    class equal on decisive pixels; and its own forward pass's logits."""
    _, net, x = converted(name)
    trace = ref.forward(net, x)
    impl = get_backend("cpu")
    assert_close(impl.forward(net, x).logits, trace.logits, RTOL_F32, "logits")
    want = ref.clear_from_trace(net, trace, None)
    got = impl.clear_from_trace(net, trace, np.broadcast_to(np.arange(NUM_CLASSES), (x.shape[0], NUM_CLASSES)))
    assert_close(got.responses, want.responses, RTOL_F32, f"{name}: responses")
    mask = decisive(want.responses)
    assert_equal(np.asarray(got.dominant_index)[mask], want.dominant_index[mask], "dominant class (decisive)")


def test_relu_like_option_gives_relu6_the_relu_rule(converted):
    """MobileNetV2 is all ReLU6: with the ReLU rule there (what from_torch(..., relu_like="relu") sets, shown
    on a small module below) the deconvnet rectifies at ReLU6 too, as the oracle's relu_like='relu' does;
    the default keeps their derivative."""
    model, net, x = converted("mobilenet_v2")
    ruled = clearmaps.Network([clearmaps.Activation(layer.kind, layer.params, relu_rule=layer.kind == "hardtanh")
                               if isinstance(layer, clearmaps.Activation) else layer for layer in net.layers],
                              net.class_names, net.input_shape, net.inputs, net.names)
    classes = np.zeros((x.shape[0], 1), dtype=np.int64)
    got = ref.backproject(ruled, ref.forward(ruled, x), classes)
    assert_close(got, graph_responses(model, archs.HEADS["mobilenet_v2"], x, classes, relu_like="relu"),
                 RTOL_F64, "R with the ReLU rule at ReLU6")
    default = ref.backproject(net, ref.forward(net, x), classes)
    assert np.abs(got - default).max() > 1e-6 * np.abs(default).max(), "the ReLU rule changed nothing"
    small = archs.torch.nn.Sequential(archs.torch.nn.Conv2d(1, 2, 3), archs.torch.nn.ReLU6(),
                                      archs.torch.nn.LeakyReLU(0.1), archs.torch.nn.Conv2d(2, 3, 1))
    kinds = [(type(layer).__name__, getattr(layer, "relu_rule", None))
             for layer in clearmaps.from_torch(small, relu_like="relu").layers]
    assert kinds == [("Conv", None), ("Activation", True), ("Activation", True), ("Conv", None)]
    assert all(not getattr(layer, "relu_rule", False) for layer in clearmaps.from_torch(small).layers)
