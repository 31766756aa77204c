"""Memory planning: how much GPU memory a call may use, and how its work is split to fit.

The columns of a GEMM are built in blocks of at most ``CudaConfig.column_bytes``; the forward pass runs
chunks of images; the back-projection's (image, class) pairs are split into chunks of images, and if one
image's K classes do not fit, of classes. A batch that does not fit in the free GPU memory (or the
configuration's ``memory_limit``) is processed in pieces instead of failing, with the same results.
"""

from __future__ import annotations

from ...reference import ClearmapsError, Conv, MaxPool, Network
from . import device as dv
from .config import CudaConfig


def budget(config: CudaConfig) -> int:
    """Bytes a call may plan to use: 80% of the free device memory, or the configuration's limit if lower."""
    free = int(0.8 * dv.free_bytes())
    return free if config.memory_limit is None else min(config.memory_limit, free)


def column_bytes(config: CudaConfig) -> int:
    """Workspace for one block of GEMM columns: ``config.column_bytes``, or a quarter of a small budget."""
    return min(config.column_bytes, budget(config) // 4)


def column_block(config: CudaConfig, rows: int, ncols: int) -> int:
    """Columns per GEMM block: as many as the workspace holds (at least one)."""
    return max(1, min(ncols, column_bytes(config) // (4 * rows)))


def forward_bytes_per_image(net: Network, sizes) -> int:
    """Bytes one image needs at the widest step of the forward pass (a layer's input and output)."""
    biggest, C = 0, net.in_channels
    for i, layer in enumerate(net.layers):
        (H, W), (oh, ow) = sizes[i], sizes[i + 1]
        if isinstance(layer, Conv):
            biggest = max(biggest, layer.in_channels * H * W + layer.out_channels * oh * ow)
            C = layer.out_channels
        elif isinstance(layer, MaxPool):
            biggest = max(biggest, C * (H * W + oh * ow))
    return 4 * biggest


def backward_bytes_per_signal(net: Network, sizes) -> int:
    """Bytes one (image, class) signal needs at the widest step of the back-projection."""
    head_i = net.head_index
    H, W = sizes[head_i]
    current = net.head.in_channels * H * W  # floats of the signal alive now
    channels = net.head.in_channels
    biggest = current
    pooled = False
    for i in range(head_i - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, Conv):
            produced = layer.in_channels * sizes[i][0] * sizes[i][1]
            biggest = max(biggest, current + produced)
            current, channels, pooled = produced, layer.in_channels, False
        elif isinstance(layer, MaxPool):
            if pooled:  # two pools in a row: the upper one's unpooled plane is materialised
                plane = channels * sizes[i + 1][0] * sizes[i + 1][1]
                biggest = max(biggest, current + plane)
                current = plane
            pooled = True
    if pooled:  # a pool as the first layer: its plane is materialised at the end
        biggest = max(biggest, current + channels * sizes[0][0] * sizes[0][1])
    return 4 * biggest


def forward_images(per_image: int, available: int, B: int, size) -> int:
    """Images per chunk of the forward pass, refusing with one clear error when not even one fits."""
    if available < per_image:
        raise ClearmapsError(f"one image of size {size} needs about {per_image >> 20} MiB of GPU memory "
                             f"for the forward pass; only {max(available, 0) >> 20} MiB are available: use "
                             "smaller images or batches, or free GPU memory.")
    return max(1, min(B, available // max(per_image, 1)))


def chunks(B: int, K: int, per_signal: int, available: int):
    """(b0, bc, k0, kc) pieces covering the B x K (image, class) pairs within ``available`` bytes."""
    n_max = available // max(per_signal, 1)
    if n_max < 1:
        raise ClearmapsError(f"one (image, class) signal needs about {per_signal >> 20} MiB of GPU memory and "
                             f"only {max(available, 0) >> 20} MiB are available: free GPU memory or raise the "
                             "limit (clearmaps.kernels.cuda.set_memory_limit).")
    if n_max >= K:
        bc, kc = min(B, n_max // K), K
    else:
        bc, kc = 1, n_max
    return [(b0, min(bc, B - b0), k0, min(kc, K - k0)) for b0 in range(0, B, bc) for k0 in range(0, K, kc)]
