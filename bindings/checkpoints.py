"""Checkpoints → Network: safe state-dict reading, key checks against an architecture spec, and writing.

:func:`load_checkpoint` reads a .safetensors or .pt/.pth state dict, lays out the module of its architecture
spec (:mod:`clearmaps.arch_spec`, :mod:`clearmaps.arch_module`) on torch's "meta" device, compares the file's
keys, shapes and kinds of dtype with it before any weight is allocated for it, and returns a
:class:`clearmaps.Network`. :func:`save_checkpoint` writes a :class:`SpecModule`'s weights with its spec.

Pickled checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that holds
anything but tensors and plain containers is refused and nothing in it runs. Tensors must be dense and
floating point where the module has floating-point weights (an int64 file would truncate every weight
below 1 to 0).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .arch_module import SpecModule, spec_layers
from .arch_spec import PRESETS, _parse_json, _short
from .images import _one_line
from .reference import ClearmapsError, Network

# The spec's names, where they were before the spec moved out of this module: ``clearmaps.checkpoints.X``
# and ``from .checkpoints import X`` keep working
from .arch_module import build_module  # noqa: F401
from .arch_spec import MAX_CHANNELS, MAX_KERNEL, MAX_LAYERS, MAX_NAME_CHARS  # noqa: F401
from .arch_spec import MAX_PARAMETERS, MAX_SIDE, MAX_SPEC_BYTES, read_arch  # noqa: F401

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
