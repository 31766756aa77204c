"""torch modules → :class:`clearmaps.reference.Network` (DESIGN.md, "Network").

Supported, in execution order: Conv2d, ReLU, MaxPool2d, BatchNorm2d right after a Conv2d (folded into it),
Dropout (dropped: eval), Identity, and one of these heads at the end:

    ... Conv2d(→N) [ReLU]                                        global average pooling implied
    ... Conv2d(→N) [ReLU] AdaptiveAvgPool2d(1) [Flatten]
    ... AdaptiveAvgPool2d(1) [Flatten] [Dropout] Linear(C→N)     the Linear becomes a 1×1 head conv
                                                                  (exact: GAP is linear)

optionally followed by Softmax / LogSoftmax over the classes (dropped: CLEAR works on the logits).
``nn.Sequential`` and modules whose children run in registration order are flattened; the conversion is
checked by running both on a probe input, so a module whose forward does something else is refused.
"""

from __future__ import annotations

import numpy as np

from .reference import ClearmapsError, Conv, MaxPool, Network, ReLU

SUPPORTED = ("Conv2d, ReLU, MaxPool2d, BatchNorm2d (after a Conv2d), Dropout, Identity, "
             "AdaptiveAvgPool2d(1) + Flatten + Linear as the head, Softmax/LogSoftmax at the end")


def _torch():
    try:
        import torch
        from torch import nn
    except ImportError:  # pragma: no cover - torch is a dependency
        raise ClearmapsError("torch is needed to read torch modules and checkpoints: pip install torch") from None
    return torch, nn


def _leaves(module, prefix=""):
    """(qualified name, module) of every leaf, in registration order."""
    from .checkpoints import SpecModule  # a SpecModule knows its own execution order

    if isinstance(module, SpecModule):
        return [(prefix + name, leaf) for name, leaf in module.ordered()]
    children = list(module.named_children())
    if not children:
        return [(prefix.rstrip(".") or type(module).__name__, module)]
    out = []
    for name, child in children:
        out.extend(_leaves(child, f"{prefix}{name}."))
    return out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _array(t):
    return t.detach().to("cpu").double().numpy().copy()


