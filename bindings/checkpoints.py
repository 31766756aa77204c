"""Checkpoints → Network: architecture specs (presets or JSON), safe state-dict reading, key checks.

An architecture spec is a JSON object (or just its "layers" list)::

    {"input_shape": [1, 28, 28], "class_names": ["0", ...],
     "layers": [{"type": "conv", "name": "features.0", "in": 1, "out": 32, "kernel": 3, "padding": 1},
                {"type": "relu"}, {"type": "maxpool", "kernel": 2}, ...,
                {"type": "gap"}, {"type": "linear", "name": "fc", "in": 128, "out": 10}]}

Layer types: conv (in, out, kernel, stride=1, padding=0, bias=true), batchnorm (channels), relu,
maxpool (kernel, stride=kernel, padding=0), dropout, gap, flatten, linear (in, out, bias=true).
``name`` is the layer's key prefix in the state dict; it is required for layers with parameters.

Pickled checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that holds
anything but tensors and plain containers is refused and nothing in it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .reference import Affine, ClearmapsError, Conv, MaxPool, Network, ReLU

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_fcn_layers(num_classes: int = 10, hidden: int = 1024) -> list:
    layers, channels, i = [], 3, 0
    for v in _VGG16:  # torchvision's vgg16().features, with its indices as key names
        if v == "M":
            layers.append({"type": "maxpool", "kernel": 2, "stride": 2, "name": f"features.{i}"})
            i += 1
        else:
            layers.append({"type": "conv", "name": f"features.{i}", "in": channels, "out": v, "kernel": 3,
                           "padding": 1})
            layers.append({"type": "relu", "name": f"features.{i + 1}"})
            channels, i = v, i + 2
    # the paper's VGG head: the fully connected layers replaced by two conv layers, the last with one kernel
    # per class and linear into the softmax
    layers += [{"type": "conv", "name": "head.0", "in": 512, "out": hidden, "kernel": 3, "padding": 1},
               {"type": "relu", "name": "head.1"},
               {"type": "conv", "name": "head.2", "in": hidden, "out": num_classes, "kernel": 1},
               {"type": "gap", "name": "pool"}]
    return layers


def _allcnn_mnist_layers() -> list:
    spec = [("conv", 1, 32), ("conv", 32, 32), ("pool",), ("conv", 32, 64), ("conv", 64, 64), ("pool",),
            ("conv", 64, 128)]
    layers, i = [], 0
    for s in spec:
        if s[0] == "pool":
            layers.append({"type": "maxpool", "kernel": 2, "stride": 2, "name": f"features.{i}"})
            i += 1
        else:
            layers.append({"type": "conv", "name": f"features.{i}", "in": s[1], "out": s[2], "kernel": 3,
                           "padding": 1})
            layers.append({"type": "relu", "name": f"features.{i + 1}"})
            i += 2
    # ALL-CNN-C's 1x1 class conv with its ReLU, then global average pooling into the softmax. The ReLU keeps
    # z_L >= 0: a class the network rules out has z_L = 0 there and back-projects nothing, instead of a
    # strongly negative map that rectification would turn into a strong response
    layers += [{"type": "conv", "name": "head", "in": 128, "out": 10, "kernel": 1},
               {"type": "relu", "name": "head_relu"},
               {"type": "gap", "name": "pool"}]
    return layers


PRESETS = {
    "allcnn-mnist": {"input_shape": [1, 28, 28], "class_names": [str(i) for i in range(10)],
                     "layers": _allcnn_mnist_layers()},
    "vgg16-fcn": {"input_shape": [3, None, None], "class_names": [str(i) for i in range(10)],
                  "layers": _vgg16_fcn_layers()},
}

_FIELDS = {
    "conv": ({"in", "out", "kernel"}, {"stride", "padding", "bias", "name"}),
    "batchnorm": ({"channels"}, {"name", "eps"}),
    "relu": (set(), {"name"}),
    "maxpool": ({"kernel"}, {"stride", "padding", "name"}),
    "dropout": (set(), {"name", "p"}),
    "gap": (set(), {"name"}),
    "flatten": (set(), {"name"}),
    "linear": ({"in", "out"}, {"bias", "name"}),
}


def read_arch(arch) -> dict:
    """An architecture spec from a preset name, a path to a JSON file, a JSON string, a dict or a list."""
    if isinstance(arch, str) and arch in PRESETS:
        return json.loads(json.dumps(PRESETS[arch]))
    if isinstance(arch, (str, os.PathLike)):
        text = str(arch)
        if text.lstrip().startswith(("{", "[")):
            source = "the JSON given"
        else:
            path = Path(text)
            if not path.is_file():
                raise ClearmapsError(f"arch {text!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file.")
            text, source = path.read_text(), str(path)
        try:
            arch = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClearmapsError(f"{source} is not valid JSON ({exc}).") from None
    if isinstance(arch, list):
        arch = {"layers": arch}
    if not isinstance(arch, dict) or not isinstance(arch.get("layers"), list) or not arch["layers"]:
        raise ClearmapsError("an architecture spec is a JSON object with a non-empty 'layers' list (or that list).")
    for i, layer in enumerate(arch["layers"]):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if kind not in _FIELDS:
            raise ClearmapsError(f"arch layer {i} is {layer!r}; each layer needs a 'type' among {sorted(_FIELDS)}.")
        need, may = _FIELDS[kind]
        missing, extra = need - layer.keys(), layer.keys() - need - may - {"type"}
        if missing or extra:
            raise ClearmapsError(f"arch layer {i} ({kind}) " + (f"lacks {sorted(missing)}" if missing else "")
                                 + (" and " if missing and extra else "") + (f"has unknown fields {sorted(extra)}"
                                                                             if extra else "") + ".")
        if kind in ("conv", "batchnorm", "linear") and not layer.get("name"):
            raise ClearmapsError(f"arch layer {i} ({kind}) needs a 'name': its key prefix in the state dict.")
    return arch


def _module_for(layer: dict) -> nn.Module:
    kind = layer["type"]
    if kind == "conv":
        return nn.Conv2d(layer["in"], layer["out"], layer["kernel"], layer.get("stride", 1),
                         layer.get("padding", 0), bias=layer.get("bias", True))
    if kind == "batchnorm":
        return nn.BatchNorm2d(layer["channels"], eps=layer.get("eps", 1e-5))
    if kind == "relu":
        return nn.ReLU()
    if kind == "maxpool":
        return nn.MaxPool2d(layer["kernel"], layer.get("stride"), layer.get("padding", 0))
    if kind == "dropout":
        return nn.Dropout(layer.get("p", 0.5))
    if kind == "gap":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "flatten":
        return nn.Flatten()
    return nn.Linear(layer["in"], layer["out"], bias=layer.get("bias", True))


def _array(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy().copy()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def spec_layers(module: "SpecModule") -> list:
    """The clearmaps layers of a :class:`SpecModule`, in its spec's order: a batch norm right after a conv is
    folded into it (elsewhere it is a per-channel Affine), dropout is dropped, and a head ``gap [flatten]
    linear`` becomes a 1×1 head conv (exact: global averaging is linear); without a gap the last conv is the
    head (its map's average gives the logits)."""
    layers: list = []
    state = "body"  # body -> gap -> end
    for name, m in module.ordered():
        where = f"arch layer '{name}' ({type(m).__name__})"
        if isinstance(m, nn.Dropout):
            continue
        if state == "end":
            raise ClearmapsError(f"{where} comes after the head's Linear; nothing may follow it.")
        if state == "gap":
            if isinstance(m, nn.Flatten):
                continue
            if isinstance(m, nn.Linear):
                w = _array(m.weight)
                b = _array(m.bias) if m.bias is not None else np.zeros(w.shape[0])
                layers.append(Conv(w[:, :, None, None], b))
                state = "end"
                continue
            raise ClearmapsError(f"{where} follows the global average pool; only flatten, dropout and one linear "
                                 "may.")
        if isinstance(m, nn.Conv2d):
            b = _array(m.bias) if m.bias is not None else np.zeros(m.out_channels)
            layers.append(Conv(_array(m.weight), b, _pair(m.stride), _pair(m.padding)))
        elif isinstance(m, nn.BatchNorm2d):
            scale = 1.0 / np.sqrt(_array(m.running_var) + m.eps) * _array(m.weight)
            shift = _array(m.bias) - _array(m.running_mean) * scale
            if layers and isinstance(layers[-1], Conv):
                conv = layers[-1]
                layers[-1] = Conv(conv.weight * scale[:, None, None, None], conv.bias * scale + shift,
                                  conv.stride, conv.padding)
            else:
                layers.append(Affine(scale[:, None, None], shift[:, None, None]))
        elif isinstance(m, nn.ReLU):
            layers.append(ReLU())
        elif isinstance(m, nn.MaxPool2d):
            layers.append(MaxPool(_pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                                  _pair(m.padding)))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            state = "gap"
        elif isinstance(m, nn.Linear):
            raise ClearmapsError(f"{where} is not after a gap layer: an arch spec's linear layer is the head, after "
                                 "global average pooling (use clearmaps.from_torch for other classifiers).")
        else:  # flatten outside the head: read_arch lets it through, the network cannot use it
            raise ClearmapsError(f"{where} is only allowed between gap and linear.")
    return layers


class SpecModule(nn.Module):
    """A torch module built from an architecture spec: its state-dict keys follow the spec's names and its
    forward runs the layers in the spec's order, returning the logits (B, N)."""

    def __init__(self, arch):
        super().__init__()
        spec = read_arch(arch)
        self.spec = spec
        self._order = []
        for i, layer in enumerate(spec["layers"]):
            name = layer.get("name") or f"layer{i}"
            owner, parts = self, name.split(".")
            for part in parts[:-1]:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if parts[-1] in owner._modules:
                raise ClearmapsError(f"arch layer {i} reuses the name {name!r}; names must be unique.")
            owner.add_module(parts[-1], _module_for(layer))
            self._order.append(name)

    def ordered(self):
        """(name, module) of every layer, in execution order."""
        return [(name, self.get_submodule(name)) for name in self._order]

    def forward(self, x):
        for _, m in self.ordered():
            x = m(x)
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)


