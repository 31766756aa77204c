"""The networks CLEAR explains: an ordered list of Conv / ReLU / MaxPool layers whose last Conv is the head.

The head conv has one kernel per class (the paper's "last layer with K = N kernels"); it may be followed by
a ReLU, and global average pooling of its output gives the logits (DESIGN.md, "Network").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ClearmapsError, check_array, check_pair


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution (cross-correlation, as in torch): zero padding, dilation 1, groups 1.

    ``weight`` has shape (out_channels, in_channels, kh, kw); ``bias`` shape (out_channels,).
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self):
        w = check_array(self.weight, "Conv.weight", 4, shape_hint=" of shape (out, in, kh, kw)")
        b = check_array(self.bias, "Conv.bias", 1, shape_hint=" of shape (out,)")
        if min(w.shape) < 1:
            raise ClearmapsError(f"Conv.weight has shape {w.shape}; every dimension must be at least 1.")
        if b.shape != (w.shape[0],):
            raise ClearmapsError(f"Conv.bias has shape {b.shape}; expected ({w.shape[0]},) to match "
                                 f"Conv.weight of shape {w.shape}.")
        stride = check_pair(self.stride, "Conv.stride", 1)
        padding = check_pair(self.padding, "Conv.padding", 0)
        w = w.copy()
        b = b.copy()
        w.flags.writeable = False
        b.flags.writeable = False
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", padding)

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return _window_output_size(size, self.kernel, self.stride, self.padding, "Conv")

    def __repr__(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"Conv({i}->{o}, kernel=({kh}, {kw}), stride={self.stride}, padding={self.padding})"


@dataclass(frozen=True)
class ReLU:
    """max(x, 0). In the back-projection it becomes the deconvnet's rectification."""

    def __repr__(self) -> str:
        return "ReLU()"


