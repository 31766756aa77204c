"""torch modules and checkpoint files → Network: conversions, round trips, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import clearmaps
from clearmaps import ClearmapsError
from clearmaps import reference as ref

from .oracle import torch_responses
from .tolerances import assert_close

torch.manual_seed(0)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial running statistics, so folding is really exercised
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def small_sequential(head="linear"):
    body = [nn.Conv2d(1, 4, 3, padding=1), _bn(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Dropout(0.3),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.ReLU()]
    if head == "linear":
        tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(), nn.Linear(6, 5)]
    elif head == "conv":
        tail = [nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
    else:
        tail = [nn.Conv2d(6, 5, 1)]
    return nn.Sequential(*body, *tail).eval()


@pytest.mark.parametrize("head", ["linear", "conv", "bare"])
def test_from_torch_matches_module_and_oracle(head):
    """Folded BatchNorm, dropped Dropout and a GAP→Linear head give the module's logits, and CLEAR's R equals
    the oracle run on the converted network."""
    module = small_sequential(head)
    net = clearmaps.from_torch(module, input_shape=(1, 13, 11))
    x = np.random.default_rng(0).normal(size=(2, 1, 13, 11))
    with torch.no_grad():
        out = module(torch.tensor(x, dtype=torch.float32)).double()
    want = out.mean(dim=(2, 3)) if out.ndim == 4 else out
    trace = ref.forward(net, x)
    assert_close(trace.logits, want.numpy(), 1e-5, "logits vs torch module")
    assert net.head_relu == (head == "conv")
    assert_close(ref.backproject(net, trace), torch_responses(net, x, range(5)), 1e-10, "R vs oracle")


def test_from_torch_flattens_nested_modules_in_registration_order():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding="same")
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Sequential(nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LogSoftmax(1))

        def forward(self, x):
            return self.head(self.block(x))

    net = clearmaps.from_torch(Net(), class_names=["a", "b", "c"])
    assert [type(layer).__name__ for layer in net.layers] == ["Conv", "ReLU", "Conv"]
    assert net.layers[0].padding == (1, 1)
    assert net.class_names == ("a", "b", "c")


def test_from_torch_captures_a_forward_that_is_not_sequential():
    """A skip connection written in forward: the capture has the Add, and z_L is the head conv's map."""
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 1, 3, padding=1)
            self.b = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.b(self.a(x) + x).mean(dim=(2, 3))  # a skip connection

    module = Skip()
    net = clearmaps.from_torch(module)
    assert [type(layer).__name__ for layer in net.layers] == ["Conv", "Add", "Conv"]
    assert net.inputs == ((-1,), (0, -1), (1,)) and net.input_shape == (1, None, None)
    x = np.random.default_rng(0).normal(size=(2, 1, 7, 9))
    with torch.no_grad():
        want = module.double()(torch.tensor(x)).numpy()
    assert_close(ref.forward(net, x).logits, want, 1e-10, "logits at a size the capture never saw")


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        y = self.c(x).mean(dim=(2, 3))
        return y, y


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no graph can say this
            return self.c(x).mean(dim=(2, 3))
        return -self.c(x).mean(dim=(2, 3))


class _BatchMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        y = self.c(x)
        return (y - y.mean(dim=0, keepdim=True)).mean(dim=(2, 3))  # mixes the images of a batch


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Conv2d(2, 3, 1)), r"'softplus' \(as '\w+'\) in module '1' is not supported"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 3, 3)), "transposed convolution"),
    (_Tuple(), "returns 2 values"),
    (_Branchy(), "torch.export could not capture"),
    (_BatchMean(), "batch"),
    (nn.Sequential(nn.ReLU()), "no Conv2d"),
    ("not a module", "expects a torch.nn.Module"),
])
def test_from_torch_refuses_unsupported_layers_by_name(module, message):
    with pytest.raises(ClearmapsError, match=message):
        clearmaps.from_torch(module)


@pytest.mark.parametrize("module, kinds", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 3, 1)), ["Conv", "Activation", "Conv"]),
    # an MLP on flattened features: z_L is the logits themselves (no linear head to move before a pool)
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3)),
     ["Conv", "ReLU", "Reshape", "Linear", "Reshape"]),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1)),
     ["Conv", "ReLU", "Affine", "Conv"]),
    (nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Conv2d(2, 3, 1)), ["Conv", "Conv"]),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 3, 1)), ["Conv", "Conv"]),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(2, 3, 1)),
     ["Conv", "MaxPool", "Conv"]),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Conv2d(2, 3, 1)),
     ["Conv", "AdaptiveAvgPool", "Conv"]),
    # a ReLU after the Linear head: the head is no longer affine, so z_L is the logits
    (nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2), nn.ReLU()),
     ["Conv", "Reduce", "Reshape", "Linear", "ReLU", "Reshape"]),
])
def test_from_torch_takes_what_the_paper_did_not(module, kinds):
    """Layers the chain refused are graph nodes now; each conversion equals the module (from_torch checks it
    on a probe batch; checked here again at float64 on other images)."""
    shape = (module[0].in_channels, 28, 28)
    net = clearmaps.from_torch(module, input_shape=shape)
    assert [type(layer).__name__ for layer in net.layers] == kinds
    x = np.random.default_rng(3).normal(size=(2, *shape))
    with torch.no_grad():
        want = module.double().eval()(torch.tensor(x)).numpy()
    want = want.mean(axis=(2, 3)) if want.ndim == 4 else want
    assert_close(ref.forward(net, x).logits, want, 1e-10, "logits")