def build_module(arch) -> SpecModule:
    """A randomly initialised torch module for ``arch`` (preset name, JSON file or text, dict or list)."""
    return SpecModule(arch)


_WRAPPERS = ("state_dict", "model_state_dict", "model")
_META_ARCH, _META_NAMES = "clearmaps.arch", "clearmaps.class_names"


def read_state_dict(path) -> tuple[dict, dict]:
    """(state dict of tensors, metadata) from a .safetensors or a .pt/.pth file, never running code.

    A .pt file may hold the state dict itself or {"state_dict": ..., "arch": ..., "class_names": ...}
    (also "model_state_dict" or "model"); a "module." prefix (DataParallel) is removed.
    """
    path = Path(path)
    if not path.exists():
        raise ClearmapsError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise ClearmapsError(f"checkpoint {str(path)!r} is not a file.")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClearmapsError(f"checkpoint {str(path)!r} is not a readable safetensors file ({exc}).") from None
        if _META_ARCH in meta:
            meta["arch"] = meta.pop(_META_ARCH)
        if _META_NAMES in meta:
            meta["class_names"] = json.loads(meta.pop(_META_NAMES))
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        import pickle

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ClearmapsError(f"checkpoint {str(path)!r} was refused: it holds Python objects other than "
                                 "tensors, which could run code when loaded, and clearmaps only reads checkpoints "
                                 f"with weights_only=True. Save model.state_dict() instead. ({str(exc)[:200]})"
                                 ) from None
        except Exception as exc:
            raise ClearmapsError(f"checkpoint {str(path)!r} could not be read as a torch file "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); is it corrupt or truncated?") from None
        if isinstance(obj, dict):
            for key in _WRAPPERS:
                if isinstance(obj.get(key), dict):
                    meta = {k: v for k, v in obj.items() if k in ("arch", "class_names")}
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ClearmapsError(f"checkpoint {str(path)!r} does not hold a state dict (a mapping of names to "
                                 "tensors); save model.state_dict().")
        sd = obj
    else:
        raise ClearmapsError(f"checkpoint {str(path)!r} has an unknown extension; expected .safetensors, .pt or .pth.")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, meta


