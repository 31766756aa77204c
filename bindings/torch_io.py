"""torch modules → :class:`clearmaps.reference.Network` (docs/design.md, "Networks as graphs").

``from_torch`` captures the module's computation with ``torch.export`` (module and functional calls alike;
:mod:`clearmaps.capture` maps each Core ATen operation to a clearmaps layer), then

1. folds every eval-mode batch norm that directly follows a conv (used by nothing else) into that conv;
2. finds the class map z_L: the last node with one channel per class whose global average gives the
   logits, looking through linear operations. A GAP → Linear head (ResNet, DenseNet, MobileNetV2, ...)
   becomes the Linear applied at every position (a 1×1 conv, bias included: exact, since averaging is
   linear); a conv + ReLU before the GAP (SqueezeNet) is z_L as it stands; where the logits come out of a
   nonlinear classifier (VGG, AlexNet: an MLP), z_L is the logits themselves, (N, 1, 1);
3. checks the converted network against the module on a probe batch and refuses any disagreement.
"""

from __future__ import annotations

import numpy as np

from .reference import ClearmapsError, Network
from .reference import layers as L
from .reference.graph import REFERENCE_OPS
from .reference.rules import FORWARD

# operations that may stand between z_L and the logits: affine, so that they commute with averaging
# when the test in _class_map says so
_LINEAR = (L.Linear, L.Affine, L.Reshape, L.Reduce, L.AdaptiveAvgPool, L.AvgPool, L.Permute)
# operations whose output size depends on the input size: a graph holding one takes only its capture size
_SIZE_BOUND = (L.Reshape, L.Slice, L.Expand, L.Linear, L.LayerNorm, L.Permute)


def _torch():
    try:
        import torch
        from torch import nn
    except ImportError:  # pragma: no cover - torch is a dependency
        raise ClearmapsError("torch is needed to read torch modules and checkpoints: pip install torch") from None
    return torch, nn


# ---- graph surgery on the captured node list ----------------------------------------------------------------

class _Graph:
    """Nodes (layer, inputs, name, source) under rewriting; ``output`` is the logits node."""

    def __init__(self, captured):
        self.nodes = [list(n) for n in captured.nodes]
        self.output = captured.output
        self.image = captured.image_shape
        self.removed = set()

    def consumers(self):
        count = {}
        for i, n in enumerate(self.nodes):
            if i not in self.removed:
                for j in n[1]:
                    count[j] = count.get(j, 0) + 1
        return count

    def bypass(self, i, by):
        """Remove node i; whatever read it reads ``by`` instead."""
        self.removed.add(i)
        for n in self.nodes:
            n[1] = tuple(by if j == i else j for j in n[1])
        if self.output == i:
            self.output = by

    def shapes(self):
        out = {}
        for i, (layer, ins, name, _) in enumerate(self.nodes):
            if i not in self.removed:
                out[i] = tuple(layer.output_shape(*(self.image if j == -1 else out[j] for j in ins)))
        return out

    def network(self, class_names, input_shape) -> Network:
        keep = [i for i in range(len(self.nodes)) if i not in self.removed and self._needed(i)]
        index = {old: new for new, old in enumerate(keep)}
        index[-1] = -1
        layers = [self.nodes[i][0] for i in keep]
        inputs = [tuple(index[j] for j in self.nodes[i][1]) for i in keep]
        names = [self.nodes[i][2] for i in keep]
        return Network(layers, class_names, input_shape, inputs, names)

    def _needed(self, i):
        if not hasattr(self, "_ancestors"):
            seen, stack = set(), [self.output]
            while stack:
                j = stack.pop()
                if j >= 0 and j not in seen:
                    seen.add(j)
                    stack.extend(self.nodes[j][1])
            self._ancestors = seen
        return i in self._ancestors


def _fold_batch_norms(g: _Graph) -> None:
    """An Affine per channel right after a Conv that feeds nothing else is folded into the conv's weights."""
    consumers = g.consumers()
    for i, (layer, ins, name, _) in enumerate(g.nodes):
        if i in g.removed or not isinstance(layer, L.Affine) or ins[0] < 0:
            continue
        conv = g.nodes[ins[0]][0]
        if not isinstance(conv, L.Conv) or consumers.get(ins[0], 0) != 1:
            continue
        o = conv.out_channels
        per_channel = all(a is None or (a.ndim == 3 and a.shape[1:] == (1, 1) and a.shape[0] in (1, o))
                          for a in (layer.scale, layer.shift))
        if not per_channel:
            continue
        scale = np.ones(o) if layer.scale is None else np.broadcast_to(layer.scale.reshape(-1), (o,))
        shift = np.zeros(o) if layer.shift is None else np.broadcast_to(layer.shift.reshape(-1), (o,))
        g.nodes[ins[0]][0] = L.Conv(conv.weight * scale[:, None, None, None], conv.bias * scale + shift,
                                    conv.stride, conv.padding, conv.dilation, conv.groups)
        g.nodes[ins[0]][2] = f"{g.nodes[ins[0]][2]}+{name.rsplit('.', 1)[-1]}"
        g.bypass(i, ins[0])