@dataclass(frozen=True)
class MaxPool:
    """Max pooling with -inf padding, as torch's MaxPool2d (dilation 1, floor mode).

    Windows may overlap (stride < kernel); the padding must be at most half the kernel, as in torch.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)

    def __post_init__(self):
        kernel = check_pair(self.kernel, "MaxPool.kernel", 1)
        stride = kernel if self.stride is None else check_pair(self.stride, "MaxPool.stride", 1)
        padding = check_pair(self.padding, "MaxPool.padding", 0)
        if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
            raise ClearmapsError(f"MaxPool.padding {padding} is more than half the kernel {kernel}; "
                                 "a window could then hold only padding.")
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", padding)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return _window_output_size(size, self.kernel, self.stride, self.padding, "MaxPool")


Layer = Conv | ReLU | MaxPool


def _window_output_size(size, kernel, stride, padding, what):
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding))
    if min(out) < 1:
        raise ClearmapsError(f"{what} with kernel {kernel}, stride {stride}, padding {padding} has no output "
                             f"for an input of size {tuple(size)}; the input is too small for this network.")
    return out


@dataclass(frozen=True, eq=False)
class Network:
    """A fully convolutional classifier in the form CLEAR explains.

    Parameters
    ----------
    layers : sequence of Conv, ReLU, MaxPool
        Applied in order. The last Conv is the head (one kernel per class); at most one ReLU may follow it.
        Global average pooling of the head's output gives the logits.
    class_names : sequence of str, optional
        One name per head kernel; defaults to "0", "1", ...
    input_shape : (C, H, W), optional
        The channels the network takes; H and W may be None when any size works.
    """

    layers: tuple
    class_names: tuple = field(default=None)
    input_shape: tuple = field(default=None)

    def __post_init__(self):
        layers = tuple(self.layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, (Conv, ReLU, MaxPool)):
                raise ClearmapsError(f"layer {i} is {type(layer).__name__}; a Network holds only "
                                     "Conv, ReLU and MaxPool (see clearmaps.from_torch for conversion).")
        convs = [i for i, layer in enumerate(layers) if isinstance(layer, Conv)]
        if not convs:
            raise ClearmapsError("the network has no Conv layer; CLEAR needs a conv head with one kernel per class.")
        head = convs[-1]
        tail = layers[head + 1:]
        if tail not in ((), (ReLU(),)):
            raise ClearmapsError(f"after the head conv (layer {head}) come {list(tail)}; only one ReLU may "
                                 "follow it (global average pooling is implied).")
        channels = layers[convs[0]].in_channels
        for i in convs:
            if layers[i].in_channels != channels:
                raise ClearmapsError(f"layer {i} ({layers[i]!r}) takes {layers[i].in_channels} channels but "
                                     f"the layer before gives {channels}.")
            channels = layers[i].out_channels
        n_classes = layers[head].out_channels
        names = tuple(str(i) for i in range(n_classes)) if self.class_names is None else tuple(
            str(n) for n in self.class_names)
        if len(names) != n_classes:
            raise ClearmapsError(f"{len(names)} class names given for a head conv with {n_classes} kernels; "
                                 "give one name per class.")
        if len(set(names)) != len(names):
            raise ClearmapsError(f"class names must be unique; got {list(names)}.")
        c_in = layers[convs[0]].in_channels
        shape = (c_in, None, None) if self.input_shape is None else tuple(self.input_shape)
        if len(shape) != 3 or shape[0] != c_in:
            raise ClearmapsError(f"input_shape {self.input_shape!r} does not fit the first conv, which takes "
                                 f"{c_in} channels; expected (C, H, W) with C = {c_in}.")
        shape = (c_in, *(None if s is None else int(s) for s in shape[1:]))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "input_shape", shape)
        if None not in shape:
            self.layer_sizes(shape[1:])  # refuses networks whose declared input is too small

    @property
    def head_index(self) -> int:
        """Index of the head conv in ``layers``."""
        return max(i for i, layer in enumerate(self.layers) if isinstance(layer, Conv))

    @property
    def head(self) -> Conv:
        return self.layers[self.head_index]

    @property
    def head_relu(self) -> bool:
        return self.head_index < len(self.layers) - 1

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*(layer.weight for layer in self.layers if isinstance(layer, Conv)))

    def layer_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Spatial input size of every layer, then the output size of the last, for an input of ``size``."""
        sizes = [tuple(size)]
        for layer in self.layers:
            sizes.append(layer.output_size(sizes[-1]) if isinstance(layer, (Conv, MaxPool)) else sizes[-1])
        return sizes

    def astype(self, dtype) -> "Network":
        """The same network with weights and biases cast to ``dtype``."""
        layers = [Conv(layer.weight.astype(dtype), layer.bias.astype(dtype), layer.stride, layer.padding)
                  if isinstance(layer, Conv) else layer for layer in self.layers]
        return Network(layers, self.class_names, self.input_shape)

    def __repr__(self) -> str:
        body = ",\n  ".join(repr(layer) for layer in self.layers)
        return (f"Network(input_shape={self.input_shape}, classes={len(self.class_names)}, layers=[\n  {body}\n])")


def check_input(net: Network, x, name: str = "x") -> np.ndarray:
    """Validate a batch of images for ``net``: shape (B, C, H, W), float, finite, B ≥ 1, big enough."""
    c, h, w = net.input_shape
    hint = f" of shape (B, {c}, H, W)" if h is None else f" of shape (B, {c}, {h}, {w})"
    if getattr(x, "ndim", None) == 3:
        hint += f" (for one image of shape {tuple(x.shape)}, add a batch axis: {name}[None])"
    x = check_array(x, name, 4, shape_hint=hint)
    if x.shape[0] == 0:
        raise ClearmapsError(f"{name} is an empty batch (shape {x.shape}); expected at least one image.")
    if x.shape[1] != c:
        raise ClearmapsError(f"{name} has {x.shape[1]} channels (shape {x.shape}); the network takes {c}"
                             f"{' (grayscale)' if c == 1 else ' (RGB)' if c == 3 else ''}: expected{hint}.")
    if h is not None and x.shape[2:] != (h, w):
        raise ClearmapsError(f"{name} has size {x.shape[2]}x{x.shape[3]}; the network was built for {h}x{w}: "
                             f"resize the images to {h}x{w}.")
    net.layer_sizes(x.shape[2:])
    return x
