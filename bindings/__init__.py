"""clearmaps: CLEAR maps (Class-Enhanced Attentive Response; Kumar, Wong & Taylor 2017) for convolutional
classifiers.

    import clearmaps
    net = clearmaps.from_torch(model)                    # or clearmaps.load_checkpoint(path, arch=...)
    result = clearmaps.explain(net, images)              # images: float (B, C, H, W)
    result.rgb                                           # (B, H, W, 3) uint8 CLEAR maps

The mathematics lives in :mod:`clearmaps.reference` (plain NumPy, the oracle); fast versions in
:mod:`clearmaps.kernels`. Importing this package loads neither torch nor Numba: each name below is
imported from its module the first time it is used (PEP 562).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the submodule (of clearmaps) that defines it
_EXPORTS = {
    "BACKENDS": "backends", "get_backend": "backends",
    "PRESETS": "arch_spec", "read_arch": "arch_spec", "SpecModule": "arch_module", "build_module": "arch_module",
    "load_checkpoint": "checkpoints", "save_checkpoint": "checkpoints",
    "Explanation": "explanation", "explain": "explanation", "resolve_classes": "explanation",
    "from_torch": "torch_io",
    **{name: "reference" for name in (
        "ClearmapsError", "Network", "Conv", "ReLU", "MaxPool", "AvgPool", "AdaptiveAvgPool", "Activation", "Affine",
        "Linear", "Reduce", "Add", "Mul", "Div", "Cat", "Slice", "Reshape", "Permute", "Expand", "Pad", "LayerNorm",
        "binary_map", "compose", "default_palette", "heatmap", "keep_strong", "palette_rgb", "remove_strong",
        "strong_feature_mask")},
}
_SUBMODULES = ("builtin", "paper", "reference", "kernels", "interop", "explanation", "capture", "torch_forward", "images",
               "render", "evidence", "plot", "pictures", "palettes", "firstrun")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
