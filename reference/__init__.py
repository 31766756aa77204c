"""clearmaps.reference: CLEAR maps (Kumar, Wong & Taylor 2017, Eqs. 1–6) in plain, readable NumPy.

Slow on purpose: this is the oracle every fast backend is tested against. It imports nothing else of
clearmaps. Computes in float64 by default.
"""

from .clear import (REDUCTIONS, Clear, Trace, attentive_responses, backproject, check_classes,
                    clear_from_trace, dominant, forward, reduce_channels, softmax)
from .colour import (check_palette, compose, default_palette, hsv_to_rgb, normalise, palette_rgb,
                     resolve_vmax, to_bytes)
from .errors import ClearmapsError
from .figures import binary_map, heatmap, keep_strong, remove_strong, strong_feature_mask
from .network import Conv, MaxPool, Network, ReLU, check_input
from .ops import check_unpool, conv2d, conv_transpose2d, gather_at_switches, max_pool_with_switches, unpool

__all__ = [
    "REDUCTIONS", "Clear", "ClearmapsError", "Conv", "MaxPool", "Network", "ReLU", "Trace",
    "attentive_responses", "backproject", "binary_map", "check_classes", "check_input", "check_palette",
    "check_unpool",
    "clear_from_trace", "compose", "conv2d", "conv_transpose2d", "default_palette", "dominant", "forward",
    "gather_at_switches", "heatmap", "hsv_to_rgb", "keep_strong", "max_pool_with_switches", "normalise",
    "palette_rgb", "reduce_channels", "remove_strong", "resolve_vmax", "softmax", "strong_feature_mask",
    "to_bytes", "unpool",
]
