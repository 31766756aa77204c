"""The four operators of a deconvnet, in plain NumPy: convolution, its transpose, max pooling with
switches, and switch unpooling.

Each loops over the kernel's offsets and does one vectorised multiply-add per offset: slow, but every
line says what it computes. Shapes follow torch: images (B, C, H, W), weights (out, in, kh, kw).
"""

from __future__ import annotations

import numpy as np

from .errors import ClearmapsError, check_array, check_pair
from .layer_base import window_output_size


def _out_size(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_args(x_channels, weight, stride, padding, dilation, groups):
    (sh, sw), (ph, pw) = check_pair(stride, "stride", 1), check_pair(padding, "padding", 0)
    (dh, dw) = check_pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ClearmapsError(f"groups={groups!r}; expected a positive int.")
    O, Ig = weight.shape[:2]
    if O % groups or (x_channels is not None and x_channels != Ig * groups):
        raise ClearmapsError(f"weight {weight.shape} with groups={groups} takes {Ig * groups} channels in "
                             f"{groups} groups; the input has {x_channels} (and the {O} kernels must split "
                             "evenly into the groups).")
    return (sh, sw), (ph, pw), (dh, dw), int(groups)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation as torch's ``conv2d``: zero padding, dilation, groups.

    x (B, I, H, W), weight (O, I / groups, kh, kw), bias (O,) or None → (B, O, oh, ow). With groups G the
    channels split into G groups, group g's O/G kernels reading only its I/G channels (G = I: depthwise).
    """
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in / groups, kh, kw)")
    (sh, sw), (ph, pw), (dh, dw), G = _conv_args(x.shape[1], weight, stride, padding, dilation, groups)
    B, _, H, W = x.shape
    O, Ig, kh, kw = weight.shape
    oh, ow = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    if oh < 1 or ow < 1:
        raise ClearmapsError(f"input of size {H}x{W} is smaller than the {kh}x{kw} kernel (dilation "
                             f"{(dh, dw)}) with padding {(ph, pw)}.")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).reshape(B, G, Ig, H + 2 * ph, W + 2 * pw)
    wg = weight.reshape(G, O // G, Ig, kh, kw)
    out = np.zeros((B, G, O // G, oh, ow), dtype=np.result_type(x, weight))
    for i in range(kh):
        for j in range(kw):
            patch = xp[..., i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out += np.einsum("bgihw,goi->bgohw", patch, wg[..., i, j])
    out = out.reshape(B, O, oh, ow)
    if bias is not None:
        out += check_array(bias, "bias", 1)[None, :, None, None]
    return out


def conv_transpose2d(y, weight, stride=1, padding=0, output_size=None, dilation=1, groups=1):
    """The transpose (adjoint) of :func:`conv2d` with the same weight, stride, padding, dilation and groups
    (the paper's G_l).

    y (B, O, oh, ow), weight (O, I / groups, kh, kw) → (B, I, H, W) with (H, W) = ``output_size``, the conv's
    input size. A strided conv maps several input sizes to one output size; ``output_size`` picks which (torch
    calls the difference output padding). Default: the smallest.
    """
    y, weight, (sh, sw), (ph, pw), (H, W), (dh, dw), G = check_conv_transpose(y, weight, stride, padding,
                                                                             output_size, dilation, groups)
    B, O, oh, ow = y.shape
    _, Ig, kh, kw = weight.shape
    yg = y.reshape(B, G, O // G, oh, ow)
    wg = weight.reshape(G, O // G, Ig, kh, kw)
    out = np.zeros((B, G, Ig, H + 2 * ph, W + 2 * pw), dtype=np.result_type(y, weight))
    for i in range(kh):
        for j in range(kw):
            # every output pixel (u, v) of the conv read the padded input at (i*dh + u*sh, j*dw + v*sw) with
            # weight[:, :, i, j]; the transpose sends it back there
            out[..., i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += np.einsum(
                "bgohw,goi->bgihw", yg, wg[..., i, j])
    return out.reshape(B, G * Ig, H + 2 * ph, W + 2 * pw)[:, :, ph:ph + H, pw:pw + W]


def check_conv_transpose(y, weight, stride, padding, output_size, dilation=1, groups=1):
    """Validate :func:`conv_transpose2d`'s arguments. Returns (y, weight, stride, padding, (H, W), dilation,
    groups)."""
    y = check_array(y, "y", 4, shape_hint=" of shape (B, O, oh, ow)")
    weight = check_array(weight, "weight", 4, shape_hint=" of shape (out, in / groups, kh, kw)")
    stride, padding, dilation, groups = _conv_args(None, weight, stride, padding, dilation, groups)
    if weight.shape[0] != y.shape[1]:
        raise ClearmapsError(f"y has {y.shape[1]} channels but weight {weight.shape} has {weight.shape[0]} kernels.")
    size = transposed_size(output_size, y.shape[2:], weight.shape[2:], stride, padding, dilation)
    return y, weight, stride, padding, size, dilation, groups


def transposed_size(output_size, in_size, kernel, stride, padding, dilation=(1, 1)) -> tuple[int, int]:
    """The (H, W) a transposed conv produces from ``in_size``: ``output_size`` checked against the conv it
    transposes (that conv must map it back to ``in_size``), or by default the smallest such size."""
    (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = in_size, kernel, stride, padding, dilation
    if output_size is None:
        output_size = ((oh - 1) * sh - 2 * ph + dh * (kh - 1) + 1, (ow - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    H, W = check_pair(output_size, "output_size", 1)
    got = (_out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw))
    if got != (oh, ow):
        raise ClearmapsError(f"output_size {(H, W)} does not fit: a conv with kernel {(kh, kw)}, stride "
                             f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)} maps it to {got}, not {(oh, ow)}.")
    return H, W


def _pool_args(x, kernel, stride, padding, what, dilation=1):
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    (kh, kw) = check_pair(kernel, "kernel", 1)
    (sh, sw) = (kh, kw) if stride is None else check_pair(stride, "stride", 1)
    (ph, pw) = check_pair(padding, "padding", 0)
    (dh, dw) = check_pair(dilation, "dilation", 1)
    if 2 * ph > dh * (kh - 1) + 1 or 2 * pw > dw * (kw - 1) + 1:
        raise ClearmapsError(f"padding {(ph, pw)} is more than half the kernel {(kh, kw)} of the {what}.")
    return x, (kh, kw), (sh, sw), (ph, pw), (dh, dw)


def _pool_size(n, k, s, p, d, ceil_mode, what):
    """torch's pooled size along one axis (``ceil_mode`` keeps a last partial window that starts inside the
    input or its left padding)."""
    return window_output_size(n, k, s, p, d, ceil_mode, what)


def max_pool_with_switches(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling (torch's ``max_pool2d``, -inf padding, dilation, ``ceil_mode``) that also returns the
    switches.

    A switch is the flat index ``row * W + col`` into the input plane of the maximum of each window; on ties
    the first maximum in row-major window order wins (torch's rule). Returns (pooled, switches int64),
    both (B, C, oh, ow).
    """
    x, (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pool_args(x, kernel, stride, padding, "pool", dilation)
    B, C, H, W = x.shape
    oh = _pool_size(H, kh, sh, ph, dh, ceil_mode, "pool")
    ow = _pool_size(W, kw, sw, pw, dw, ceil_mode, "pool")
    # pad on the right as far as the last (ceil-mode) window reaches
    bottom = max(ph, (oh - 1) * sh + dh * (kh - 1) + 1 - H - ph)
    right = max(pw, (ow - 1) * sw + dw * (kw - 1) + 1 - W - pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, bottom), (pw, right)), constant_values=-np.inf)
    rows = np.arange(oh)[:, None] * sh - ph  # top-left corner of each window, in unpadded coordinates
    cols = np.arange(ow)[None, :] * sw - pw
    best = np.full((B, C, oh, ow), -np.inf, dtype=x.dtype)
    switches = np.zeros((B, C, oh, ow), dtype=np.int64)
    for i in range(kh):  # row-major window order, and a strict '>' keeps the first maximum
        for j in range(kw):
            candidate = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            better = candidate > best
            best = np.where(better, candidate, best)
            switches = np.where(better, (rows + i * dh) * W + (cols + j * dw), switches)
    return best, switches