def _random_allcnn():
    torch.manual_seed(1)
    return clearmaps.build_module("allcnn-mnist").eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_gives_the_same_maps(tmp_path, suffix):
    module = _random_allcnn()
    path = clearmaps.save_checkpoint(tmp_path / f"m{suffix}", module, class_names=list("abcdefghij"))
    loaded = clearmaps.load_checkpoint(path)  # the arch travels in the file
    direct = clearmaps.from_torch(module, class_names=list("abcdefghij"), input_shape=(1, 28, 28))
    x = np.random.default_rng(0).uniform(size=(1, 1, 28, 28))
    a, b = clearmaps.explain(loaded, x, classes=[0, 3]), clearmaps.explain(direct, x, classes=["a", "d"])
    assert loaded.class_names == tuple("abcdefghij")
    np.testing.assert_array_equal(a.responses, b.responses)
    np.testing.assert_array_equal(a.rgb, b.rgb)


def test_plain_state_dict_with_preset_or_json_arch(tmp_path):
    module = _random_allcnn()
    torch.save(module.state_dict(), tmp_path / "plain.pth")
    net = clearmaps.load_checkpoint(tmp_path / "plain.pth", arch="allcnn-mnist")
    spec = tmp_path / "arch.json"
    spec.write_text(json.dumps(clearmaps.PRESETS["allcnn-mnist"]))
    net2 = clearmaps.load_checkpoint(tmp_path / "plain.pth", arch=str(spec))
    x = np.random.default_rng(1).uniform(size=(1, 1, 28, 28))
    with torch.no_grad():
        want = module(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert_close(ref.forward(net, x).logits, want, 1e-5, "logits")
    assert_close(ref.forward(net2, x).logits, want, 1e-5, "logits (JSON arch)")


def test_sequential_state_dict_with_a_json_layer_list(tmp_path):
    """A user's own nn.Sequential saved as a state dict loads with a JSON layer list naming its keys."""
    module = small_sequential("linear")
    torch.save(module.state_dict(), tmp_path / "seq.pt")
    layers = [{"type": "conv", "name": "0", "in": 1, "out": 4, "kernel": 3, "padding": 1},
              {"type": "batchnorm", "name": "1", "channels": 4}, {"type": "relu"},
              {"type": "maxpool", "kernel": 3, "stride": 2, "padding": 1}, {"type": "dropout"},
              {"type": "conv", "name": "5", "in": 4, "out": 6, "kernel": 3, "stride": 2, "padding": 1,
               "bias": False},
              {"type": "relu"}, {"type": "gap"}, {"type": "flatten"}, {"type": "dropout"},
              {"type": "linear", "name": "10", "in": 6, "out": 5}]
    net = clearmaps.load_checkpoint(tmp_path / "seq.pt", arch=json.dumps(layers))
    x = np.random.default_rng(2).normal(size=(1, 1, 9, 9))
    with torch.no_grad():
        want = module(torch.tensor(x, dtype=torch.float32)).double().numpy()
    assert_close(ref.forward(net, x).logits, want, 1e-5, "logits")


def test_vgg16_fcn_preset_uses_torchvision_feature_keys():
    sd = clearmaps.build_module("vgg16-fcn").state_dict()
    convs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("features.")})
    # torchvision's vgg16().features: 13 convs, each followed by a ReLU, max pools at 4, 9, 16, 23, 30
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)
    assert sd["head.2.weight"].shape[0] == 10
    net = clearmaps.from_torch(clearmaps.build_module("vgg16-fcn"), input_shape=(3, 64, 64))
    assert sum(isinstance(layer, clearmaps.MaxPool) for layer in net.layers) == 5


