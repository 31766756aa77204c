"""What the CUDA backend checks before any launch, with the reference's checks and words.

Arrays are validated by the reference's own checkers (:mod:`clearmaps.reference.errors`), which take NumPy
and GPU (CuPy) arrays alike: a host array is checked on the host and then uploaded, a GPU array is checked
where it is (its values on the device). A trace from elsewhere (the reference's, or one rebuilt by hand)
is checked against the network, and its switches turned into what the back-projection reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...reference import ClearmapsError, MaxPool, Network, Trace
from . import device as dv
from . import sparse_kernels as sk
from .plans import geometry


def check_net(net) -> None:
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")


def check_flag(value, name: str) -> bool:
    """``value`` as a bool, refusing anything but True and False (as the reference does)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ClearmapsError(f"{name}={value!r}; expected True or False.")
    return bool(value)


def checked(a, check):
    """``a`` on the device after ``check`` (a reference checker, e.g. ``lambda a: check_input(net, a)``) has
    passed it: a GPU array is checked as the device array it becomes, a host array on the host first."""
    if dv.on_device(a):
        return check(dv.asdevice(a))
    return dv.asdevice(check(a))


@dataclass(frozen=True, eq=False)
class CudaTrace(Trace):
    """A :class:`clearmaps.reference.Trace` whose arrays are CuPy arrays when the input was on the GPU and
    NumPy arrays otherwise; ``device`` keeps the device copies the back-projection reads either way."""

    device: dict = field(default=None, repr=False)


@dataclass(frozen=True)
class Switches:
    """A pool's switches as the back-projection reads them: flat indices into the pool's input plane, int32
    (B, C, Hs, Ws), and their offsets in their windows (int32, same layout; sparse_kernels.window_offsets),
    for the pool geometry ``pool`` (kh, kw, sh, sw, ph, pw) they were computed for."""

    index: object
    offsets: object
    pool: tuple


def trace_on_device(net: Network, trace) -> tuple:
    """(z, {pool index: Switches}, sizes) of ``trace`` on the device, after checking that it fits ``net``."""
    if not isinstance(trace, Trace):
        raise ClearmapsError(f"trace is a {type(trace).__name__}; expected the Trace returned by forward().")
    sizes = tuple(tuple(int(v) for v in s) for s in trace.sizes)
    if len(sizes) != len(net.layers) + 1:
        raise ClearmapsError(f"the trace has {len(sizes)} layer sizes; this network needs "
                             f"{len(net.layers) + 1}: pass the trace forward() made for this network.")
    try:
        expected = [tuple(s) for s in net.layer_sizes(sizes[0])]
    except ClearmapsError:
        expected = None
    if expected != list(sizes):
        raise ClearmapsError(f"the trace's layer sizes {sizes} are not this network's for an input of "
                             f"{sizes[0]}: pass the trace forward() made for this network.")
    cached = getattr(trace, "device", None)
    if cached is not None:
        z, switches = cached["z"], cached["switches"]
    else:
        z = dv.asdevice(trace.z, np.float32)
        switches = {i: dv.asdevice(s) for i, s in trace.switches.items()}
        for i, s in switches.items():
            if s.dtype.kind not in "iu":
                raise ClearmapsError(f"trace.switches[{i}] has dtype {s.dtype}; expected integers (int64).")
    B = z.shape[0]
    if z.ndim != 4 or z.shape[1:] != (net.num_classes, *sizes[-1]):
        raise ClearmapsError(f"trace.z has shape {tuple(z.shape)}; expected (B, {net.num_classes}, "
                             f"{sizes[-1][0]}, {sizes[-1][1]}) for this network.")
    _check_switch_shapes(net, switches, sizes, B)
    # the back-projection reads the switches as int32 (half the bytes; an index into one plane fits), made
    # once per trace (kept with a forward()'s device arrays)
    sw32 = cached.get("switches32") if cached is not None else None
    mine = sw32 is None or all(sw32[i].pool == geometry(net.layers[i]) for i in switches)
    if not mine:  # offsets made for another network's pools (same sizes, other windows): redone for this one
        sw32 = None
    if sw32 is None:
        if cached is None:  # switches that forward() did not make: each must index its pool's input plane
            for i, s in switches.items():
                plane = sizes[i][0] * sizes[i][1]
                if s.size and (int(s.min()) < 0 or int(s.max()) >= plane):
                    raise ClearmapsError(f"trace.switches[{i}] ranges over [{int(s.min())}, {int(s.max())}], "
                                         f"outside the {sizes[i][0]}x{sizes[i][1]} plane it indexes (0 .. {plane - 1}).")
        sw32 = {i: _switches32(net.layers[i], s, sizes[i], i) for i, s in switches.items()}
        if cached is not None and mine:
            cached["switches32"] = sw32
    return z, sw32, sizes


def _check_switch_shapes(net, switches, sizes, B):
    pools = [i for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)]
    if sorted(switches) != pools:
        raise ClearmapsError(f"trace.switches has layers {sorted(switches)}; this network pools at {pools}.")
    channels = net.in_channels
    for i, layer in enumerate(net.layers):
        if isinstance(layer, MaxPool):
            want = (B, channels, *sizes[i + 1])
            if tuple(switches[i].shape) != want:
                raise ClearmapsError(f"trace.switches[{i}] has shape {tuple(switches[i].shape)}; expected {want}.")
        elif hasattr(layer, "out_channels"):
            channels = layer.out_channels


def _switches32(layer: MaxPool, s, plane, i) -> Switches:
    """A trace's int64 switches of pool layer ``i`` as int32, with each switch's offset in its window: what the
    sparse kernel dispatches a window's value on."""
    s32 = dv.xp.ascontiguousarray(s.astype(np.int32))
    pool = geometry(layer)
    offsets, inside = sk.window_offsets(s32, pool, plane, dv.xp)
    if not inside:
        raise ClearmapsError(f"trace.switches[{i}] has a switch outside its pool window: a max pool {layer.kernel} "
                             f"with stride {layer.stride} and padding {layer.padding} cannot have made it; pass the "
                             "trace forward() made for this network.")
    return Switches(s32, offsets, pool)
