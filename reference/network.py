"""The networks CLEAR explains: a small DAG of typed nodes whose last node is the class map z_L.

Node i applies ``layers[i]`` (an operation of :mod:`clearmaps.reference.layers`) to the outputs of the nodes
``inputs[i]`` (-1 is the image). The last node's output is z_L, one channel per class, (N, h, w); the
logits are its global average (docs/design.md, "Networks as graphs"). The paper's form is the special case
of a chain of Conv / ReLU / MaxPool whose last Conv is the head (one kernel per class), followed by at most
one ReLU: ``Network(layers)`` with no ``inputs`` builds a chain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .errors import ClearmapsError, check_array
from .layers import (LAYER_TYPES, AdaptiveAvgPool, Activation, Add, AvgPool, Cat, Conv, Div, Expand, LayerNorm,  # noqa: F401
                     Linear, MaxPool, Mul, Pad, Permute, ReLU, Reduce, Reshape, Slice, window_output_size)

IMAGE = -1  # the index that names the network's input in ``inputs``
# sizes tried, smallest first, to learn the shapes of a network declared for any input size
_PROBE_SIZES = (8, 16, 32, 64, 128, 224, 256, 512)


def _window_output_size(size, kernel, stride, padding, what):
    return tuple(window_output_size(n, k, s, p, what=what) for n, k, s, p in zip(size, kernel, stride, padding))


@dataclass(frozen=True, eq=False)
class Network:
    """A classifier in the form CLEAR explains: a DAG of operations whose last node is the class map z_L.

    Parameters
    ----------
    layers : sequence of operations (Conv, ReLU, MaxPool, ... from :mod:`clearmaps.reference.layers`)
        One per node, in an order where every node comes after its inputs.
    class_names : sequence of str, optional
        One name per class (channel of z_L); defaults to "0", "1", ...
    input_shape : (C, H, W), optional
        The images the network takes; H and W may be None when any size works. Needed unless the first
        layer is a Conv (which says C).
    inputs : sequence of tuples of ints, optional
        ``inputs[i]``: the nodes whose outputs node i takes, in order (-1 = the image). Default: a chain,
        node i reading node i - 1.
    names : sequence of str, optional
        A readable name per node (for a converted torch module: the module path it came from).

    Examples
    --------
    The paper's form, a chain whose last Conv has one kernel per class (here 10), then a ReLU::

        Network([Conv(w1, b1, padding=1), ReLU(), MaxPool(2), Conv(w2, b2), ReLU()])

    A residual block, as a graph::

        Network([Conv(w, b, padding=1), ReLU(), Add(), Conv(w_head, b_head)],
                input_shape=(C, None, None), inputs=[(-1,), (0,), (1, -1), (2,)])
    """

    layers: tuple
    class_names: tuple = field(default=None)
    input_shape: tuple = field(default=None)
    inputs: tuple = field(default=None)
    names: tuple = field(default=None)

    def __post_init__(self):
        if self.layers is None or isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise ClearmapsError(f"layers is {type(self.layers).__name__}; expected a sequence of layers "
                                 "(Conv, ReLU, MaxPool, ...).")
        layers = tuple(self.layers)
        if not layers:
            raise ClearmapsError("the network has no layers.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LAYER_TYPES):
                raise ClearmapsError(f"layer {i} is {type(layer).__name__}; a Network holds clearmaps layers ("
                                     f"{', '.join(t.__name__ for t in LAYER_TYPES)}); convert a torch module with "
                                     "clearmaps.from_torch.")
        inputs = self._check_inputs(layers)
        names = self._check_names(layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "names", names)
        if self.is_chain_form():
            self._check_chain()
        object.__setattr__(self, "input_shape", self._check_input_shape())
        shapes = self._probe_shapes()
        z = shapes[-1]
        if len(z) != 3:
            raise ClearmapsError(f"the last node ({names[-1]}: {layers[-1]!r}) gives shape (B, {', '.join(map(str, z))}); "
                                 "it must be the class map z_L, (B, N, h, w) with one channel per class.")
        n_classes = z[0]
        cn = self.class_names
        if cn is not None and (isinstance(cn, (str, bytes)) or not hasattr(cn, "__iter__")):
            raise ClearmapsError(f"class_names is {cn!r}; expected a sequence of {n_classes} names.")
        names_ = tuple(str(i) for i in range(n_classes)) if cn is None else tuple(str(n) for n in cn)
        if len(names_) != n_classes:
            raise ClearmapsError(f"{len(names_)} class names given for a class map with {n_classes} channels; "
                                 "give one name per class.")
        if len(set(names_)) != len(names_):
            raise ClearmapsError(f"class names must be unique; got {list(names_)}.")
        object.__setattr__(self, "class_names", names_)

    # ---- validation ----
    def _check_inputs(self, layers):
        if self.inputs is None:
            return tuple((i - 1,) for i in range(len(layers)))
        inputs = tuple(tuple(int(j) for j in ins) for ins in self.inputs)
        if len(inputs) != len(layers):
            raise ClearmapsError(f"inputs has {len(inputs)} entries for {len(layers)} layers; give one tuple of "
                                 "input nodes per layer.")
        used = set()
        for i, (layer, ins) in enumerate(zip(layers, inputs)):
            want = layer.arity
            if (want is not None and len(ins) != want) or not ins:
                raise ClearmapsError(f"node {i} ({layer!r}) takes {want or 'one or more'} input(s); got {list(ins)}.")
            if any(not IMAGE <= j < i for j in ins):
                raise ClearmapsError(f"node {i} reads nodes {list(ins)}; a node reads only earlier nodes "
                                     "(or -1, the image).")
            used.update(ins)
        dead = [i for i in range(len(layers) - 1) if i not in used]
        if dead or IMAGE not in used:
            raise ClearmapsError(f"node(s) {dead or 'image'} are never used; every node but the last must feed "
                                 "another (the last is the class map).")
        return inputs

    def _check_names(self, layers):
        if self.names is None:
            return tuple(f"{type(layer).__name__.lower()}{i}" for i, layer in enumerate(layers))
        names = tuple(str(n) for n in self.names)
        if len(names) != len(layers) or len(set(names)) != len(names):
            raise ClearmapsError(f"names must give {len(layers)} unique names, one per layer.")
        return names

    def is_chain_form(self) -> bool:
        """A chain of the paper's three layer types (of any parameters)."""
        return self.sequential and all(isinstance(layer, (Conv, ReLU, MaxPool)) for layer in self.layers)

    def _check_chain(self):
        convs = [i for i, layer in enumerate(self.layers) if isinstance(layer, Conv)]
        if not convs:
            raise ClearmapsError("the network has no Conv layer; CLEAR needs a conv head with one kernel per class.")
        channels = self.layers[convs[0]].in_channels
        for i in convs:
            if self.layers[i].in_channels != channels:
                raise ClearmapsError(f"layer {i} ({self.layers[i]!r}) takes {self.layers[i].in_channels} channels "
                                     f"but the layer before gives {channels}.")
            channels = self.layers[i].out_channels

    def _check_input_shape(self):
        first = self.layers[0]
        c_in = first.in_channels if isinstance(first, Conv) and self.inputs[0] == (IMAGE,) else None
        if self.is_chain_form():
            c_in = next(layer for layer in self.layers if isinstance(layer, Conv)).in_channels
        if self.input_shape is None:
            if c_in is None:
                raise ClearmapsError("input_shape is needed: the network does not start with a Conv that says "
                                     "how many channels it takes; pass input_shape=(C, H, W) (H, W may be None).")
            return (c_in, None, None)
        shape = self.input_shape
        try:
            shape = tuple(shape)
            ok = len(shape) == 3 and all(s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                       and s >= 1) for s in shape) and shape[0] is not None
        except TypeError:
            ok = False
        if not ok or (c_in is not None and shape[0] != c_in) or (shape[1] is None) != (shape[2] is None):
            raise ClearmapsError(f"input_shape {self.input_shape!r} is not (C, H, W) of positive ints"
                                 + (f" with C = {c_in} (the first conv's channels)" if c_in else "")
                                 + "; H and W may both be None when any size works.")
        return tuple(None if s is None else int(s) for s in shape)

    def _probe_shapes(self):
        c, h, w = self.input_shape
        if h is not None:
            return self.shapes((h, w))
        last = None
        for n in _PROBE_SIZES:
            try:
                return self.shapes((n, n))
            except ClearmapsError as exc:
                last = exc
        raise ClearmapsError(f"no input size fits this network ({last}); pass input_shape=(C, H, W).")

    # ---- shapes ----
    def shapes(self, size) -> list:
        """Per-image output shape of every node for images of spatial size ``size`` (H, W)."""
        out = []
        image = (self.input_shape[0] if self.input_shape else None, *size)
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs)):
            args = [image if j == IMAGE else out[j] for j in ins]
            try:
                out.append(tuple(int(n) for n in layer.output_shape(*args)))
            except ClearmapsError as exc:
                raise ClearmapsError(f"node {i} ({self.names[i]}: {layer!r}): {exc}") from None
        return out

    def input_shapes(self, size) -> list:
        """Per-image shapes of the inputs of every node (a list of tuples per node)."""
        shapes = self.shapes(size)
        image = (self.input_shape[0], *size)
        return [[image if j == IMAGE else shapes[j] for j in ins] for ins in self.inputs]

    def layer_sizes(self, size) -> list:
        """Spatial size of every node's (first) input, then that of the class map, for images of ``size``.
        For a chain: the input size of every layer and the output size of the last."""
        shapes = self.shapes(size)
        image = (self.input_shape[0], *size)
        first = [image if ins[0] == IMAGE else shapes[ins[0]] for ins in self.inputs]
        return [tuple(s[1:]) for s in first] + [tuple(shapes[-1][1:])]

    # ---- what it is ----
    @property
    def sequential(self) -> bool:
        """Every node reads the one before it."""
        return all(ins == (i - 1,) for i, ins in enumerate(self.inputs))

    @property
    def is_chain(self) -> bool:
        """The paper's form, which the fused chain kernels handle: a chain of Conv (no groups, no dilation),
        ReLU and MaxPool (no dilation, floor mode) ending in the head conv and at most one ReLU."""
        if not self.is_chain_form():
            return False
        head = max(i for i, layer in enumerate(self.layers) if isinstance(layer, Conv))
        return self.layers[head + 1:] in ((), (ReLU(),)) and all(
            layer.plain for layer in self.layers if isinstance(layer, (Conv, MaxPool)))

    def _need_chain(self, what):
        if not self.is_chain:
            raise ClearmapsError(f"{what} is defined for a chain network (the paper's form); this one is a graph.")

    @property
    def head_index(self) -> int:
        """Index of the head conv (the last Conv) of a chain network."""
        self._need_chain("head_index")
        return max(i for i, layer in enumerate(self.layers) if isinstance(layer, Conv))

    @property
    def head(self) -> Conv:
        return self.layers[self.head_index]

    @property
    def head_relu(self) -> bool:
        return self.head_index < len(self.layers) - 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def dtype(self) -> np.dtype:
        arrays = [a for layer in self.layers for _, a in _layer_arrays(layer)]
        return np.result_type(*arrays) if arrays else np.dtype(np.float64)

    def astype(self, dtype) -> "Network":
        """The same network with every weight, bias and constant cast to ``dtype``."""
        layers = [dataclasses.replace(layer, **{k: a.astype(dtype) for k, a in _layer_arrays(layer)})
                  if list(_layer_arrays(layer)) else layer for layer in self.layers]
        return Network(layers, self.class_names, self.input_shape, self.inputs, self.names)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        shapes = self.shapes((h, w)) if h is not None else None
        rows = []
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs)):
            src = ", ".join("x" if j == IMAGE else str(j) for j in ins)
            shape = "" if shapes is None else str(shapes[i])
            mark = "   <- class map z_L" if i == len(self.layers) - 1 else ""
            rows.append((str(i), self.names[i], repr(layer), src, shape + mark))
        width = [max(len(r[k]) for r in rows) for k in range(4)]
        body = "\n".join(f"  {r[0]:>{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]:<{width[3]}}  {r[4]}"
                         for r in rows)
        size = "any size" if h is None else f"{h}x{w}"
        form = "chain" if self.sequential else "graph"
        return (f"Network({form}, input ({c}, {size}), {len(self.class_names)} classes, {len(self.layers)} nodes;"
                f" logits = mean of z_L over its positions):\n{body}")


def _layer_arrays(layer):
    """(field name, float array) of a layer's weights and constants."""
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            yield f.name, value


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
