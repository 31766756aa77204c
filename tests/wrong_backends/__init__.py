"""Known-wrong backends: each is the float64 reference with one mistake a fast backend could make, kept to
prove that the property checkers of tests/test_backends.py bite (negative controls, as gpu-mode's reference
kernels keep known-wrong solutions).

    no_rectification  the back-projection never rectifies (Eq. 2 where the deconvnet's Eq. 3 was asked for)
    last_maximum      max-pool switches and the dominant class take the LAST maximum on ties, not the first
    dropped_switch    the back-projection's unpooling drops one window's value per plane (an off-by-one bound)

Each module has the backend contract's functions (forward, backproject, clear_from_trace and the single
operators), the reference's wherever its mistake does not reach.
"""

from __future__ import annotations

import numpy as np

from clearmaps import reference as ref
from clearmaps.reference import Clear

# the contract's functions a wrong backend takes from the reference unless it redefines them
CONTRACT = ("forward", "backproject", "clear_from_trace", "conv2d", "conv_transpose2d", "max_pool_with_switches",
            "unpool", "reduce_channels", "dominant", "compose")


def reference_functions(namespace: dict) -> None:
    """Fill ``namespace`` (a module's globals) with the reference's contract functions it does not define."""
    for name in CONTRACT:
        namespace.setdefault(name, getattr(ref, name))


def clear_with(backproject, dominant=ref.dominant):
    """clear_from_trace built from a (wrong) ``backproject`` and ``dominant``, unfused as the reference's."""

    def clear_from_trace(net, trace, classes, rectify=True, reduce="sum", palette=None, vmax=None,
                         keep_responses=True):
        responses = ref.reduce_channels(backproject(net, trace, classes, rectify), reduce)
        index, response = dominant(responses)
        rgb = ref.compose(index, response, palette, vmax, num_classes=responses.shape[1])
        return Clear(responses if keep_responses else None, index, response, rgb)

    return clear_from_trace


def walk_back(net, trace, classes, rectify, unpool):
    """R(x|c) of a sequential network as the reference defines it (Eqs. 1-3), with ``unpool`` for U_l."""
    z = np.asarray(trace.z, dtype=np.float64)
    B = z.shape[0]
    classes = ref.check_classes(classes, B, net.num_classes)
    K = classes.shape[1]
    head_i, head = net.head_index, net.head
    signal = np.stack([ref.conv_transpose2d(z[b:b + 1, c:c + 1], head.weight[c:c + 1], head.stride, head.padding,
                                            trace.sizes[head_i])[0] for b in range(B) for c in classes[b]])
    for i in range(head_i - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ref.ReLU):
            if rectify:
                signal = np.maximum(signal, 0)
        elif isinstance(layer, ref.MaxPool):
            signal = unpool(signal, np.repeat(np.asarray(trace.switches[i]), K, axis=0), trace.sizes[i])
        else:
            signal = ref.conv_transpose2d(signal, layer.weight, layer.stride, layer.padding, trace.sizes[i])
    return signal.reshape(B, K, *signal.shape[1:])
