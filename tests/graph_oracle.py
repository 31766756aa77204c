"""The independent oracle for networks as graphs (docs/design.md, "Networks as graphs"; issue 16).

R(x|c) = ∂E_c/∂x with E_c = ½·Σ z_L[c]², where every ReLU's backward is replaced by ReLU of the incoming
gradient and every other op's backward is ordinary autograd, all in float64 with torch autograd. It shares
nothing with clearmaps: no graph capture, no op table. Instead

- the ReLUs are found at run time by a ``TorchFunctionMode`` (``relu_rules``) that sees every torch call the
  model's forward makes: ``nn.ReLU`` modules (whose forward calls ``F.relu``), ``F.relu``, ``torch.relu``,
  ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_``, in place or not. Each is computed as usual but
  through an ``autograd.Function`` whose backward is the response method's ReLU rule; an in-place call stays
  in place (``mark_dirty``), so code that reads the tensor again sees what it would have seen;
- the class map z_L is taken from the model with forward hooks, where the architecture's *declared* head
  says (``HEADS`` in ``tests/archs.py``), not where a graph analysis would find it:

  ``("logits",)``
      z_L is the model's output, as (B, N, 1, 1): heads whose logits come out of an MLP (VGG, AlexNet,
      MobileNetV3, ConvNeXt with its LayerNorm after the pool).
  ``("feature_map", path)``
      z_L is the output of the module at ``path`` (B, N, h, w), whose global average is the logits
      (SqueezeNet's final conv + ReLU).
  ``("linear_at_positions", linear_path, features_path)`` or ``(..., features_path, "relu")``
      z_L[b, n, h, w] = W[n] · f[b, :, h, w] + bias[n], the ``nn.Linear`` at ``linear_path`` applied at every
      position of f, the output of the module at ``features_path`` (after a ReLU where the model's forward
      applies one functionally between that module and its global average pool, as DenseNet's). Since the
      global average pool is linear, the mean of z_L over positions is the model's logits.

Every other op back-propagates by torch autograd, with one exception: ``F.hardsigmoid`` (MobileNetV3's
squeeze-excitation gate), whose float64 backward in torch multiplies by 1/6 rounded to float32; the oracle
multiplies by the float64 1/6 (zero slope at ±3, as torch).

Response methods (docs/design.md, "Response methods"), as the ReLU's backward given the incoming signal g and
the ReLU's forward input x:

========================  ==========================  ==============================
method                    rectify=True                rectify=False ("linear")
========================  ==========================  ==============================
``"deconvnet"``           relu(g)                     g
``"guided"``              relu(g) · [x > 0]           g · [x > 0]
``"gradient"``            g · [x > 0] (autograd's)    refused
``"input_x_gradient"``    as gradient; R is then multiplied by the input x
========================  ==========================  ==============================

``relu_like`` says what happens to ReLU6, LeakyReLU and Hardtanh (``nn`` modules and ``F`` functions):
``"derivative"`` (default; what Captum does) keeps their autograd derivative, ``"relu"`` gives them the
method's ReLU rule above (their forward is unchanged). The gradient methods always keep the derivative.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from clearmaps.reference import ClearmapsError

METHODS = ("deconvnet", "guided", "gradient", "input_x_gradient")
RELU_LIKE = ("derivative", "relu")

# ---------------------------------------------------------------------------------------------------------
# the ReLU rules


def relu_backward_rule(method: str, rectify: bool = True):
    """The ReLU's backward as a function ``rule(g, positive)`` of the incoming signal ``g`` and the mask
    ``positive`` = [forward input > 0], for ``method`` (see the module docstring)."""
    _check_method(method, rectify)
    if method == "deconvnet":
        return (lambda g, positive: g.clamp(min=0)) if rectify else (lambda g, positive: g)
    if method == "guided" and rectify:
        return lambda g, positive: g.clamp(min=0) * positive
    return lambda g, positive: g * positive


def _check_method(method, rectify) -> None:
    if method not in METHODS:
        raise ClearmapsError(f"method={method!r}; expected one of {METHODS}.")
    if not isinstance(rectify, bool):
        raise ClearmapsError(f"rectify={rectify!r}; expected True or False.")
    if not rectify and method in ("gradient", "input_x_gradient"):
        raise ClearmapsError(f"rectify=False with method={method!r}: the gradient has no rectification to "
                             "switch off; use rectify=False with 'deconvnet' (the linear map) or 'guided'.")


def _positive(x: Tensor) -> Tensor:
    return x > 0


class _RuledOp(torch.autograd.Function):
    """An activation computed by ``forward_fn`` whose backward is ``rule(g, mask_fn(x))`` instead of its
    derivative (``mask_fn`` defaults to [x > 0]). ``inplace`` writes the result into x and marks it dirty, as
    the original in-place op does."""

    @staticmethod
    def forward(ctx, x, forward_fn, rule, inplace, mask_fn=_positive):
        y = forward_fn(x)
        ctx.rule = rule
        ctx.mask = mask_fn(x)  # before an in-place write overwrites x
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    def backward(ctx, g):
        return ctx.rule(g, ctx.mask), None, None, None, None


def _hardsigmoid_slope(x: Tensor) -> Tensor:
    return (x > -3) & (x < 3)  # torch's convention: zero slope at ±3


def _hardsigmoid_rule(g: Tensor, inside: Tensor) -> Tensor:
    # torch's float64 hardsigmoid backward multiplies by 1/6 rounded to float32 (0.16666667163...), a relative
    # error of 3e-8 that would show in 1e-10 comparisons: the oracle uses the float64 1/6
    return torch.where(inside, g / 6, 0.0)


# The calls the mode recognises: function -> (out-of-place twin taking the same arguments, always in place?)
_RELUS = {
    F.relu: (F.relu, False),
    torch.relu: (torch.relu, False),
    torch.relu_: (torch.relu, True),
    Tensor.relu: (torch.relu, False),
    Tensor.relu_: (torch.relu, True),
}
_RELU_LIKES = {
    F.relu6: (F.relu6, False),
    F.hardtanh: (F.hardtanh, False),
    F.hardtanh_: (F.hardtanh, True),
    F.leaky_relu: (F.leaky_relu, False),
    F.leaky_relu_: (F.leaky_relu, True),
}


def _split_inplace(func, args, kwargs):
    """(x, the twin's remaining args and kwargs without ``inplace``, inplace flag) of a recognised call,
    whether ``inplace`` came as a keyword or positionally."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins such as torch.relu_ have no Python signature
        params = []
    args, kwargs = list(args), dict(kwargs)
    inplace = bool(kwargs.pop("inplace", False))
    if "inplace" in params and len(args) > params.index("inplace"):
        inplace = bool(args.pop(params.index("inplace")))
    return args[0], args[1:], kwargs, inplace


class relu_rules(TorchFunctionMode):
    """Within this context, every ReLU call (module or functional, in place or not) computes its usual
    forward but back-propagates with ``relu_backward_rule(method, rectify)``; with ``relu_like="relu"`` so
    do ReLU6, LeakyReLU and Hardtanh. ``F.hardsigmoid`` (``nn.Hardsigmoid``) keeps its derivative but with
    slope 1/6 in float64 (torch's own float64 backward uses 1/6 rounded to float32). Every other torch call
    runs untouched.

    ``seen`` counts the calls replaced, by kind ("relu" or "relu_like"), so a test can tell that a model's
    ReLUs were found at all.
    """

    def __init__(self, method: str = "deconvnet", rectify: bool = True, relu_like: str = "derivative"):
        super().__init__()
        _check_method(method, rectify)
        if relu_like not in RELU_LIKE:
            raise ClearmapsError(f"relu_like={relu_like!r}; expected one of {RELU_LIKE}.")
        self.rule = relu_backward_rule(method, rectify)
        self.table = dict(_RELUS)
        if relu_like == "relu" and method not in ("gradient", "input_x_gradient"):
            self.table.update(_RELU_LIKES)
        self.seen = {"relu": 0, "relu_like": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            x, rest, kw, inplace = _split_inplace(func, args, kwargs)
            return _RuledOp.apply(x, lambda t: F.hardsigmoid(t, *rest, **kw), _hardsigmoid_rule, inplace,
                                  _hardsigmoid_slope)
        entry = self.table.get(func)
        if entry is None:
            return func(*args, **kwargs)
        twin, always_inplace = entry
        x, rest, kw, inplace = _split_inplace(func, args, kwargs)
        self.seen["relu" if func in _RELUS else "relu_like"] += 1
        return _RuledOp.apply(x, lambda t: twin(t, *rest, **kw), self.rule, inplace or always_inplace)


# ---------------------------------------------------------------------------------------------------------
# the head declaration


@dataclass(frozen=True)
class Head:
    """A parsed head declaration (see the module docstring)."""

    kind: str
    linear: str | None = None
    features: str | None = None
    then: str | None = None


_HEAD_KINDS = ("logits", "feature_map", "linear_at_positions")


def parse_head(head) -> Head:
    """Check a head declaration tuple and return it as a ``Head``."""
    if isinstance(head, Head):
        return head
    if not isinstance(head, (tuple, list)) or not head or head[0] not in _HEAD_KINDS:
        raise ClearmapsError(f"head={head!r}; expected ('logits',), ('feature_map', module_path) or "
                             "('linear_at_positions', linear_path, features_path[, 'relu']).")
    kind, rest = head[0], tuple(head[1:])
    if not all(isinstance(r, str) and r for r in rest):
        raise ClearmapsError(f"head={head!r}: module paths must be non-empty strings.")
    if kind == "logits" and not rest:
        return Head("logits")
    if kind == "feature_map" and len(rest) == 1:
        return Head("feature_map", features=rest[0])
    if kind == "linear_at_positions" and len(rest) == 2:
        return Head(kind, linear=rest[0], features=rest[1])
    if kind == "linear_at_positions" and len(rest) == 3 and rest[2] == "relu":
        return Head(kind, linear=rest[0], features=rest[1], then="relu")
    raise ClearmapsError(f"head={head!r} has the wrong arguments for {kind!r}; expected ('logits',), "
                         "('feature_map', module_path) or ('linear_at_positions', linear_path, features_path"
                         "[, 'relu']).")


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ClearmapsError(f"the head's {what} {path!r} is not a submodule of {type(model).__name__}; "
                             "expected a dotted module path such as 'fc' or 'classifier.1'.") from None


class _Tap:
    """Records a module's output as it is returned, by a forward hook. The clone keeps the value of that
    moment (a later in-place op on the module's output, such as DenseNet's F.relu(features, inplace=True),
    does not change it) while autograd still connects it to the input."""

    def __init__(self, module: nn.Module):
        self.value = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not isinstance(output, Tensor):
            raise ClearmapsError(f"{type(module).__name__} returns {type(output).__name__}; a head tap needs "
                                 "a module that returns one tensor.")
        if self.value is not None:
            raise ClearmapsError(f"the head's module ({type(module).__name__}) ran twice in one forward pass; "
                                 "declare a module that runs once.")
        self.value = output.clone()


def run_with_class_map(model: nn.Module, head, x: Tensor, rule_for_then=None) -> tuple[Tensor, Tensor]:
    """(z_L, logits) of one forward pass of ``model`` (already in the wanted dtype and mode) on ``x``.

    ``rule_for_then`` is the ReLU rule the head's own ReLU (``then="relu"``) back-propagates with; None is
    the ordinary derivative.
    """
    head = parse_head(head)
    if head.kind == "logits":
        logits = model(x)
        if logits.ndim != 2:
            raise ClearmapsError(f"head ('logits',) but the model returns shape {tuple(logits.shape)}; "
                                 "expected (B, N) logits.")
        return logits[:, :, None, None], logits
    tap = _Tap(_submodule(model, head.features, "features module"))
    try:
        logits = model(x)
    finally:
        tap.handle.remove()
    if tap.value is None:
        raise ClearmapsError(f"the head's features module {head.features!r} did not run in the forward pass.")
    f = tap.value
    if f.ndim != 4:
        raise ClearmapsError(f"the head's module {head.features!r} gives shape {tuple(f.shape)}; expected "
                             "(B, C, h, w).")
    if head.kind == "feature_map":
        return f, logits
    if head.then == "relu":
        f = _RuledOp.apply(f, torch.relu, rule_for_then or relu_backward_rule("gradient"), False)
    linear = _submodule(model, head.linear, "linear layer")
    if not isinstance(linear, nn.Linear):
        raise ClearmapsError(f"the head's linear layer {head.linear!r} is {type(linear).__name__}; "
                             "expected nn.Linear.")
    if linear.in_features != f.shape[1]:
        raise ClearmapsError(f"the head's Linear {head.linear!r} takes {linear.in_features} features but "
                             f"{head.features!r} gives {f.shape[1]} channels.")
    z = torch.einsum("bchw,nc->bnhw", f, linear.weight)
    if linear.bias is not None:
        z = z + linear.bias[None, :, None, None]
    return z, logits


# ---------------------------------------------------------------------------------------------------------
# the public entry points


def _as_float64_batch(x) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ClearmapsError(f"x is {type(x).__name__}; expected a torch tensor or NumPy array (B, C, H, W).")
    if x.ndim != 4 or not x.is_floating_point() or 0 in x.shape:
        raise ClearmapsError(f"x has shape {tuple(x.shape)} and dtype {x.dtype}; expected a non-empty float "
                             "batch (B, C, H, W).")
    if not torch.isfinite(x).all():
        raise ClearmapsError("x contains NaN or Inf; expected finite values.")
    return x.detach().to(torch.float64).cpu().clone()


def _float64_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ClearmapsError(f"model is {type(model).__name__}; expected a torch.nn.Module.")
    m = copy.deepcopy(model).to(torch.float64).eval()
    for p in m.parameters():
        p.requires_grad_(False)  # only the input gradient is wanted
    return m


def class_ids(classes, batch: int, num_classes: int) -> np.ndarray:
    """``classes`` as a (B, K) int64 array: a sequence of K ids shared by every image, or (B, K) ids."""
    try:
        ids = np.asarray(classes)
    except Exception:
        ids = None
    if ids is None or ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
        raise ClearmapsError(f"classes={classes!r}; expected K class ids (shared by the batch) or a (B, K) "
                             "integer array.")
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (batch, ids.shape[0]))
    if ids.shape[0] != batch:
        raise ClearmapsError(f"classes has {ids.shape[0]} rows for a batch of {batch}; expected (B, K).")
    if ids.min() < 0 or ids.max() >= num_classes:
        raise ClearmapsError(f"classes contains {int(ids.min())}..{int(ids.max())}; the model has "
                             f"{num_classes} classes (ids 0..{num_classes - 1}).")
    return ids.astype(np.int64)


def class_map(model: nn.Module, head, x) -> tuple[np.ndarray, np.ndarray]:
    """(z_L, logits) in float64 for the batch ``x``: z_L (B, N, h, w) as the head declares it, and the model's
    own logits (B, N). For every correct declaration z_L's mean over (h, w) equals the logits."""
    head = parse_head(head)
    m = _float64_copy(model)
    with torch.no_grad():
        z, logits = run_with_class_map(m, head, _as_float64_batch(x))
    return z.numpy(), logits.numpy()


def graph_responses(model: nn.Module, head, x, classes, *, method: str = "deconvnet", rectify: bool = True,
                    relu_like: str = "derivative") -> np.ndarray:
    """R(x|c) for every image and each of its classes: float64 (B, K, C, H, W).

    Parameters
    ----------
    model : torch.nn.Module
        Any classifier; a float64 eval-mode copy is explained (the model itself is not touched).
    head : tuple
        Where the class map z_L is (see the module docstring).
    x : torch.Tensor or numpy.ndarray
        Input batch (B, C, H, W).
    classes : sequence of int or (B, K) integer array
        The classes to explain: K ids shared by the batch, or K per image.
    method : {"deconvnet", "guided", "gradient", "input_x_gradient"}
        The ReLU rule and final factor (module docstring).
    rectify : bool
        False switches the rectification off (the linear deconvnet of Eq. 2, or guided's mask only).
    relu_like : {"derivative", "relu"}
        How ReLU6 / LeakyReLU / Hardtanh back-propagate.

    Returns
    -------
    numpy.ndarray
        R(x|c), float64 (B, K, C, H, W): the input gradient of E_c = ½ Σ_{h,w} z_L[b, c, h, w]² under the
        method's ReLU rule (times x for input_x_gradient).
    """
    head = parse_head(head)
    mode = relu_rules(method, rectify, relu_like)
    m = _float64_copy(model)
    xt = _as_float64_batch(x).requires_grad_(True)
    with mode:
        z, _ = run_with_class_map(m, head, xt, mode.rule)
    ids = class_ids(classes, xt.shape[0], z.shape[1])
    out = np.empty((xt.shape[0], ids.shape[1], *xt.shape[1:]))
    rows = torch.arange(xt.shape[0])
    for k in range(ids.shape[1]):
        # images are independent (eval mode), so one sum over the batch gives every image its own gradient
        energy = 0.5 * (z[rows, torch.from_numpy(ids[:, k])] ** 2).sum()
        (grad,) = torch.autograd.grad(energy, xt, retain_graph=k + 1 < ids.shape[1], allow_unused=True)
        if grad is None:  # the class map does not depend on the input at all
            grad = torch.zeros_like(xt)
        if method == "input_x_gradient":
            grad = grad * xt.detach()
        out[:, k] = grad.numpy()
    return out
