"""A torch module's computation as clearmaps nodes, captured with ``torch.export``.

``torch.export`` traces the module's forward (module calls and functional calls alike) into a graph of
Core ATen operations; this module maps each one to a clearmaps layer (:mod:`clearmaps.reference.layers`),
keeping the module path and source line it came from. Computations on weights alone (a transposed Linear
weight) are done here, once. The batch axis is exported as dynamic, so views that keep it stay views of
each image; every other size is the one the module was captured at.

What comes out is the raw graph: :func:`clearmaps.torch_io.from_torch` then folds batch norms, finds the
class map z_L and builds the :class:`~clearmaps.reference.Network`.
"""

from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .capture_ops import HANDLERS
from .reference import ClearmapsError

A = torch.ops.aten

# composite operations kept whole instead of decomposed, so that each keeps its own backward formula
# (torch's hardswish backward is not that of its decomposition at x = ±3) and Linear stays one operation
_KEEP = ("linear", "hardswish", "hardsigmoid", "silu", "mish", "hardswish_", "hardsigmoid_", "silu_", "mish_")

SUPPORTED = ("conv2d (stride, padding, dilation, groups), batch norm (eval), ReLU (module or functional, in "
             "place or not), ReLU6 / hardtanh, LeakyReLU, ELU, sigmoid, tanh, SiLU, GELU, Hardswish, "
             "Hardsigmoid, Mish, max pool (padding, dilation, ceil_mode), average pool, adaptive average pool, "
             "mean / sum over axes, add / sub / mul / div (tensors or constants), cat, split / chunk / slice / "
             "select, view / reshape / flatten / squeeze / unsqueeze, permute / transpose, expand, constant pad, "
             "linear / addmm / mm, layer norm, dropout and identities (removed), softmax at the output")


@dataclass
class Captured:
    """The lowered graph: ``nodes`` in topological order, each (layer, inputs, name, source); the output node;
    the per-image shape of every node; and whether the output went through a softmax (dropped)."""

    nodes: list = field(default_factory=list)
    output: int = -1
    shapes: list = field(default_factory=list)
    softmax: str = None
    image_shape: tuple = None


class _Batch:
    """The symbolic batch size (``x.size(0)``)."""


def _where(node) -> tuple[str, str, bool]:
    """(module path, 'file:line', whether the path is a torch.nn leaf module) of an exported node, for names
    and errors."""
    stack = node.meta.get("nn_module_stack") or {}
    path, leaf = "", False
    for value in stack.values():
        if isinstance(value, tuple) and value and isinstance(value[0], str) and not value[0].startswith("_empty"):
            path = value[0]
            kind = value[1] if len(value) > 1 else ""
            leaf = (getattr(kind, "__module__", "") if not isinstance(kind, str) else kind).startswith("torch.nn.modules")
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    # the user's line, not the torch code it called (torch/nn/modules/...)
    own = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")]
    source = f"{own[-1][0]}:{own[-1][1]}" if own else ""
    return path, source, leaf


def _op_name(op) -> str:
    return getattr(op, "__name__", str(op)).split(".")[0]


def _describe(node) -> str:
    path, source, _ = _where(node)
    target = _op_name(node.target)
    original = node.meta.get("original_aten")
    if original is not None and _op_name(original) != target:  # say what the user wrote, not its decomposition
        target = f"{_op_name(original)}' (as '{target}')"
    else:
        target = f"{target}'"
    return f"'{target}" + (f" in module '{path}'" if path else "") + (f" ({source})" if source else "")