class _Boom:
    """Unpickling this would create a file: the payload of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"features.0.weight": _Boom(str(marker))}, f)
    with pytest.raises(ClearmapsError, match="weights_only=True"):
        clearmaps.load_checkpoint(path, arch="allcnn-mnist")
    assert not marker.exists()
    # negative control: the payload is live, an unsafe load really runs it (it only creates an empty file)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_checkpoint_is_refused(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x00\x01 not a checkpoint at all" * 10)
    with pytest.raises(ClearmapsError, match="bad"):
        clearmaps.load_checkpoint(path, arch="allcnn-mnist")


def test_missing_file_and_unknown_arch(tmp_path):
    with pytest.raises(ClearmapsError, match="does not exist"):
        clearmaps.load_checkpoint(tmp_path / "nope.pt", arch="allcnn-mnist")
    torch.save(_random_allcnn().state_dict(), tmp_path / "m.pt")
    with pytest.raises(ClearmapsError, match="neither a preset"):
        clearmaps.load_checkpoint(tmp_path / "m.pt", arch="resnet50")
    with pytest.raises(ClearmapsError, match="does not say its architecture"):
        clearmaps.load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(ClearmapsError, match="unknown extension"):
        (tmp_path / "m.txt").write_text("x")
        clearmaps.load_checkpoint(tmp_path / "m.txt", arch="allcnn-mnist")


def test_mismatched_keys_are_listed(tmp_path):
    sd = _random_allcnn().state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(3)
    sd["features.0.weight"] = torch.zeros(8, 1, 3, 3)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ClearmapsError) as info:
        clearmaps.load_checkpoint(tmp_path / "m.pt", arch="allcnn-mnist")
    msg = str(info.value)
    assert "missing keys ['head.bias']" in msg and "unexpected keys ['extra.weight']" in msg
    assert "features.0.weight: file (8, 1, 3, 3), expected (32, 1, 3, 3)" in msg


def test_nan_weights_are_refused(tmp_path):
    sd = _random_allcnn().state_dict()
    sd["features.2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ClearmapsError, match="'features.2.weight' contains NaN"):
        clearmaps.load_checkpoint(tmp_path / "m.pt", arch="allcnn-mnist")
    with pytest.raises(ClearmapsError, match="NaN"):
        clearmaps.Conv(np.full((1, 1, 1, 1), np.inf), np.zeros(1))


def test_non_state_dict_pickles_are_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ClearmapsError, match="does not hold a state dict"):
        clearmaps.load_checkpoint(tmp_path / "list.pt", arch="allcnn-mnist")


def test_bad_arch_specs():
    with pytest.raises(ClearmapsError, match="needs a 'type'"):
        clearmaps.read_arch([{"kind": "conv"}])
    with pytest.raises(ClearmapsError, match="lacks"):
        clearmaps.read_arch([{"type": "conv", "name": "c", "in": 1}])
    with pytest.raises(ClearmapsError, match="needs a 'name'"):
        clearmaps.read_arch([{"type": "conv", "in": 1, "out": 2, "kernel": 3}])
    with pytest.raises(ClearmapsError, match="not valid JSON"):
        clearmaps.read_arch("{not json")



@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_spec_without_class_names_round_trips(tmp_path, suffix):
    layers = [{"type": "conv", "name": "c", "in": 1, "out": 3, "kernel": 3}]
    path = clearmaps.save_checkpoint(tmp_path / f"m{suffix}", clearmaps.build_module(layers))
    assert clearmaps.load_checkpoint(path).class_names == ("0", "1", "2")


def test_read_arch_returns_a_checked_copy_of_plain_values():
    spec = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv", "name": "features.0", "in": 1, "out": 2, "kernel": [3, 1], "padding": [1, 0]},
        {"type": "maxpool", "kernel": 2, "stride": None}, {"type": "conv", "name": "head", "in": 2, "out": 3,
                                                            "kernel": np.int64(1)}]}
    got = clearmaps.read_arch(spec)
    assert got == {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv", "name": "features.0", "in": 1, "out": 2, "kernel": [3, 1], "padding": [1, 0]},
        {"type": "maxpool", "kernel": 2}, {"type": "conv", "name": "head", "in": 2, "out": 3, "kernel": 1}]}
    assert type(got["layers"][2]["kernel"]) is int and got is not spec
    assert json.loads(json.dumps(got)) == got  # what save_checkpoint stores


def test_a_checkpoint_is_compared_with_its_spec_before_any_weight_is_allocated(tmp_path, monkeypatch):
    """A spec of 150 million parameters (600 MB) with a file of a few tensors is refused for its keys
    without the spec's weights ever being made: the module is laid out on torch's meta device."""
    big = [{"type": "conv", "name": "c", "in": 4096, "out": 4096, "kernel": 3}]
    torch.save({"c.weight": torch.zeros(1, 1, 3, 3), "c.bias": torch.zeros(1)}, tmp_path / "small.pt")
    devices = []
    original = nn.Conv2d.reset_parameters

    def spy(self):
        devices.append(self.weight.device.type)
        return original(self)

    monkeypatch.setattr(nn.Conv2d, "reset_parameters", spy)
    with pytest.raises(ClearmapsError, match=r"wrong shapes \[c.bias: file \(1,\), expected \(4096,\)"):
        clearmaps.load_checkpoint(tmp_path / "small.pt", arch=big)
    assert devices == ["meta"]
    devices.clear()
    clearmaps.build_module([{"type": "conv", "name": "c", "in": 1, "out": 2, "kernel": 3}])
    assert devices == ["cpu"]  # the spy sees real allocations: build_module makes real weights
