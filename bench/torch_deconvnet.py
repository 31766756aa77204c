"""A plain-torch deconvnet: the baseline a user would write with torch.nn.functional alone.

One forward pass with ``max_pool2d(return_indices=True)`` records the switches; then all B×K (image, class)
signals travel back as ONE batch: the head's kernel c transposes z_L[:, c] (a grouped transposed conv, one
group per signal), and below it ``relu`` / ``max_unpool2d`` / ``conv_transpose2d``. Where pooling windows
overlap, ``max_unpool2d`` would overwrite instead of add, so those pools unpool with ``scatter_add``.
Channel reduction, dominant class and the colour composite are done in torch too.

It runs on any device and dtype: float64 on the CPU is the harness's oracle for cases too big for the
NumPy reference (it is checked against the reference first).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clearmaps.reference import Conv, MaxPool, Network


class TorchDeconvnet:
    """CLEAR maps of ``net`` with torch ops on ``device`` in ``dtype``."""

    def __init__(self, net: Network, dtype=torch.float32, device="cpu"):
        self.net = net
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = []
        for layer in net.layers:
            if isinstance(layer, Conv):
                self.layers.append(("conv", torch.tensor(np.asarray(layer.weight), dtype=dtype, device=device),
                                    torch.tensor(np.asarray(layer.bias), dtype=dtype, device=device),
                                    layer.stride, layer.padding))
            elif isinstance(layer, MaxPool):
                self.layers.append(("pool", layer.kernel, layer.stride, layer.padding))
            else:
                self.layers.append(("relu",))

    def forward(self, x):
        """(z_L, sizes, switches) of a torch batch x."""
        sizes, switches = [], {}
        for i, layer in enumerate(self.layers):
            sizes.append(tuple(x.shape[2:]))
            if layer[0] == "conv":
                x = F.conv2d(x, layer[1], layer[2], layer[3], layer[4])
            elif layer[0] == "relu":
                x = F.relu(x)
            else:
                x, switches[i] = F.max_pool2d(x, layer[1], layer[2], layer[3], return_indices=True)
        sizes.append(tuple(x.shape[2:]))
        return x, sizes, switches

    def responses(self, x, classes, rectify: bool = True, reduce: str = "sum", switches=None):
        """r(x|c), (B, K, H, W), and the logits (B, N); classes is a (B, K) int64 tensor. ``switches``
        ({pool layer: int64 tensor}) replaces the forward pass's own (to follow another forward's ties)."""
        z, sizes, own = self.forward(x)
        switches = own if switches is None else switches
        B, K = classes.shape
        head_i = self.net.head_index
        _, w, _, stride, padding = self.layers[head_i]
        # G_L^c z_L for every (image, class) pair as one grouped transposed conv: group g = b*K + k
        zc = torch.gather(z, 1, classes[:, :, None, None].expand(B, K, *z.shape[2:])).reshape(1, B * K, *z.shape[2:])
        wc = w[classes.reshape(-1)]                                   # (B*K, I, kh, kw)
        signal = F.conv_transpose2d(zc, wc, None, stride, padding, _output_padding(
            z.shape[2:], sizes[head_i], w.shape[2:], stride, padding), groups=B * K)
        signal = signal.reshape(B * K, w.shape[1], *signal.shape[2:])
        for i in range(head_i - 1, -1, -1):
            layer = self.layers[i]
            if layer[0] == "relu":
                if rectify:
                    signal = F.relu(signal)
            elif layer[0] == "pool":
                idx = switches[i].repeat_interleave(K, dim=0)
                kernel, pstride, ppad = layer[1:]
                if pstride[0] >= kernel[0] and pstride[1] >= kernel[1]:
                    signal = F.max_unpool2d(signal, idx, kernel, pstride, ppad, output_size=sizes[i])
                else:  # overlapping windows can share a switch: values must add
                    n, c = signal.shape[:2]
                    plane = signal.new_zeros(n, c, sizes[i][0] * sizes[i][1])
                    plane.scatter_add_(2, idx.reshape(n, c, -1), signal.reshape(n, c, -1))
                    signal = plane.reshape(n, c, *sizes[i])
            else:
                _, w, _, stride, padding = layer
                signal = F.conv_transpose2d(signal, w, None, stride, padding, _output_padding(
                    signal.shape[2:], sizes[i], w.shape[2:], stride, padding))
        signal = signal.reshape(B, K, *signal.shape[1:])
        if reduce == "sum":
            r = signal.sum(dim=2)
        elif reduce == "max":
            r = signal.amax(dim=2)
        else:
            r = signal.square().sum(dim=2).sqrt()
        return r, z.mean(dim=(2, 3))

    def __call__(self, x, classes, rectify: bool = True, reduce: str = "sum"):
        """(responses, dominant index, dominant response, rgb uint8 (B, H, W, 3))."""
        r, _ = self.responses(x, classes, rectify, reduce)
        response, index = r.max(dim=1)  # torch returns the first maximum's index, like NumPy
        return r, index, response, compose(index, response, classes.shape[1])


def _output_padding(in_size, out_size, kernel, stride, padding):
    return tuple(o - ((i - 1) * s - 2 * p + k) for i, o, k, s, p in zip(in_size, out_size, kernel, stride, padding))


def compose(index, response, num_maps: int):
    """Eq. 6 in torch: default palette (hue k/K), S = 1, V = D / the image's max of D, bytes round half up."""
    B = response.shape[0]
    level = response.reshape(B, -1).amax(dim=1).clamp(min=0).reshape(B, 1, 1)
    v = torch.where(level > 0, response.clamp(min=0) / torch.where(level > 0, level, 1), 0)
    v = torch.minimum(v, torch.ones_like(v))
    h6 = index.to(v.dtype) * (6.0 / num_maps)
    sector = torch.floor(h6)
    f = h6 - sector
    q, t, p = v * (1 - f), v * f, torch.zeros_like(v)
    sector = sector.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = torch.zeros(*v.shape, 3, dtype=v.dtype, device=v.device)
    for s, (r, g, b) in enumerate(choices):
        m = sector == s
        rgb[..., 0] = torch.where(m, r, rgb[..., 0])
        rgb[..., 1] = torch.where(m, g, rgb[..., 1])
        rgb[..., 2] = torch.where(m, b, rgb[..., 2])
    return torch.floor(rgb * 255 + 0.5).to(torch.uint8)
