"""Checkpoints → Network: architecture specs (presets or JSON), safe state-dict reading, key checks.

An architecture spec is a JSON object (or just its "layers" list)::

    {"input_shape": [1, 28, 28], "class_names": ["0", ...],
     "layers": [{"type": "conv", "name": "features.0", "in": 1, "out": 32, "kernel": 3, "padding": 1},
                {"type": "relu"}, {"type": "maxpool", "kernel": 2}, ...,
                {"type": "gap"}, {"type": "linear", "name": "fc", "in": 128, "out": 10}]}

Layer types: conv (in, out, kernel, stride=1, padding=0, bias=true), batchnorm (channels, eps), relu,
maxpool (kernel, stride=kernel, padding=0), dropout (p), gap, flatten, linear (in, out, bias=true).
``name`` is the layer's key prefix in the state dict; it is required for layers with parameters.

:func:`read_arch` checks a spec whole before anything is built: every field's JSON type (integers are
integers, not 3.0 or "3"; bias is true or false) and range (channels 1..65,536; kernel and stride 1..1,024
or a pair; a conv's padding at most its kernel, a max pool's at most half its window; eps > 0; p in [0, 1]),
names that are dot-separated identifiers or numbers, unique, none inside another and none an attribute torch
modules have; class names unique one-line strings; input_shape [C, H, W]; at most 4,096 layers and 2^28
parameters; no other fields. A checkpoint's keys, shapes and kinds of dtype are compared with the spec on
torch's "meta" device, before any weight is allocated for it.

Pickled checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that holds
anything but tensors and plain containers is refused and nothing in it runs. Tensors must be dense and
floating point where the module has floating-point weights (an int64 file would truncate every weight
below 1 to 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import warnings
from numbers import Integral, Real
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
_TOP_FIELDS = {"layers", "input_shape", "class_names"}

# Limits of an architecture spec: far above any real classifier (VGG16 has 138 million parameters), far
# below what would exhaust memory before the checkpoint is even compared with the spec
MAX_LAYERS = 4096
MAX_CHANNELS = 1 << 16
MAX_KERNEL = 1024
MAX_SIDE = 1 << 16
MAX_PARAMETERS = 1 << 28
MAX_SPEC_BYTES = 16 << 20
MAX_NAME_CHARS = 256
_NAME_PART = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


def _one_line(text) -> str:
    """A foreign library's message as one short line (no newlines, no terminal escape codes)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text))
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _reserved_names() -> frozenset:
    # attribute names a module already has: add_module refuses them (nested containers are plain Modules)
    return frozenset(dir(nn.Module())) | {"spec", "ordered"}


