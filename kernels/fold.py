"""The folded head: a 1×1 class conv, the ReLUs below it and the conv below them as one small step.

Both fast backends use it (the reference does not: it computes Eq. 3 as written). G_L^c z_L of a 1×1 head
is the outer product z_c ⊗ w_c (w_c = head kernel c, one weight per channel m of the layer below);
rectified, it is z⁺ ⊗ w_c⁺ + z⁻ ⊗ w_c⁻ (a product of two numbers is positive exactly when their signs
agree; z⁻ = min(z, 0), w⁻ = min(w, 0)). The conv's transpose of it is therefore the transpose of the
TWO-channel plane (z⁺, z⁻) with the kernels V_c± = Σ_m w_c±[m] · weight[m] — two input channels instead
of the conv's M. Without rectification (or without a ReLU between head and conv) both kernels are
Σ_m w_c[m] · weight[m], and z⁺ + z⁻ = z recovers the linear map.

On allcnn-mnist this turns the 128 → 64 transposed conv at 7×7 of every (image, class) pair into a
2 → 64 one: 64× fewer multiply-adds for that step.
"""

from __future__ import annotations

import numpy as np

from ..reference import Conv, Network, ReLU

__all__ = ["fold_head"]


def fold_head(net: Network, min_in_channels: int = 1):
    """(j, rectified, linear) when the head is a 1×1 stride-1 unpadded conv and the layers below it are
    ReLUs over a conv j with at least ``min_in_channels`` input channels; else None.

    ``rectified`` and ``linear`` are float64 (N, kh, kw, 2, I) — class, conv j's tap, sign channel (z⁺, z⁻),
    conv j's input channel: the folded kernels for ``rectify=True`` and ``rectify=False``."""
    hi, head = net.head_index, net.head
    if head.kernel != (1, 1) or head.stride != (1, 1) or head.padding != (0, 0):
        return None
    j = hi - 1
    while j >= 0 and isinstance(net.layers[j], ReLU):
        j -= 1
    if j < 0 or not isinstance(net.layers[j], Conv) or net.layers[j].in_channels < min_in_channels:
        return None
    w = np.asarray(head.weight, dtype=np.float64)[:, :, 0, 0]          # (N, M)
    conv = np.asarray(net.layers[j].weight, dtype=np.float64)          # (M, I, kh, kw)
    fold = lambda a: np.einsum("cm,mjyx->cyxj", a, conv)  # noqa: E731   (N, kh, kw, I)
    full = fold(w)
    linear = np.stack([full, full], axis=3)
    if hi - 1 == j:  # no ReLU in between: nothing to rectify
        return j, linear, linear
    return j, np.stack([fold(np.maximum(w, 0)), fold(np.minimum(w, 0))], axis=3), linear