def export(module, example: torch.Tensor):
    """``torch.export`` of ``module`` on ``example`` with a dynamic batch axis, decomposed to Core ATen
    (except the operations in _KEEP). A module export cannot capture gets the exporter's reason."""
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices are not the user's business
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export raises many types; the user needs its first line, not its traceback
        reason = " ".join(str(exc).strip().split("\n")[0].split())[:400]
        raise ClearmapsError(f"torch.export could not capture the module ({type(exc).__name__}: {reason}). "
                             "clearmaps needs a forward pass that torch.export can trace: no data-dependent "
                             "control flow, one tensor in and one tensor out, every image treated alike.") from None
    table = torch.export.default_decompositions()
    for name in _KEEP:
        op = getattr(A, name, None)
        if op is not None:
            table.pop(op.default, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return program.run_decompositions(table)


class _Lowering:
    def __init__(self, program):
        self.program = program
        self.out = Captured()
        self.values = {}
        self.names = set()

    # ---- helpers ----
    def add(self, layer, inputs, node, suffix=""):
        path, source, leaf = _where(node)
        op = suffix or getattr(node.target, "__name__", "op").split(".")[0]
        # a torch.nn module's own operation is named by its path ("layer1.0.conv1"); a functional call
        # inside a module's forward by that module and the operation ("layer1.0:add")
        base = path if leaf and path else (path + ":" if path else "") + op
        name, k = base, 2
        while name in self.names:
            name, k = f"{base}#{k}", k + 1
        self.names.add(name)
        self.out.nodes.append((layer, tuple(inputs), name, source))
        return ("node", len(self.out.nodes) - 1)

    def refuse(self, node, why):
        raise ClearmapsError(f"{_describe(node)} {why} Supported: {SUPPORTED}.")

    def val(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.val(a) for a in arg)
        return arg

    @staticmethod
    def is_node(v):
        return isinstance(v, tuple) and len(v) == 2 and v[0] == "node"

    def shape(self, node) -> tuple:
        """Per-image shape of an exported node's value; its batch axis must be the symbolic batch."""
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            self.refuse(node, "does not give a tensor.")
        if v.ndim == 0 or not isinstance(v.shape[0], torch.SymInt):
            self.refuse(node, f"gives shape {tuple(v.shape)}, which mixes the images of a batch (its first axis "
                              "is not the batch); clearmaps explains each image alone.")
        try:
            return tuple(int(n) for n in v.shape[1:])
        except (TypeError, ValueError):
            self.refuse(node, f"gives shape {tuple(v.shape)} with a size that depends on the batch.")

    def const_array(self, t, node) -> np.ndarray:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool)):
            self.refuse(node, f"uses a constant of dtype {t.dtype}.")
        return t.detach().to("cpu", torch.float64).numpy().copy()

    def per_image_const(self, c, full_rank, node) -> np.ndarray:
        """A constant operand as an array that broadcasts over one image (the batch axis dropped)."""
        a = self.const_array(c, node)
        if a.ndim == full_rank:
            if a.shape[0] != 1:
                self.refuse(node, f"combines the images with a constant of shape {a.shape} that differs per image.")
            a = a[0]
        return a

    def dim(self, d, rank, node) -> int:
        d = d + rank if d < 0 else d
        if d == 0:
            self.refuse(node, "works along the batch axis; clearmaps explains each image alone.")
        return d

    # ---- the walk ----
    def run(self):
        sig = self.program.graph_signature
        consts = {}
        for spec in sig.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER"):
                consts[spec.arg.name] = self.program.state_dict[spec.target] if spec.target in \
                    self.program.state_dict else self.program.constants[spec.target]
            elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                consts[spec.arg.name] = self.program.constants[spec.target]
        users = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        if len(users) != 1:
            raise ClearmapsError(f"the module takes {len(users)} tensor inputs; clearmaps explains modules with "
                                 "one image batch as input.")
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name == users[0]:
                    self.values[node] = ("node", -1)
                    v = node.meta["val"]
                    self.out.image_shape = tuple(int(n) for n in v.shape[1:])
                else:
                    self.values[node] = ("const", consts[node.name])
            elif node.op == "call_function":
                self.values[node] = self.call(node)
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (list, tuple)) else (outs,)
                if len(outs) != 1:
                    raise ClearmapsError(f"the module returns {len(outs)} values; clearmaps needs a classifier "
                                         "that returns one tensor of class scores (in eval mode).")
                v = self.val(outs[0])
                if isinstance(v, tuple) and v[0] == "softmax":
                    self.out.softmax, v = v[1], v[2]
                if not self.is_node(v) or v[1] < 0:
                    raise ClearmapsError("the module's output does not depend on its input image.")
                self.out.output = v[1]
            else:
                raise ClearmapsError(f"the exported graph holds a '{node.op}' node ({node.target}); clearmaps "
                                     "lowers only plain operator graphs.")
        return self.out

    def call(self, node):
        target = node.target
        args = [self.val(a) for a in node.args]
        kwargs = {k: self.val(v) for k, v in node.kwargs.items()}
        if target is operator.getitem:
            seq, i = args
            if isinstance(seq, tuple) and seq and seq[0] == "tuple":
                item = seq[1][i]
                if item is None:
                    self.refuse(node, "uses an output clearmaps does not model (pooling indices, batch statistics).")
                return item(node) if callable(item) else item
            self.refuse(node, "indexes something clearmaps does not model.")
        if target in (A.sym_size.int,):
            if args[1] == 0 and self.is_node(args[0]):
                return ("batch", _Batch)
            self.refuse(node, "asks a size that is not the batch (sizes other than the batch are fixed).")
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" and \
                target.name().startswith(("aten::_assert", "aten::sym_constrain")):
            return None
        flat = [a for a in _flatten(args) + _flatten(list(kwargs.values()))]
        if any(isinstance(a, tuple) and a and a[0] == "softmax" for a in flat):
            self.refuse(node, "uses a softmax of the class scores; clearmaps models a softmax only at the output.")
        if not any(self.is_node(a) for a in flat):
            if any(isinstance(a, tuple) and a and a[0] == "batch" for a in flat):
                self.refuse(node, "computes with the batch size.")
            # a computation on weights alone: do it now
            if not isinstance(target, (torch._ops.OpOverload, type(operator.add))):
                self.refuse(node, "is not an operator clearmaps can evaluate.")
            unwrap = lambda a: a[1] if isinstance(a, tuple) and len(a) == 2 and a[0] == "const" else a  # noqa: E731
            with torch.no_grad():
                result = target(*_map(args, unwrap), **{k: _map(v, unwrap) for k, v in kwargs.items()})
            if isinstance(result, torch.Tensor):
                return ("const", result)
            if isinstance(result, (tuple, list)):
                return ("tuple", [("const", r) if isinstance(r, torch.Tensor) else r for r in result])
            return result
        handler = HANDLERS.get(target)
        if handler is None:
            self.refuse(node, "is not supported.")
        return handler(self, node, *args, **kwargs)


def _flatten(x):
    if isinstance(x, tuple) and x and x[0] in ("node", "const", "batch", "tuple", "softmax"):
        return [x]
    if isinstance(x, (list, tuple)):
        return [y for a in x for y in _flatten(a)]
    return [x]


def _map(x, f):
    if isinstance(x, tuple) and x and x[0] in ("node", "const", "batch"):
        return f(x)
    if isinstance(x, list):
        return [_map(a, f) for a in x]
    if isinstance(x, tuple):
        return tuple(_map(a, f) for a in x)
    return f(x)


def capture(module, example: torch.Tensor) -> Captured:
    """The computation of ``module`` (a torch classifier, put in eval mode while captured) on images shaped
    like ``example`` (B ≥ 2, C, H, W), as clearmaps layers."""
    was_training = module.training
    module.eval()
    try:
        program = export(module, example)
    finally:
        module.train(was_training)
    return _Lowering(program).run()