def _run_chain(g: _Graph, chain, u):
    for i in chain:
        u, _ = FORWARD[type(g.nodes[i][0])](g.nodes[i][0], REFERENCE_OPS, u)
    return u.reshape(u.shape[0], -1)


def _factor_through_mean(g: _Graph, chain, shape):
    """If the affine ``chain`` (node ids in order) maps a map u of per-image ``shape`` (C, h, w) to a function of
    u's spatial mean alone, its matrix W (N, C) and offset b (N,): then chain(u) = W · mean(u) + b, and
    W · u[:, y, x] + b at every position is a class map whose average gives the logits. Else None."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, *shape))
    mean = np.broadcast_to(u.mean(axis=(2, 3), keepdims=True), u.shape)
    try:
        got, want = _run_chain(g, chain, u), _run_chain(g, chain, np.ascontiguousarray(mean))
    except ClearmapsError:
        return None
    if not np.allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(want).max()))):
        return None
    C = shape[0]
    b = _run_chain(g, chain, np.zeros((1, *shape)))[0]
    W = np.empty((b.size, C))
    step = max(1, (32 << 20) // (8 * int(np.prod(shape))))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        basis = np.zeros((c1 - c0, *shape))
        basis[np.arange(c1 - c0), np.arange(c0, c1)] = 1.0
        W[:, c0:c1] = (_run_chain(g, chain, basis) - b).T
    return W, b


def _class_map(g: _Graph) -> str:
    """Make the graph end at z_L (see the module docstring); returns how z_L was found, for ``repr``."""
    shapes = g.shapes()
    consumers = g.consumers()
    chain, n = [], g.output
    while (n >= 0 and isinstance(g.nodes[n][0], _LINEAR) and (n == g.output or consumers.get(n, 0) == 1)):
        chain.append(n)
        n = g.nodes[n][1][0]
    chain.reverse()  # in forward order: chain[0] reads n
    for k in range(len(chain)):
        u = g.nodes[chain[k]][1][0]
        shape = g.image if u == -1 else shapes[u]
        if u == -1 or len(shape) != 3:
            continue
        found = _factor_through_mean(g, chain[k:], shape)
        if found is None:
            continue
        W, b = found
        for i in chain[k:]:
            g.removed.add(i)
        if W.shape[0] == W.shape[1] and np.abs(W - np.eye(W.shape[0])).max() < 1e-12 and np.abs(b).max() < 1e-12:
            g.output = u
            return "the map whose global average is the logits"
        name = g.nodes[chain[-1]][2] + " (per position)"
        g.nodes.append([L.Conv(W[:, :, None, None], b), (u,), name, g.nodes[chain[-1]][3]])
        g.output = len(g.nodes) - 1
        return "the classifier's affine head applied at every position (a 1×1 conv)"
    out = shapes[g.output]
    if len(out) == 3:
        return "the module's output map (its global average is the logits)"
    if len(out) != 1:
        raise ClearmapsError(f"the module returns per-image shape {out}; expected class scores (N,) or a class map "
                             "(N, h, w).")
    g.nodes.append([L.Reshape((out[0], 1, 1)), (g.output,), "logits as a 1x1 class map", ""])
    g.output = len(g.nodes) - 1
    return "the logits (the classifier after the last feature map is not linear)"


# ---- from_torch --------------------------------------------------------------------------------------------

def _first_channels(module, nn):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ClearmapsError("the module has no Conv2d to say how many channels its images have; pass "
                         "input_shape=(C, H, W).")


def _probe_sizes(module, channels, torch, device, dtype):
    sizes = ([(28, 28)] if channels == 1 else []) + [(32, 32), (64, 64), (224, 224)]
    last = None
    for size in sizes:
        try:
            with torch.no_grad():
                module(torch.zeros(2, channels, *size, device=device, dtype=dtype))
            return size
        except Exception as exc:  # any failure means this size does not fit; the last reason is reported
            last = exc
    raise ClearmapsError(f"the module ran on none of the probe sizes {sizes} ({type(last).__name__}: "
                         f"{str(last)[:200]}); pass input_shape=(C, H, W) of the images it takes.")


def from_torch(module, class_names=None, input_shape=None, check: bool = True, relu_like: str = "derivative") -> Network:
    """Convert a torch classifier to a :class:`Network`.

    Parameters
    ----------
    module : torch.nn.Module
        Any classifier whose forward ``torch.export`` can trace (module and functional calls, residual
        additions, concatenations, channel shuffles, MLP heads); it is captured in eval mode. Every
        operation must be one clearmaps models (``clearmaps.capture.SUPPORTED``); anything else is refused
        with its name and where it came from.
    class_names : sequence of str, optional
    input_shape : (C, H, W), optional
        The images the module takes (the capture's size). Default: C from its first Conv2d and the first
        of 28×28 (one channel), 32×32, 64×64, 224×224 it runs on. A network whose operations all work at
        any size (convolutions, pools, residual additions: most CNNs once their head is a 1×1 conv) then
        takes any size; one with size-bound operations (flatten into a Linear, a channel shuffle's view)
        takes the captured size only, as ``repr(net)`` shows.
    check : bool
        Run module and converted network on a probe batch and refuse a mismatch (default True).
    relu_like : "derivative" or "relu"
        How ReLU6 / hardtanh and LeakyReLU pass a signal back: by their derivative at the forward point
        (default, as autograd and Captum do) or by the response method's ReLU rule (the deconvnet then
        rectifies there too).
    """
    torch, nn = _torch()
    from .capture import capture

    if not isinstance(module, nn.Module):
        raise ClearmapsError(f"from_torch expects a torch.nn.Module; got {type(module).__name__}.")
    if relu_like not in ("derivative", "relu"):
        raise ClearmapsError(f"relu_like={relu_like!r}; expected 'derivative' or 'relu'.")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if input_shape is not None:
        try:
            c, h, w = input_shape
        except (TypeError, ValueError):
            raise ClearmapsError(f"input_shape {input_shape!r}; expected (C, H, W).") from None
        if h is None or w is None:
            h, w = _probe_sizes(module, int(c), torch, device, dtype)
        size = (int(h), int(w))
    else:
        c = _first_channels(module, nn)
        size = _probe_sizes(module, c, torch, device, dtype)
    example = torch.randn(2, int(c), *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    captured = capture(module, example)
    g = _Graph(captured)
    if relu_like == "relu":
        for n in g.nodes:
            if isinstance(n[0], L.Activation) and n[0].kind in L.RELU_LIKE:
                n[0] = L.Activation(n[0].kind, n[0].params, relu_rule=True)
    _fold_batch_norms(g)
    _class_map(g)
    bound = any(isinstance(n[0], _SIZE_BOUND) for i, n in enumerate(g.nodes) if i not in g.removed and g._needed(i))
    shape = (int(c), *size) if bound else (int(c), None, None)
    net = g.network(class_names, shape)
    if check:
        verify(module, net, captured.softmax, size)
    return net


def verify(module, net: Network, softmax=None, size=None, rtol: float = 1e-4) -> None:
    """Run ``module`` and ``net`` on one random probe batch (3 images, not the capture's 2) and refuse the
    conversion if their outputs differ by more than ``rtol`` (relative norm)."""
    torch, nn = _torch()
    from . import torch_forward

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    size = size or net.input_shape[1:]
    x = torch.randn(3, net.in_channels, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            got = module(x.to(device=device, dtype=dtype)).double().cpu()
    except Exception as exc:
        raise ClearmapsError(f"running the torch module on a probe input of shape {tuple(x.shape)} failed "
                             f"({type(exc).__name__}: {str(exc)[:200]}).") from None
    finally:
        module.train(was_training)
    want = torch_forward.logits(net, x.float()).double()  # float32: fast on every kind of conv
    if got.ndim == 4:  # a module that stops at its class map
        got = got.mean(dim=(2, 3))
    if softmax == "softmax":
        want = torch.softmax(want, 1)
    elif softmax == "log_softmax":
        want = torch.log_softmax(want, 1)
    if got.shape != want.shape:
        raise ClearmapsError(f"the torch module returns shape {tuple(got.shape)} but the converted network gives "
                             f"{tuple(want.shape)}.")
    err = float((got - want).norm() / max(float(want.norm()), 1e-12))
    if not err <= rtol:
        raise ClearmapsError(f"the converted network disagrees with the torch module on a probe input (relative "
                             f"error {err:.2e}); please report this model: an operation was captured wrongly.")
