"""clearmaps.reference: CLEAR maps (Kumar, Wong & Taylor 2017, Eqs. 1–6) in plain, readable NumPy.

Slow on purpose: this is the oracle every fast backend is tested against. It imports nothing else of
clearmaps. Computes in float64 by default.
"""

from .clear import (METHODS, REDUCTIONS, Clear, Trace, attentive_responses, backproject, backproject_rule, check_classes,
                    check_method, check_trace, clear_from_trace, dominant, forward, image_of, reduce_channels,
                    softmax)
from .colour import (check_palette, compose, default_palette, hsv_to_rgb, normalise, palette_rgb,
                     resolve_vmax, to_bytes)
from .errors import ClearmapsError
from .figures import binary_map, heatmap, keep_strong, remove_strong, strong_feature_mask
from .layers import (LAYER_TYPES, AdaptiveAvgPool, Activation, Add, Affine, AvgPool, Cat, Conv, Div, Expand,
                     LayerNorm, Linear, MaxPool, Mul, Pad, Permute, ReLU, Reduce, Reshape, Slice)
from .network import Network, check_input
from .ops import (adaptive_avg_pool2d, adaptive_avg_pool2d_transpose, avg_pool2d, avg_pool2d_transpose, check_unpool,
                  conv2d, conv_transpose2d, gather_at_switches, max_pool_with_switches, unpool)
from .rules import RULES

__all__ = [
    "LAYER_TYPES", "METHODS", "REDUCTIONS", "RULES", "AdaptiveAvgPool", "Activation", "Add", "Affine", "AvgPool", "Cat", "Clear",
    "ClearmapsError", "Conv", "Div", "Expand", "LayerNorm", "Linear", "MaxPool", "Mul", "Network", "Pad", "Permute",
    "ReLU", "Reduce", "Reshape", "Slice", "Trace", "adaptive_avg_pool2d", "adaptive_avg_pool2d_transpose",
    "avg_pool2d", "avg_pool2d_transpose", "backproject_rule", "check_method", "check_trace", "image_of",
    "attentive_responses", "backproject", "binary_map", "check_classes", "check_input", "check_palette",
    "check_unpool",
    "clear_from_trace", "compose", "conv2d", "conv_transpose2d", "default_palette", "dominant", "forward",
    "gather_at_switches", "heatmap", "hsv_to_rgb", "keep_strong", "max_pool_with_switches", "normalise",
    "palette_rgb", "reduce_channels", "remove_strong", "resolve_vmax", "softmax", "strong_feature_mask",
    "to_bytes", "unpool",
]
