"""Wrong: ties go to the LAST maximum in row-major order, in the max pools' switches and in the dominant class
(the reference, and torch, take the first)."""

import dataclasses

import numpy as np

from clearmaps import reference as ref
from clearmaps.reference import Conv, ReLU

from . import clear_with, reference_functions


def max_pool_with_switches(x, kernel, stride=None, padding=0):
    """The reference's pooled values, with each window's switch at its last maximum."""
    pooled, first = ref.max_pool_with_switches(x, kernel, stride, padding)
    kh, kw = (kernel, kernel) if np.ndim(kernel) == 0 else kernel
    sh, sw = (kh, kw) if stride is None else ((stride, stride) if np.ndim(stride) == 0 else stride)
    ph, pw = (padding, padding) if np.ndim(padding) == 0 else padding
    x = np.asarray(x, dtype=np.float64)
    B, C, H, W = x.shape
    switches = first.copy()
    for p in range(pooled.shape[2]):
        for q in range(pooled.shape[3]):
            for dy in range(kh):
                for dx in range(kw):
                    u, v = p * sh - ph + dy, q * sw - pw + dx
                    if 0 <= u < H and 0 <= v < W:  # row-major order: a later equal value takes the switch
                        tie = x[:, :, u, v] == pooled[:, :, p, q]
                        switches[:, :, p, q] = np.where(tie, u * W + v, switches[:, :, p, q])
    return pooled, switches


def forward(net, x):
    """The reference's forward pass, its switches retaken with the last-maximum rule (same pooled values)."""
    trace = ref.forward(net, x)
    a, switches = np.asarray(x, dtype=np.float64), {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):
            a = ref.conv2d(a, layer.weight, layer.bias, layer.stride, layer.padding)
        elif isinstance(layer, ReLU):
            a = np.maximum(a, 0)
        else:
            a, switches[i] = max_pool_with_switches(a, layer.kernel, layer.stride, layer.padding)
    return dataclasses.replace(trace, switches=switches)


def dominant(responses):
    r = np.asarray(responses)
    K = r.shape[1]
    index = K - 1 - np.argmax(r[:, ::-1], axis=1)
    return index, np.take_along_axis(r, index[:, None], axis=1)[:, 0]


clear_from_trace = clear_with(ref.backproject, dominant)
reference_functions(globals())