def convert_leaves(leaves) -> list:
    """Convert an ordered list of (name, torch leaf module) into Network layers."""
    torch, nn = _torch()
    layers: list = []
    names: list = []  # torch name of each layer, for messages
    state = "body"  # body → gap → flat → linear → end
    last_conv_name = None
    for name, m in leaves:
        where = f"layer '{name}' ({type(m).__name__})"
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
            continue
        if state == "end":
            raise ClearmapsError(f"{where} comes after the classifier's output; nothing may follow the head "
                                 f"except Softmax/LogSoftmax. Supported: {SUPPORTED}.")
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            if m.dim not in (1, -1, None):
                raise ClearmapsError(f"{where} normalises over dim {m.dim}; only the class dimension (1) is supported.")
            state = "end"
            continue
        if state in ("gap", "flat"):
            if isinstance(m, nn.Flatten) and state == "gap":
                state = "flat"
                continue
            if isinstance(m, nn.Linear):
                w = _array(m.weight)
                b = _array(m.bias) if m.bias is not None else np.zeros(w.shape[0])
                layers.append(Conv(w[:, :, None, None], b))
                names.append(name)
                state = "end"
                continue
            raise ClearmapsError(f"{where} follows the global average pool; only Flatten, Dropout and one Linear "
                                 f"may. Supported: {SUPPORTED}.")
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or _pair(m.dilation) != (1, 1):
                raise ClearmapsError(f"{where} has groups={m.groups}, dilation={m.dilation}; only groups=1 and "
                                     "dilation=1 are supported.")
            if m.padding_mode != "zeros":
                raise ClearmapsError(f"{where} pads with '{m.padding_mode}'; only zero padding is supported.")
            padding = m.padding
            if isinstance(padding, str):
                kh, kw = m.kernel_size
                if padding == "valid":
                    padding = (0, 0)
                elif kh % 2 and kw % 2:  # 'same' with odd kernels and stride 1 is symmetric
                    padding = (kh // 2, kw // 2)
                else:
                    raise ClearmapsError(f"{where} uses padding='same' with an even kernel {m.kernel_size}, "
                                         "which pads asymmetrically; give explicit padding instead.")
            w = _array(m.weight)
            b = _array(m.bias) if m.bias is not None else np.zeros(w.shape[0])
            layers.append(Conv(w, b, _pair(m.stride), _pair(padding)))
            names.append(name)
            last_conv_name = name
        elif isinstance(m, nn.BatchNorm2d):
            if not layers or not isinstance(layers[-1], Conv) or names[-1] != last_conv_name:
                raise ClearmapsError(f"{where} does not follow a Conv2d directly; BatchNorm2d can only be folded "
                                     "into the conv just before it.")
            if m.running_mean is None or m.running_var is None:
                raise ClearmapsError(f"{where} has no running statistics (track_running_stats=False); it cannot "
                                     "be folded into the conv.")
            conv = layers[-1]
            scale = 1.0 / np.sqrt(_array(m.running_var) + m.eps)
            if m.weight is not None:
                scale = scale * _array(m.weight)
            shift = _array(m.bias) if m.bias is not None else 0.0
            layers[-1] = Conv(conv.weight * scale[:, None, None, None],
                              (conv.bias - _array(m.running_mean)) * scale + shift, conv.stride, conv.padding)
            names[-1] = f"{names[-1]}+{name}"
            last_conv_name = names[-1]
        elif isinstance(m, nn.ReLU):
            layers.append(ReLU())
            names.append(name)
        elif isinstance(m, nn.MaxPool2d):
            if _pair(m.dilation) != (1, 1) or m.ceil_mode:
                raise ClearmapsError(f"{where} has dilation={m.dilation}, ceil_mode={m.ceil_mode}; only dilation=1 "
                                     "and ceil_mode=False are supported.")
            layers.append(MaxPool(_pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                                  _pair(m.padding)))
            names.append(name)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if _pair(m.output_size) != (1, 1):
                raise ClearmapsError(f"{where} pools to {m.output_size}; only global average pooling "
                                     "(output size 1) is supported.")
            state = "gap"
        elif isinstance(m, nn.Linear):
            raise ClearmapsError(f"{where} is not after a global average pool: CLEAR needs a fully convolutional "
                                 "network whose class scores are the average of a conv layer's maps. "
                                 f"Supported: {SUPPORTED}.")
        else:
            raise ClearmapsError(f"{where} is not supported. Supported: {SUPPORTED}.")
    # a GAP with no Linear after it leaves the last conv as the head, as when no pooling module is present
    return layers


def _probe_size(net: Network):
    if net.input_shape[1] is not None:
        return [net.input_shape[1:]]
    return [(32, 32), (64, 64), (224, 224)]


def verify(module, net: Network, rtol: float = 1e-4) -> None:
    """Run ``module`` and ``net`` on one random probe input and refuse the conversion if the logits differ."""
    torch, nn = _torch()
    from .torch_ops import network_logits

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    last_error = None
    for size in _probe_size(net):
        try:
            net.layer_sizes(size)
        except ClearmapsError as exc:
            last_error = exc
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, net.in_channels, *size, generator=g, dtype=torch.float64)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                got = module(x.to(device=device, dtype=dtype)).double().cpu()
        except Exception as exc:
            raise ClearmapsError(f"running the torch module on a probe input of shape {tuple(x.shape)} failed "
                                 f"({type(exc).__name__}: {exc}); pass input_shape=(C, H, W) of the images it "
                                 "takes.") from None
        finally:
            module.train(was_training)
        want = network_logits(net, x)
        if got.ndim == 4:  # a module that stops at the head conv: GAP is implied
            got = got.mean(dim=(2, 3))
        if got.shape != want.shape:
            raise ClearmapsError(f"the torch module returns shape {tuple(got.shape)} but the converted network "
                                 f"gives logits of shape {tuple(want.shape)}; its forward does not run its "
                                 "children in order. Supported: " + SUPPORTED + ".")
        last = [m for m in module.modules() if isinstance(m, (nn.Softmax, nn.LogSoftmax))]
        if last:  # compare what the module returns
            want = torch.softmax(want, 1) if isinstance(last[-1], nn.Softmax) else torch.log_softmax(want, 1)
        err = float((got - want).norm() / max(float(want.norm()), 1e-12))
        if not err <= rtol:
            raise ClearmapsError(f"the converted network disagrees with the torch module on a probe input "
                                 f"(relative error {err:.2e}); its forward does not simply run its children "
                                 "in order (skip connections, functional calls in forward). Supported: "
                                 + SUPPORTED + ".")
        return
    raise ClearmapsError(f"could not find a probe size the network accepts ({last_error}); pass input_shape.")


def from_torch(module, class_names=None, input_shape=None, check: bool = True) -> Network:
    """Convert a torch classifier to a :class:`Network`.

    Parameters
    ----------
    module : torch.nn.Module
        ``nn.Sequential`` (nested is fine) or a module whose children run in registration order.
    class_names : sequence of str, optional
    input_shape : (C, H, W), optional
        H and W may be None. Used for the probe check and to validate inputs later.
    check : bool
        Run module and converted network on a probe input and refuse a mismatch (default True).
    """
    torch, nn = _torch()
    if not isinstance(module, nn.Module):
        raise ClearmapsError(f"from_torch expects a torch.nn.Module; got {type(module).__name__}.")
    layers = convert_leaves(_leaves(module))
    net = Network(layers, class_names, input_shape)
    if check:
        verify(module, net)
    return net