def _avg_windows(n, k, s, p, ceil_mode, count_include_pad):
    """Per output cell along one axis: (first, last + 1) of the input cells it averages, and the count torch
    divides by (the window clipped to the padded input, or to the input alone)."""
    out = _pool_size(n, k, s, p, 1, ceil_mode, "average pool")
    start = np.arange(out) * s - p
    end = np.minimum(start + k, n + p)
    padded = end - start
    start, end = np.maximum(start, 0), np.minimum(end, n)
    return start, end, padded if count_include_pad else end - start


def avg_pool2d(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Average pooling as torch's ``avg_pool2d`` (zero padding; ``count_include_pad`` counts the padding in
    the divisor, ``divisor_override`` replaces it). x (B, C, H, W) → (B, C, oh, ow)."""
    x, (kh, kw), (sh, sw), (ph, pw), _ = _pool_args(x, kernel, stride, padding, "average pool")
    rs, re, rn = _avg_windows(x.shape[2], kh, sh, ph, ceil_mode, count_include_pad)
    cs, ce, cn = _avg_windows(x.shape[3], kw, sw, pw, ceil_mode, count_include_pad)
    out = np.zeros((*x.shape[:2], len(rs), len(cs)), dtype=x.dtype)
    for u in range(len(rs)):
        for v in range(len(cs)):
            div = divisor_override or rn[u] * cn[v]
            out[:, :, u, v] = x[:, :, rs[u]:re[u], cs[v]:ce[v]].sum(axis=(2, 3)) / div
    return out


def avg_pool2d_transpose(y, input_size, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                         divisor_override=None):
    """The transpose of :func:`avg_pool2d`: each pooled value, divided as the forward divided, spread evenly
    over the input cells of its window. y (B, C, oh, ow) → (B, C, H, W)."""
    H, W = check_pair(input_size, "input_size", 1)
    probe = np.zeros((1, 1, H, W))
    _, (kh, kw), (sh, sw), (ph, pw), _ = _pool_args(probe, kernel, stride, padding, "average pool")
    rs, re, rn = _avg_windows(H, kh, sh, ph, ceil_mode, count_include_pad)
    cs, ce, cn = _avg_windows(W, kw, sw, pw, ceil_mode, count_include_pad)
    y = check_array(y, "y", 4, shape_hint=f" of shape (B, C, {len(rs)}, {len(cs)})")
    if y.shape[2:] != (len(rs), len(cs)):
        raise ClearmapsError(f"y has size {y.shape[2:]}; an average pool of a {H}x{W} input gives "
                             f"{(len(rs), len(cs))}.")
    out = np.zeros((*y.shape[:2], H, W), dtype=y.dtype)
    for u in range(len(rs)):
        for v in range(len(cs)):
            div = divisor_override or rn[u] * cn[v]
            out[:, :, rs[u]:re[u], cs[v]:ce[v]] += (y[:, :, u, v] / div)[:, :, None, None]
    return out


def _adaptive_windows(n, out):
    i = np.arange(out)
    return (i * n) // out, -((-(i + 1) * n) // out)  # floor(i n / out), ceil((i + 1) n / out)


def adaptive_avg_pool2d(x, output_size):
    """torch's ``adaptive_avg_pool2d``: output cell (u, v) averages rows floor(u·H/oh) .. ceil((u+1)·H/oh) - 1
    and the columns likewise. x (B, C, H, W) → (B, C, oh, ow)."""
    x = check_array(x, "x", 4, shape_hint=" of shape (B, C, H, W)")
    oh, ow = check_pair(output_size, "output_size", 1)
    (rs, re), (cs, ce) = _adaptive_windows(x.shape[2], oh), _adaptive_windows(x.shape[3], ow)
    out = np.zeros((*x.shape[:2], oh, ow), dtype=x.dtype)
    for u in range(oh):
        for v in range(ow):
            out[:, :, u, v] = x[:, :, rs[u]:re[u], cs[v]:ce[v]].mean(axis=(2, 3))
    return out


def adaptive_avg_pool2d_transpose(y, input_size):
    """The transpose of :func:`adaptive_avg_pool2d`: each value spread evenly over its window."""
    y = check_array(y, "y", 4, shape_hint=" of shape (B, C, oh, ow)")
    H, W = check_pair(input_size, "input_size", 1)
    oh, ow = y.shape[2:]
    (rs, re), (cs, ce) = _adaptive_windows(H, oh), _adaptive_windows(W, ow)
    out = np.zeros((*y.shape[:2], H, W), dtype=y.dtype)
    for u in range(oh):
        for v in range(ow):
            n = (re[u] - rs[u]) * (ce[v] - cs[v])
            out[:, :, rs[u]:re[u], cs[v]:ce[v]] += (y[:, :, u, v] / n)[:, :, None, None]
    return out


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