def check_state_dict(module: nn.Module, sd: dict, path) -> None:
    """Refuse a state dict whose keys or shapes do not match ``module``'s, listing every difference."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(sd) - optional)
    extra = sorted(set(sd) - set(want))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)}, expected {want[k]}" for k in set(want) & set(sd)
                    if tuple(sd[k].shape) != want[k])
    if missing or extra or shapes:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else []) \
            + ([f"wrong shapes [{'; '.join(shapes)}]"] if shapes else [])
        raise ClearmapsError(f"checkpoint {str(path)!r} does not match the architecture: " + "; ".join(parts)
                             + ". Check --arch / the arch spec (or --model) against the model that was saved.")
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ClearmapsError(f"checkpoint {str(path)!r}: tensor {k!r} contains NaN or Inf.")


def load_checkpoint(path, arch=None, class_names=None, input_shape=None) -> Network:
    """Load a :class:`Network` from a state dict saved as .safetensors or .pt/.pth.

    Parameters
    ----------
    path : str or Path
    arch : str, dict or list, optional
        A preset ("allcnn-mnist", "vgg16-fcn"), a JSON spec (path, text, dict or layer list). Optional when
        the file carries its own (as :func:`save_checkpoint` writes).
    class_names, input_shape : optional
        Override the spec's.
    """
    sd, meta = read_state_dict(path)
    arch = arch if arch is not None else meta.get("arch")
    if arch is None:
        raise ClearmapsError(f"checkpoint {str(path)!r} does not say its architecture; pass arch= one of "
                             f"{sorted(PRESETS)} or a JSON spec.")
    module = SpecModule(arch)
    check_state_dict(module, sd, path)
    module.load_state_dict(sd, strict=False)
    spec = module.spec
    names = class_names if class_names is not None else meta.get("class_names") or spec.get("class_names")
    shape = input_shape if input_shape is not None else spec.get("input_shape")
    return Network(spec_layers(module), names, shape)


def save_checkpoint(path, module: SpecModule, class_names=None) -> Path:
    """Save a :class:`SpecModule`'s weights as .safetensors (with its arch and class names as metadata) or
    .pt (a dict with "state_dict", "arch" and "class_names")."""
    path = Path(path)
    if not isinstance(module, SpecModule):
        raise ClearmapsError(f"save_checkpoint expects a module from build_module; got {type(module).__name__}.")
    names = class_names if class_names is not None else module.spec.get("class_names")
    meta = {"arch": json.dumps(module.spec)}
    if names:  # without names the file says nothing, and loading falls back to "0", "1", ...
        meta["class_names"] = [str(n) for n in names]
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={_META_ARCH: meta["arch"], **(
            {_META_NAMES: json.dumps(meta["class_names"])} if "class_names" in meta else {})})
    elif path.suffix in (".pt", ".pth"):
        torch.save({"state_dict": sd, **meta}, str(path))
    else:
        raise ClearmapsError(f"{str(path)!r}: expected a .safetensors, .pt or .pth file name.")
    return path
