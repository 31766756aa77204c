"""CLEAR maps of a torch classifier, with the forward pass run by torch (``import clearmaps.torch``).

    import clearmaps.torch
    result = clearmaps.torch.explain(model, images)       # images: float tensor (B, C, H, W), CPU or CUDA
    result.rgb                                            # uint8 tensor (B, H, W, 3) on images.device

    handle = clearmaps.torch.register(model)              # once, outside compiled code
    rgb, dominant_class, dominant_response = torch.ops.clearmaps.clear_map(images, handle)

The forward pass runs with torch's own kernels (``F.conv2d``, ``F.max_pool2d(..., return_indices=True)``:
torch's pooling indices are exactly the paper's switches, the flat index into the unpadded input plane of
each window's first maximum). Switches, z_L and the logits cross to the backend as DLPack views, and the
backend's back-projection and composition (``clear_from_trace``) do the rest.

``import torch`` below is the real torch even though this module is ``clearmaps.torch``: imports are
absolute, so a module never shadows a top-level package from inside its own package.
"""

from __future__ import annotations

import itertools
import weakref
from typing import List, Optional, Tuple

import torch

from . import interop, torch_forward
from .explanation import Explanation, check_options, explain_from_trace
from .reference import ClearmapsError, Network, Trace
from .torch_io import from_torch

__all__ = ["clear_map", "explain", "network_for", "register", "trace"]


# --- the module → Network conversion, cached per module ---------------------------------------------------

_NETWORKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _state_key(module: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced, moved, or written in place (an optimiser step,
    load_state_dict): torch bumps a tensor's version counter on every in-place write."""
    key = []
    for t in itertools.chain(module.parameters(), module.buffers()):
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors keep no version counter; they cannot be written either
            version = None
        key.append((id(t), version, t.data_ptr(), t.dtype, tuple(t.shape)))
    return tuple(key)


def network_for(module, class_names=None, input_shape=None) -> Network:
    """The :class:`Network` of ``module`` (a ``torch.nn.Module``, or a Network, returned as it is).

    Converted by :func:`clearmaps.from_torch` (captured and checked on a probe input) and cached weakly per
    module until one of its parameters or buffers changes. A conversion serves every image size when its
    operations allow (most CNNs); a size-bound one (a flatten into a Linear) is redone per ``input_shape``.
    """
    if isinstance(module, Network):
        return module
    if not isinstance(module, torch.nn.Module):
        raise ClearmapsError(f"expected a torch.nn.Module or a clearmaps Network; got {type(module).__name__}.")
    state = _state_key(module)
    size = None if input_shape is None else tuple(int(n) for n in input_shape)
    names = None if class_names is None else tuple(str(n) for n in class_names)
    cached = _NETWORKS.get(module)
    if cached is None or cached[0] != state:  # new module, or its weights changed: forget old conversions
        cached = _NETWORKS[module] = (state, [])
    for net in cached[1]:
        fits = net.input_shape[1] is None or size is None or net.input_shape == size
        if fits and (names is None or net.class_names == names):
            return net
    net = from_torch(module, class_names=names, input_shape=size)
    cached[1].append(net)
    return net


def _channels(module, x) -> int:
    """The channels the module's first conv takes (so that images with other channels get the usual
    "x has 3 channels" error), else the images'."""
    first = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return first.in_channels if first is not None else int(x.shape[1])


# --- the forward pass in torch -------------------------------------------------------------------------------

def trace(net: Network, x: torch.Tensor) -> tuple:
    """Run ``net`` on the tensor ``x`` with torch's kernels, recording what the back-projection needs.

    Returns torch tensors in the layout of :class:`clearmaps.reference.Trace`: (sizes, switches {node index:
    int64 (B, C, oh, ow)}, z (B, N, h, w), logits (B, N), probabilities, shapes, saved).
    """
    z, switches, saved, shapes = torch_forward.run(net, x)
    logits = z.mean(dim=(2, 3))
    return (tuple(net.layer_sizes(tuple(x.shape[2:]))), switches, z, logits, torch.softmax(logits, dim=1),
            tuple(shapes), saved)


def _prepare(module, x, backend, class_names, **others):
    if interop.framework_of(x) != "torch":
        raise ClearmapsError(f"x is a {type(x).__name__}; clearmaps.torch takes a torch tensor (B, C, H, W). "
                             "Use clearmaps.explain for NumPy, JAX and CuPy arrays.")
    caller = interop.caller_of(x, "x", **others)
    impl = interop.backend_for(backend, caller)
    if isinstance(module, torch.nn.Module):
        shape = (_channels(module, x), *(int(n) for n in x.shape[2:]))
    else:
        shape = None
    return network_for(module, class_names, shape), caller, impl, caller.conform(x)


def _backend_trace(net, x, caller) -> Trace:
    """torch's forward pass, its tensors viewed (no copy) as the backend's arrays. Call inside
    ``caller.computing()``."""
    interop.check_images(net, caller.to_backend(x))
    sizes, switches, z, logits, probabilities, shapes, saved = trace(net, x)
    view = caller.to_backend
    kept = {i: tuple(view(t) for t in v) if isinstance(v, tuple) else view(v) for i, v in saved.items()}
    kept[-1] = view(x)  # the image, for input×gradient
    return Trace(sizes, {i: view(s) for i, s in switches.items()}, view(z), view(logits), view(probabilities),
                 shapes, kept)


def explain(module, x: torch.Tensor, classes=None, backend: str = "auto", rectify: bool = True,
            reduce: str = "sum", palette=None, vmax=None, keep_responses: bool = True,
            class_names=None, method: str = "deconvnet") -> Explanation:
    """CLEAR maps of ``module`` on ``x``, the forward pass run by torch; results are torch tensors on
    ``x.device``.

    Parameters
    ----------
    module : torch.nn.Module or Network
        The classifier; converted with :func:`clearmaps.from_torch` once and cached until its parameters
        change.
    x : torch.Tensor (B, C, H, W)
        Float images on the CPU or a CUDA GPU; float32 or float64: the forward pass runs in ``x.dtype``. Must
        not require grad (pass ``x.detach()``).
    backend : "auto", "reference", "cpu" or "cuda"
        Which backend back-projects; it must compute where ``x`` is. "auto" (default) follows ``x``: the
        CUDA kernels for a CUDA tensor, the Numba CPU kernels (else the reference) for a CPU tensor.
    class_names : sequence of str, optional
        Names for the conversion (default "0", "1", ...).
    classes, rectify, reduce, palette, vmax, keep_responses, method
        As in :func:`clearmaps.explain`.

    Returns
    -------
    Explanation
        torch tensors on ``x.device``; ``logits`` and ``probabilities`` are torch's own, float arrays have
        the backend's dtype (the reference keeps ``x.dtype``).
    """
    method = check_options(reduce, rectify, method, keep_responses)
    net, caller, impl, x = _prepare(module, x, backend, class_names, classes=classes, palette=palette)
    with caller.computing():
        backend_trace = _backend_trace(net, x, caller)
        return explain_from_trace(net, backend_trace, impl, caller, classes=classes, rectify=rectify,
                                  reduce=reduce, palette=palette, vmax=vmax, keep_responses=keep_responses,
                                  method=method, images=x)


# --- the custom op -------------------------------------------------------------------------------------------
# The op needs the network. It gets an int handle to a registered module (or Network), not the weights as
# tensors: the backends take a Network (weights in the layout they expect, device copies cached per
# Network), and rebuilding one from tensors on every call would copy every weight each time. An int is a
# schema type torch.compile treats as a guarded constant, so the compiled graph holds one opaque node. The
# handle names the module, not a snapshot: each call re-reads the module's conversion, which is redone when
# its parameters have changed, so a handle never serves stale weights.

_HANDLES: dict[int, weakref.ref] = {}
_HANDLE_OF: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_next_handle = itertools.count(1)


def register(module) -> int:
    """An int handle for ``module`` (a torch.nn.Module or Network) to pass to ``clear_map``.

    The same module always gets the same handle; the registry holds it weakly (a handle outlives its module
    only as an error). Call it outside ``torch.compile``d code.
    """
    if not isinstance(module, (torch.nn.Module, Network)):
        raise ClearmapsError(f"register expects a torch.nn.Module or a clearmaps Network; got "
                             f"{type(module).__name__}.")
    if isinstance(module, torch.nn.Module):
        network_for(module)  # captured now, outside compiled code (torch.export cannot run inside it)
    handle = _HANDLE_OF.get(module)
    if handle is None:
        handle = next(_next_handle)
        _HANDLES[handle] = weakref.ref(module)
        _HANDLE_OF[module] = handle
        weakref.finalize(module, _HANDLES.pop, handle, None)
    return handle


def _registered(handle: int):
    ref = _HANDLES.get(handle)
    module = None if ref is None else ref()
    if module is None:
        raise ClearmapsError(f"network handle {handle} is not registered (or its module was garbage "
                             "collected); get one with clearmaps.torch.register(module).")
    return module


def _vmax_of(vmax, vmax_rule):
    if vmax_rule == "max":
        return vmax
    if vmax is not None:
        raise ClearmapsError(f"vmax={vmax} and vmax_rule={vmax_rule!r} both given; a number needs "
                             "vmax_rule='max' (the default).")
    return vmax_rule


@torch.library.custom_op("clearmaps::clear_map", mutates_args=())
def clear_map(x: torch.Tensor, network: int, classes: Optional[List[int]] = None, top_k: int = 0,
              rectify: bool = True, reduce: str = "sum", vmax: Optional[float] = None, vmax_rule: str = "max",
              backend: str = "auto", method: str = "deconvnet") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLEAR map of ``x`` as a torch operator (``torch.ops.clearmaps.clear_map``), traceable by
    ``torch.compile``.

    Parameters
    ----------
    x : float tensor (B, C, H, W), CPU or CUDA
    network : int
        A handle from :func:`register`.
    classes : list of class ids, optional
        The classes that compete for each pixel (default all). Exclusive with ``top_k``.
    top_k : int
        When > 0, each image's top-k classes by logit.
    rectify, reduce, backend, method
        As in :func:`clearmaps.explain` (``backend`` defaults to "auto": the device of ``x``).
    vmax : float, optional
        A fixed brightness scale; ``vmax_rule`` is then "max".
    vmax_rule : "max", "batch" or "pNN"
        Each image's maximum (default), one maximum for the batch, or a percentile.

    Returns
    -------
    rgb : uint8 (B, H, W, 3)
    dominant_class : int64 (B, H, W)
        Class ids.
    dominant_response : (B, H, W) in ``x.dtype``
    """
    module = _registered(network)
    if classes and top_k:
        raise ClearmapsError(f"classes={classes} and top_k={top_k} both given; choose one.")
    chosen = f"top{top_k}" if top_k else (list(classes) if classes else None)
    explanation = explain(module, x, classes=chosen, backend=backend, rectify=rectify, reduce=reduce,
                          vmax=_vmax_of(vmax, vmax_rule), keep_responses=False, method=method)
    return (explanation.rgb, explanation.dominant_class.to(torch.int64),
            explanation.dominant_response.to(x.dtype))


@clear_map.register_fake
def _clear_map_fake(x, network, classes=None, top_k=0, rectify=True, reduce="sum", vmax=None, vmax_rule="max",
                    backend="auto", method="deconvnet"):
    batch, _, height, width = x.shape
    return (x.new_empty((batch, height, width, 3), dtype=torch.uint8),
            x.new_empty((batch, height, width), dtype=torch.int64),
            x.new_empty((batch, height, width)))
