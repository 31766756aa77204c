"""The four operators of a deconvnet, in plain NumPy: convolution, its transpose, max pooling with
switches, and switch unpooling.

Each loops over the kernel's offsets and does one vectorised multiply-add per offset: slow, but every
line says what it computes. Shapes follow torch: images (B, C, H, W), weights (out, in, kh, kw).
"""

from __future__ import annotations

import numpy as np

from .errors import ClearmapsError, check_array, check_pair


def _out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """Cross-correlation as torch's ``conv2d``: zero padding, dilation 1, groups 1.

    x (B, I, H, W), weight (O, I, kh, kw), bias (O,) or None → (B, O, oh, ow).
    """
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in, kh, kw)")
    (sh, sw), (ph, pw) = check_pair(stride, "stride", 1), check_pair(padding, "padding", 0)
    if weight.shape[1] != x.shape[1]:
        raise ClearmapsError(f"x has {x.shape[1]} channels but weight {weight.shape} takes {weight.shape[1]}.")
    B, _, H, W = x.shape
    O, _, kh, kw = weight.shape
    oh, ow = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the {kh}x{kw} kernel with padding {padding}.")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((B, O, oh, ow), dtype=np.result_type(x, weight))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out += np.einsum("bihw,oi->bohw", patch, weight[:, :, i, j])
    if bias is not None:
        out += check_array(bias, "bias", 1)[None, :, None, None]
    return out


def conv_transpose2d(y, weight, stride=1, padding=0, output_size=None):
    """The transpose (adjoint) of :func:`conv2d` with the same weight, stride and padding (the paper's G_l).

    y (B, O, oh, ow), weight (O, I, kh, kw) → (B, I, H, W) with (H, W) = ``output_size``, the conv's input
    size. A strided conv maps several input sizes to one output size; ``output_size`` picks which (torch
    calls the difference output padding). Default: the smallest.
    """
    y, weight, (sh, sw), (ph, pw), (H, W) = check_conv_transpose(y, weight, stride, padding, output_size)
    B, O, oh, ow = y.shape
    _, I, kh, kw = weight.shape
    out = np.zeros((B, I, H + 2 * ph, W + 2 * pw), dtype=np.result_type(y, weight))
    for i in range(kh):
        for j in range(kw):
            # every output pixel (u, v) of the conv read the padded input at (i + u*sh, j + v*sw) with
            # weight[:, :, i, j]; the transpose sends it back there
            out[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += np.einsum(
                "bohw,oi->bihw", y, weight[:, :, i, j])
    return out[:, :, ph:ph + H, pw:pw + W]


def check_conv_transpose(y, weight, stride, padding, output_size):
    """Validate :func:`conv_transpose2d`'s arguments. Returns (y, weight, stride, padding, (H, W))."""
    y = check_array(y, "y", 4, shape_hint=" of shape (B, O, oh, ow)")
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in, kh, kw)")
    stride, padding = check_pair(stride, "stride", 1), check_pair(padding, "padding", 0)
    if weight.shape[0] != y.shape[1]:
        raise ClearmapsError(f"y has {y.shape[1]} channels but weight {weight.shape} has {weight.shape[0]} kernels.")
    size = transposed_size(output_size, y.shape[2:], weight.shape[2:], stride, padding)
    return y, weight, stride, padding, size


def transposed_size(output_size, in_size, kernel, stride, padding) -> tuple[int, int]:
    """The (H, W) a transposed conv produces from ``in_size``: ``output_size`` checked against the conv it
    transposes (that conv must map it back to ``in_size``), or by default the smallest such size."""
    (oh, ow), (kh, kw), (sh, sw), (ph, pw) = in_size, kernel, stride, padding
    if output_size is None:
        output_size = ((oh - 1) * sh - 2 * ph + kh, (ow - 1) * sw - 2 * pw + kw)
    H, W = check_pair(output_size, "output_size", 1)
    if (_out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)) != (oh, ow):
        raise ClearmapsError(f"output_size {(H, W)} does not fit: a conv with kernel {(kh, kw)}, stride "
                             f"{(sh, sw)}, padding {(ph, pw)} maps it to "
                             f"{(_out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw))}, not {(oh, ow)}.")
    return H, W


def max_pool_with_switches(x, kernel, stride=None, padding=0):
    """Max pooling (torch's ``max_pool2d``, -inf padding) that also returns the switches.

    A switch is the flat index ``row * W + col`` into the input plane of the maximum of each window; on ties
    the first maximum in row-major window order wins (torch's rule). Returns (pooled, switches int64),
    both (B, C, oh, ow).
    """
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    (kh, kw) = check_pair(kernel, "kernel", 1)
    (sh, sw) = (kh, kw) if stride is None else check_pair(stride, "stride", 1)
    (ph, pw) = check_pair(padding, "padding", 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ClearmapsError(f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}.")
    B, C, H, W = x.shape
    oh, ow = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the pool's {kh}x{kw} window.")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    rows = np.arange(oh)[:, None] * sh - ph  # top-left corner of each window, in unpadded coordinates
    cols = np.arange(ow)[None, :] * sw - pw
    best = np.full((B, C, oh, ow), -np.inf, dtype=x.dtype)
    switches = np.zeros((B, C, oh, ow), dtype=np.int64)
    for i in range(kh):  # row-major window order, and a strict '>' keeps the first maximum
        for j in range(kw):
            candidate = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            better = candidate > best
            best = np.where(better, candidate, best)
            switches = np.where(better, (rows + i) * W + (cols + j), switches)
    return best, switches


def unpool(y, switches, input_size):
    """Switch unpooling (the paper's U_l): a zero plane of ``input_size`` with each value of ``y`` *added*
    at its window's switch (overlapping windows can share one).

    y and switches (B, C, oh, ow) → (B, C, H, W).
    """
    y, switches, (H, W) = check_unpool(y, switches, input_size)
    B, C = y.shape[:2]
    plane = np.zeros((B * C, H * W), dtype=y.dtype)
    np.add.at(plane, (np.arange(B * C)[:, None], switches.reshape(B * C, -1)), y.reshape(B * C, -1))
    return plane.reshape(B, C, H, W)


def check_unpool(y, switches, input_size):
    """Validate unpooling's arguments: y and integer switches of one shape (B, C, oh, ow), each switch a flat
    index into an ``input_size`` plane. Returns (y, switches, (H, W))."""
    y = check_array(y, "y", 4, shape_hint=" of shape (B, C, oh, ow)")
    switches = check_array(switches, "switches", 4, kinds="iu")
    H, W = check_pair(input_size, "input_size", 1)
    if switches.shape != y.shape:
        raise ClearmapsError(f"switches have shape {switches.shape} but y has shape {y.shape}; they must match.")
    if switches.size and (switches.min() < 0 or switches.max() >= H * W):
        raise ClearmapsError(f"switches range over [{switches.min()}, {switches.max()}], outside a "
                             f"{H}x{W} plane (0 .. {H * W - 1}).")
    return y, switches, (H, W)


def gather_at_switches(x, switches):
    """x (B, C, H, W) read at the switches (B, C, oh, ow): the adjoint of :func:`unpool`."""
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W)
    return np.take_along_axis(flat, switches.reshape(B * C, -1), axis=1).reshape(switches.shape)
