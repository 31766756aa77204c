"""clearmaps: CLEAR maps (Class-Enhanced Attentive Response; Kumar, Wong & Taylor 2017) for convolutional
classifiers.

    import clearmaps
    net = clearmaps.load_checkpoint("model.safetensors", arch="allcnn-mnist")   # or clearmaps.from_torch(module)
    result = clearmaps.explain(net, images)              # images: float (B, C, H, W)
    result.rgb                                           # (B, H, W, 3) uint8 CLEAR maps

The mathematics lives in :mod:`clearmaps.reference` (plain NumPy, the oracle); fast versions in
:mod:`clearmaps.kernels`.
"""

from .backends import BACKENDS, get_backend
from .checkpoints import PRESETS, SpecModule, build_module, load_checkpoint, read_arch, save_checkpoint
from .explain import Explanation, explain, resolve_classes
from .reference import (ClearmapsError, Conv, MaxPool, Network, ReLU, binary_map, compose, default_palette,
                        heatmap, keep_strong, palette_rgb, remove_strong, strong_feature_mask)
from .torch_io import from_torch

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "PRESETS", "ClearmapsError", "Conv", "Explanation", "MaxPool", "Network", "ReLU", "SpecModule",
    "binary_map", "build_module", "compose", "default_palette", "explain", "from_torch", "get_backend",
    "heatmap", "keep_strong", "load_checkpoint", "palette_rgb", "read_arch", "remove_strong",
    "resolve_classes", "save_checkpoint", "strong_feature_mask",
]