class _Spec:
    """The checks of one architecture spec, field by field, with messages that name the layer and field."""

    def __init__(self):
        self.reserved = _reserved_names()

    @staticmethod
    def fail(where: str, message: str):
        raise ClearmapsError(f"arch {where}: {message}")

    def int_field(self, layer, key, where, lo, hi):
        v = layer[key]
        if not _is_int(v) or not lo <= v <= hi:
            self.fail(where, f"'{key}' is {_short.repr(v)}; expected an integer in {lo} .. {hi}.")
        return int(v)

    def pair_field(self, layer, key, where, lo, hi):
        v = layer[key]
        if _is_int(v):
            v = [v, v]
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(n) and lo <= n <= hi for n in v):
            return [int(n) for n in v]
        self.fail(where, f"'{key}' is {_short.repr(layer[key])}; expected an integer in {lo} .. {hi}, or a pair "
                         "[height, width] of them.")

    def number_field(self, layer, key, where, lo, hi, lo_open=False):
        v = layer[key]
        if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(float(v)) or \
                not (lo < v if lo_open else lo <= v) or not v <= hi:
            self.fail(where, f"'{key}' is {_short.repr(v)}; expected a number in {'(' if lo_open else '['}{lo}, "
                             f"{hi}].")
        return float(v)

    def name(self, v, where):
        if not isinstance(v, str) or not 1 <= len(v) <= MAX_NAME_CHARS:
            self.fail(where, f"'name' is {_short.repr(v)}; expected its key prefix in the state dict, a string such "
                             "as 'features.0'.")
        for part in v.split("."):
            if not _NAME_PART.match(part):
                self.fail(where, f"'name' {v!r} has the part {part!r}; a name is dot-separated parts, each a Python "
                                 "identifier or a number (e.g. 'features.0', 'head').")
            if part in self.reserved:
                self.fail(where, f"'name' {v!r} uses {part!r}, which torch modules already use for themselves; "
                                 "rename the layer (and its keys).")
        return v

    def layer(self, i, layer):
        where = f"layer {i}"
        kind = layer.get("type") if isinstance(layer, dict) else None
        if not isinstance(kind, str) or kind not in _FIELDS:
            self.fail(where, f"is {_short.repr(layer)}; each layer needs a 'type' among {sorted(_FIELDS)}.")
        where = f"layer {i} ({kind})"
        need, may = _FIELDS[kind]
        keys = set(layer)
        missing, extra = need - keys, keys - need - may - {"type"}
        if missing or extra:
            raise ClearmapsError(f"arch layer {i} ({kind}) " + (f"lacks {sorted(missing)}" if missing else "")
                                 + (" and " if missing and extra else "")
                                 + (f"has unknown fields {sorted(map(str, extra))}" if extra else "") + ".")
        out = {"type": kind}
        if "name" in layer:
            out["name"] = self.name(layer["name"], where)
        elif kind in ("conv", "batchnorm", "linear"):
            raise ClearmapsError(f"arch layer {i} ({kind}) needs a 'name': its key prefix in the state dict.")
        params = 0
        if kind in ("conv", "linear"):
            out["in"] = self.int_field(layer, "in", where, 1, MAX_CHANNELS)
            out["out"] = self.int_field(layer, "out", where, 1, MAX_CHANNELS)
            if "bias" in layer:
                if not isinstance(layer["bias"], bool):
                    self.fail(where, f"'bias' is {_short.repr(layer['bias'])}; expected true or false.")
                out["bias"] = layer["bias"]
            params = out["in"] * out["out"] + out["out"]
        if kind in ("conv", "maxpool"):
            kernel = self.pair_field(layer, "kernel", where, 1, MAX_KERNEL)
            out["kernel"] = int(layer["kernel"]) if _is_int(layer["kernel"]) else kernel
            if "stride" in layer and not (kind == "maxpool" and layer["stride"] is None):
                stride = self.pair_field(layer, "stride", where, 1, MAX_KERNEL)
                out["stride"] = int(layer["stride"]) if _is_int(layer["stride"]) else stride
            if "padding" in layer:
                # torch's max pool allows at most half the window; more than the kernel makes a conv output
                # rows of nothing but its bias, and lets a stack of layers grow its maps without bound
                most = [k // 2 for k in kernel] if kind == "maxpool" else kernel
                pad = self.pair_field(layer, "padding", where, 0, MAX_KERNEL)
                if any(p > m for p, m in zip(pad, most)):
                    self.fail(where, f"'padding' {layer['padding']!r} is more than "
                                     f"{'half the window' if kind == 'maxpool' else 'the kernel'} "
                                     f"({most[0] if most[0] == most[1] else most}) allows.")
                out["padding"] = int(layer["padding"]) if _is_int(layer["padding"]) else pad
            if kind == "conv":
                params = out["in"] * out["out"] * kernel[0] * kernel[1] + out["out"]
        if kind == "batchnorm":
            out["channels"] = self.int_field(layer, "channels", where, 1, MAX_CHANNELS)
            if "eps" in layer:
                out["eps"] = self.number_field(layer, "eps", where, 0, 1, lo_open=True)
            params = 4 * out["channels"]
        if kind == "dropout" and "p" in layer:
            out["p"] = self.number_field(layer, "p", where, 0, 1)
        return out, params

    def class_names(self, v):
        if v is None:
            return None
        if not isinstance(v, list) or not 1 <= len(v) <= MAX_CHANNELS or not all(
                isinstance(n, str) and 1 <= len(n) <= MAX_NAME_CHARS and n.isprintable() for n in v):
            raise ClearmapsError(f"arch 'class_names' is {_short.repr(v)}; expected a list of class names: strings of "
                                 f"1 .. {MAX_NAME_CHARS} printable characters, one per class.")
        if len(set(v)) != len(v):
            raise ClearmapsError("arch 'class_names' names a class twice; class names must be unique.")
        return list(v)

    def input_shape(self, v):
        if v is None:
            return None
        ok = isinstance(v, list) and len(v) == 3 and _is_int(v[0]) and 1 <= v[0] <= MAX_CHANNELS and (
            (v[1] is None and v[2] is None) or all(_is_int(n) and 1 <= n <= MAX_SIDE for n in v[1:]))
        if not ok:
            raise ClearmapsError(f"arch 'input_shape' is {_short.repr(v)}; expected [channels, height, width] of "
                                 f"positive integers (height and width at most {MAX_SIDE}, or both null for any "
                                 "size).")
        return [int(v[0])] + [None if n is None else int(n) for n in v[1:]]


def _parse_json(text: str, source: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ClearmapsError(f"{source} is nested too deeply to be an architecture spec.") from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts
        raise ClearmapsError(f"{source} is not valid JSON ({_one_line(exc)}).") from None


def read_arch(arch) -> dict:
    """An architecture spec from a preset name, a path to a JSON file, a JSON string, a dict or a list,
    checked against the whole schema (module docstring) before anything is built: every field's type and
    range, names that are state-dict key prefixes and unique, class names, input shape, and the limits
    (at most 4,096 layers, 65,536 channels, kernels of 1,024, 2^28 parameters; a file of 16 MiB). Returns a
    new dict of plain JSON values."""
    if isinstance(arch, str) and arch in PRESETS:
        return json.loads(json.dumps(PRESETS[arch]))
    if isinstance(arch, (str, os.PathLike)):
        text = str(arch)
        if text.lstrip().startswith(("{", "[")):
            source = "the JSON given"
            if len(text) > MAX_SPEC_BYTES:
                raise ClearmapsError(f"the JSON given is {len(text):,} characters; an architecture spec is at most "
                                     f"{MAX_SPEC_BYTES:,}.")
        else:
            path = Path(text)
            if not path.is_file():
                raise ClearmapsError(f"arch {text!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file.")
            source = repr(str(path))
            try:
                if path.stat().st_size > MAX_SPEC_BYTES:
                    raise ClearmapsError(f"{source} is {path.stat().st_size:,} bytes; an architecture spec is at most "
                                         f"{MAX_SPEC_BYTES:,}.")
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ClearmapsError(f"{source} could not be read ({_one_line(exc)}).") from None
        arch = _parse_json(text, source)
    if isinstance(arch, (list, tuple)):
        arch = {"layers": list(arch)}
    if not isinstance(arch, dict) or not isinstance(arch.get("layers"), (list, tuple)) or not arch["layers"]:
        raise ClearmapsError("an architecture spec is a JSON object with a non-empty 'layers' list (or that list).")
    extra = set(arch) - _TOP_FIELDS
    if extra:
        raise ClearmapsError(f"an architecture spec has unknown fields {sorted(map(str, extra))}; it may have only "
                             f"{sorted(_TOP_FIELDS)}.")
    layers = list(arch["layers"])
    if len(layers) > MAX_LAYERS:
        raise ClearmapsError(f"the architecture spec has {len(layers):,} layers; at most {MAX_LAYERS:,} are allowed.")
    check = _Spec()
    spec: dict = {}
    if "input_shape" in arch:
        spec["input_shape"] = check.input_shape(arch["input_shape"])
    if "class_names" in arch:
        spec["class_names"] = check.class_names(arch["class_names"])
    spec["layers"], total, names = [], 0, {}
    for i, layer in enumerate(layers):
        checked, params = check.layer(i, layer)
        total += params
        if total > MAX_PARAMETERS:
            raise ClearmapsError(f"the architecture spec has more than {MAX_PARAMETERS:,} parameters by layer {i}; "
                                 "that is more than clearmaps loads (VGG16 has 138 million).")
        name = checked.get("name") or f"layer{i}"
        if name in names:
            raise ClearmapsError(f"arch layer {i} reuses the name {name!r} (layer {names[name]}); names must be "
                                 "unique.")
        names[name] = i
        spec["layers"].append(checked)
    for name, i in names.items():  # a layer cannot live inside another layer
        parts = name.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in names:
                raise ClearmapsError(f"arch layer {i} is named {name!r}, inside layer {names['.'.join(parts[:k])]} "
                                     f"({'.'.join(parts[:k])!r}); a layer's name may not extend another's.")
    return spec


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


def _checkpoint_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ClearmapsError(f"checkpoint path is {_short.repr(path)}; expected a file name (str or Path).")
    path = Path(path)
    if not path.exists():
        raise ClearmapsError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise ClearmapsError(f"checkpoint {str(path)!r} is not a file.")
    return path


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(path: Path, exc: Exception) -> ClearmapsError:
    """torch's weights-only refusal, in our words: what the file holds and what to do, in one line. (torch's
    own text spans lines, carries terminal codes and advises loading the file with weights_only=False.)"""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        what = f"a pickled Python object ({found.group(1)}), not only tensors"
    else:
        what = "pickle instructions that a state dict of tensors never needs (it may hold code, or be corrupt)"
    return ClearmapsError(f"checkpoint {str(path)!r} was refused: it holds {what}. clearmaps reads checkpoints only "
                          "with weights_only=True, so that nothing in a file can run; save the weights alone, "
                          "torch.save(model.state_dict(), path), or as .safetensors.")


def _check_tensors(sd: dict, path: Path) -> None:
    """Refuse what a state dict of dense tensors never holds: names that are not strings, sparse, quantized
    or meta tensors, and non-tensor values."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ClearmapsError(f"checkpoint {str(path)!r} has the key {_short.repr(k)}; state dict keys are strings.")
        if not isinstance(v, torch.Tensor):
            raise ClearmapsError(f"checkpoint {str(path)!r} does not hold a state dict (a mapping of names to "
                                 "tensors); save model.state_dict().")
        if v.layout != torch.strided or v.is_quantized or v.device.type == "meta":
            kind = "quantized" if v.is_quantized else "meta" if v.device.type == "meta" else str(v.layout)
            raise ClearmapsError(f"checkpoint {str(path)!r}: tensor {k!r} is a {kind} tensor; clearmaps reads dense "
                                 "float weights (save them with .to_dense() / .dequantize()).")


def read_state_dict(path) -> tuple[dict, dict]:
    """(state dict of tensors, metadata) from a .safetensors or a .pt/.pth file, never running code.

    A .pt file may hold the state dict itself or {"state_dict": ..., "arch": ..., "class_names": ...}
    (also "model_state_dict" or "model"); a "module." prefix (DataParallel) is removed. Every value is a
    dense tensor and every key a string, or the file is refused; the metadata's class names are a list of
    strings.
    """
    path = _checkpoint_path(path)
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # SafetensorError, OSError, ValueError, and whatever a hostile header causes
            raise ClearmapsError(f"checkpoint {str(path)!r} is not a readable safetensors file "
                                 f"({_one_line(exc) or type(exc).__name__}).") from None
        if _META_ARCH in meta:
            meta["arch"] = _parse_json(meta.pop(_META_ARCH), f"the metadata {_META_ARCH!r} of checkpoint {str(path)!r}")
        if _META_NAMES in meta:
            names = meta.pop(_META_NAMES)
            try:
                meta["class_names"] = json.loads(names)
            except (ValueError, RecursionError):
                raise ClearmapsError(f"checkpoint {str(path)!r}: its metadata {_META_NAMES!r} is not a JSON list of "
                                     "names; give the names with --class-names (or class_names=).") from None
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        import pickle

        try:
            with warnings.catch_warnings():  # torch warns about unusual pickle protocols: a second line of output
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" in str(exc).lower():
                raise _refusal(path, exc) from None
            raise ClearmapsError(f"checkpoint {str(path)!r} could not be read as a torch file "
                                 f"({_one_line(exc)}); is it corrupt or truncated?") from None
        except Exception as exc:
            raise ClearmapsError(f"checkpoint {str(path)!r} could not be read as a torch file "
                                 f"({type(exc).__name__}: {_one_line(exc)}); is it corrupt or truncated?") from None
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
    _check_tensors(sd, path)
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise ClearmapsError(f"checkpoint {str(path)!r} says its class names are {_short.repr(names)}; expected a list "
                             "of strings (or give them with --class-names / class_names=).")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, meta


def _kind(t: torch.Tensor) -> str:
    return "floating point" if t.is_floating_point() else "complex" if t.is_complex() else "integer or bool"


def check_state_dict(module: nn.Module, sd: dict, path) -> None:
    """Refuse a state dict whose keys, shapes or kinds of dtype do not match ``module``'s, listing every
    difference: an integer tensor where the module has float weights would be cast, and every weight below 1
    would become 0 without a word."""
    want = module.state_dict()
    shapes_want = {k: tuple(v.shape) for k, v in want.items()}
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(sd) - optional)
    extra = sorted(set(sd) - set(want))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)}, expected {shapes_want[k]}" for k in set(want) & set(sd)
                    if tuple(sd[k].shape) != shapes_want[k])
    if missing or extra or shapes:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else []) \
            + ([f"wrong shapes [{'; '.join(shapes)}]"] if shapes else [])
        raise ClearmapsError(f"checkpoint {str(path)!r} does not match the architecture: " + "; ".join(parts)
                             + ". Check --arch / the arch spec (or --model) against the model that was saved.")
    kinds = sorted(f"{k} is {sd[k].dtype} ({_kind(sd[k])}), expected {_kind(want[k])}" for k in set(want) & set(sd)
                   if _kind(sd[k]) != _kind(want[k]) and k not in optional)
    if kinds:
        raise ClearmapsError(f"checkpoint {str(path)!r} has tensors of the wrong kind: {'; '.join(kinds[:5])}"
                             + (f" (and {len(kinds) - 5} more)" if len(kinds) > 5 else "")
                             + ". Weights are floating point: save the float model's state dict (model.float()).")
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

    The spec is checked whole (:func:`read_arch`) and the file's keys, shapes and dtypes against it before
    any weight is allocated for the spec: the module is laid out on torch's "meta" device and takes the
    file's tensors as they are.
    """
    sd, meta = read_state_dict(path)
    arch = arch if arch is not None else meta.get("arch")
    if arch is None:
        raise ClearmapsError(f"checkpoint {str(path)!r} does not say its architecture; pass arch= one of "
                             f"{sorted(PRESETS)} or a JSON spec.")
    with torch.device("meta"):
        module = SpecModule(arch)
    check_state_dict(module, sd, path)
    module.load_state_dict(sd, strict=False, assign=True)
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
