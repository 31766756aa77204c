"""Architecture specs: the JSON that describes a network to load weights into, checked before anything is built.

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
parameters; no other fields. :data:`PRESETS` holds the specs of the paper's two networks by name.

The torch module a spec describes is :mod:`clearmaps.arch_module`; reading weights into it,
:mod:`clearmaps.checkpoints`.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from numbers import Real
from pathlib import Path

from torch import nn

from .images import _is_int, _one_line  # shared with the image readers: one wording of foreign errors
from .reference import ClearmapsError

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
