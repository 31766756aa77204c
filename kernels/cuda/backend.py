"""The CUDA backend's drivers: forward with switches, back-projection, the fused epilogue, memory splitting.

Data flow (all float32, channel-major (C, n, H, W) inside):

    forward         per stride-1 conv where sparse_kernels.dense_pays (narrow, not the input or a 1x1 conv):
                    the sparse kernel (the transposed conv of its flipped kernels, bias added, zeros skipped);
                    per other conv: gather columns (rectifying a pending ReLU as it reads) + one cuBLAS GEMM
                    with the bias in it; per max pool: one kernel writing pooled values, the int64 switches
                    and, for the back-projection, their int32 copy and window offsets.
    back-projection G_L^c z_L for every (image, class) pair at once (B*K signals) — or, for a 1×1 head over
                    ReLUs and a conv, that conv's transpose of it in one step (the folded head,
                    kernels/fold.py: two input channels instead of the conv's) — then per layer below:
                    ReLU → a flag (rectify as the next kernel reads), MaxPool → a flag (the next kernel
                    reads through the switches), Conv → a transposed conv: for stride 1, the sparse kernel
                    (sparse_kernels.py: unpooling, rectification and the transposed conv in one pass that
                    skips zeros; on a dense source only where sparse_kernels.dense_pays); else
                    the fused gather of its columns from the (unpooled, rectified) source + one GEMM; or,
                    when it has few output channels (the input layer), one direct kernel.
    fast mode       with TENSOR_CORES on, the stride-1 convs of at least tensor_cores.MIN_CHANNELS source
                    channels, forward (flipped kernels, bias) and transposed (dense source or behind a
                    non-overlapping pool), run as tensor_cores.py's TF32 implicit GEMM instead.
    epilogue        one pass per chunk: channel reduction, argmax over classes, max, and HSV when the
                    normaliser is known (see epilogue.py).

Memory: the columns of a GEMM are built in blocks of at most ``COLUMN_BYTES``; the (image, class) pairs
are split into chunks of images, and if one image's K classes do not fit, of classes, so that a batch
that does not fit in the free GPU memory (or the limit set with :func:`set_memory_limit`) is processed in
pieces instead of failing.
"""

from __future__ import annotations

import contextvars
import os
import weakref
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ...reference import (REDUCTIONS, Clear, ClearmapsError, Conv, MaxPool, Network, ReLU, Trace,
                          check_classes, check_input, check_palette, resolve_vmax)
from ..fold import fold_head
from . import backproject_kernels as bk
from . import device as dv
from . import epilogue as ek
from . import forward_kernels as fk
from . import sparse_kernels as sk
from . import tensor_cores as tc
from .device import THREADS, ceil_div, launch, xp

# A transposed conv with at most this many output channels (the input layer: grey or RGB) runs as one
# direct kernel: as a GEMM its M would be 1-3 rows, all memory traffic and no arithmetic.
DIRECT_MAX_CHANNELS = 4
# ... and, reading a dense source with stride 1, as backproject_kernels.direct_rows (PX pixels of a row per
# thread, sharing their loads) when this is on. Off until a GPU run has timed it: in run 7 direct_transpose
# took 1.7 ms of allcnn-mnist's 15.7, ~6x its bandwidth floor (bench method cuda-rows).
ROWS_DIRECT = os.environ.get("CLEARMAPS_CUDA_ROWS_DIRECT", "0") == "1"
# Bytes of GEMM columns built at once (a conv's columns are kh*kw times its input). GPU run 6 tried 128 MiB:
# vgg16-fcn's six GEMM layers took ~1 ms (6%) longer in all.
COLUMN_BYTES = 256 << 20
# Stride-1 convs run as the tiled kernel that skips zeros (sparse_kernels.py): the transposed ones of the
# back-projection, read from a dense plane or through a pool's switches, and the forward ones (a conv is the
# transposed conv of its flipped kernels). No columns, no GEMM, exact float32 in either precision.
# False: the columns + GEMM path for every one of them (bench/methods_cuda.py's "cuda-gemm" compares both).
# Convs on a dense input take it only where sparse_kernels.dense_pays (measured in GPU run 5).
SPARSE_TRANSPOSE = os.environ.get("CLEARMAPS_CUDA_SPARSE", "1") != "0"

# In the fast (TF32) mode, stride-1 convs, forward and transposed (on a dense source or behind a pool whose
# windows do not overlap), run on the tensor cores (tensor_cores.py: an implicit GEMM, no columns) when this is
# on. Off until a GPU run has checked and timed it: it was written and tested without a GPU (its CUDA C runs
# in the tests under a host emulation of the mma instruction). Bench method cuda-fast-tc.
TENSOR_CORES = os.environ.get("CLEARMAPS_CUDA_TENSOR_CORES", "0") == "1"

_PRECISIONS = ("exact", "tf32")
_state = {
    "precision": os.environ.get("CLEARMAPS_CUDA_PRECISION", "exact"),
    "memory_limit": int(os.environ["CLEARMAPS_CUDA_MEMORY_LIMIT"]) if os.environ.get(
        "CLEARMAPS_CUDA_MEMORY_LIMIT") else None,
}
if _state["precision"] not in _PRECISIONS:
    raise ClearmapsError(f"CLEARMAPS_CUDA_PRECISION={_state['precision']!r}; expected one of {_PRECISIONS}.")


def set_precision(precision: str = "exact") -> None:
    """Choose the GEMM arithmetic: "exact" (float32 FMA, the default) or "tf32" (tensor cores with inputs
    rounded to TF32: faster, about 1e-3 relative error; check the dominant-class agreement with
    :func:`agreement`)."""
    if precision not in _PRECISIONS:
        raise ClearmapsError(f"precision={precision!r}; expected one of {_PRECISIONS}.")
    _state["precision"] = precision


def get_precision() -> str:
    return _state["precision"]


def set_memory_limit(limit_bytes: int | None = None) -> None:
    """Cap the GPU memory a call plans to use (None: 80% of what is free). Work that does not fit is
    split over images, then classes."""
    if limit_bytes is not None and (isinstance(limit_bytes, bool) or not isinstance(limit_bytes, (int, np.integer))
                                    or limit_bytes <= 0):
        raise ClearmapsError(f"limit_bytes={limit_bytes!r}; expected a positive int or None.")
    _state["memory_limit"] = None if limit_bytes is None else int(limit_bytes)


# When a list, each step of forward / back-projection appends (label, CUDA event) to it: bench/device_bench.py
# turns them into a per-layer time breakdown. None (the default) costs nothing.
TIMELINE = None


def _mark(label: str):
    if TIMELINE is not None and dv.cp is not None:
        event = dv.cp.cuda.Event()
        event.record()
        TIMELINE.append((label, event))


def _fast(fast) -> bool:
    if fast is None:
        return _state["precision"] == "tf32"
    if not isinstance(fast, (bool, np.bool_)):
        raise ClearmapsError(f"fast={fast!r}; expected True, False or None (the set_precision default).")
    return bool(fast)


def _budget() -> int:
    limit = _state["memory_limit"]
    free = int(0.8 * dv.free_bytes())
    return free if limit is None else min(limit, free)


def _column_bytes() -> int:
    """Workspace for one block of GEMM columns: COLUMN_BYTES, or a quarter of a small budget."""
    return min(COLUMN_BYTES, _budget() // 4)


def _column_block(rows: int, ncols: int) -> int:
    """Columns per GEMM block: as many as the workspace holds (at least one)."""
    return max(1, min(ncols, _column_bytes() // (4 * rows)))


# --------------------------------------------------------------------------------------- the network

class _ConvPlan:
    """Device copies of a conv's weight in the layouts the kernels read, each made on first use and kept: a
    layer reads two or three of them (its forward route's, its back-projection route's, the bias), and
    holding all five would cost the GPU memory of three more copies of the network.

    weight      (O, I, kh, kw)
    forward     (O, I*kh*kw + 1): weight rows with the bias as last column (forward columns + GEMM)
    transposed  (I, O*kh*kw): weight[o, i, ky, kx] at [i, (o*kh + ky)*kw + kx] (transposed columns + GEMM)
    sparse      (O, kh, kw, I): what sparse_kernels.sparse_transpose reads
    flipped     (I, kh, kw, O): weight[o, i, kh-1-ky, kw-1-kx] at [i, ky, kx, o] (the forward conv, sparse)
    tensor      (I'/16, kh*kw*O'/8, 32, 4): the matrix [i, (ky*kw + kx)*O' + o] = weight[o, i, ky, kx], padded,
                rounded to TF32, in mma fragment order (tensor_cores.weight_layout)
    tensor_flipped: the same for the forward conv, the transposed conv of its flipped kernels
    bias        (O,)"""

    def __init__(self, layer: Conv):
        self._layer = layer  # (the Network's own: no host copy of the weights is kept)

    @property
    def _w(self) -> np.ndarray:
        return self._layer.weight.astype(np.float32)

    @property
    def _b(self) -> np.ndarray:
        return self._layer.bias.astype(np.float32)

    @classmethod
    def of(cls, layer: Conv) -> "_ConvPlan":
        return cls(layer)

    @cached_property
    def weight(self):
        return dv.asdevice(self._w)

    @cached_property
    def forward(self):
        w = self._w
        return dv.asdevice(np.concatenate([w.reshape(w.shape[0], -1), self._b[:, None]], axis=1))

    @cached_property
    def transposed(self):
        w = self._w
        return dv.asdevice(np.ascontiguousarray(w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1)))

    @cached_property
    def sparse(self):
        return dv.asdevice(np.ascontiguousarray(self._w.transpose(0, 2, 3, 1)))

    @cached_property
    def flipped(self):
        return dv.asdevice(np.ascontiguousarray(self._w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)))

    @cached_property
    def tensor(self):
        return dv.asdevice(tc.weight_layout(self._w))

    @cached_property
    def tensor_flipped(self):
        return dv.asdevice(tc.weight_layout(self._w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)))

    @cached_property
    def bias(self):
        return dv.asdevice(self._b)


_PLANS: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def _plan(net: Network) -> dict:
    """Device copies of a network's weights, made once per Network (Networks are immutable)."""
    plan = _PLANS.get(net)
    if plan is None:
        plan = {}
        for i, layer in enumerate(net.layers):
            if isinstance(layer, Conv):
                plan[i] = _ConvPlan.of(layer)
        # the folded head (kernels/fold.py): conv index, then its kernels for rectify=True / False laid out
        # (N, 2, I, kh, kw) as head_signal(folded=True) reads them
        folded = fold_head(net)
        plan["fold"] = None if folded is None else (folded[0], *(
            dv.asdevice(np.ascontiguousarray(v.transpose(0, 3, 4, 1, 2), dtype=np.float32)) for v in folded[1:]))
        _PLANS[net] = plan
    return plan


def _geometry(layer) -> tuple:
    """(kh, kw, sh, sw, ph, pw) of a Conv or MaxPool: what the kernel factories specialise on."""
    return (*layer.kernel, *layer.stride, *layer.padding)


def _check_net(net):
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")


# ------------------------------------------------------------------------------------ input checking

def _shadow(a) -> np.ndarray:
    """A zero-cost NumPy stand-in with ``a``'s shape and dtype, for the reference's shape/dtype checks."""
    return np.broadcast_to(np.zeros((), dtype=a.dtype), a.shape)


def checked(a, name: str, check, *, finite: bool = True):
    """Validate ``a`` with ``check`` (a reference checker taking a NumPy array) and return it on the device.

    Host arrays are checked as they are; device arrays through a shadow of their shape and dtype, plus a
    finiteness check on the device that names the first bad element as the reference would."""
    if dv.on_device(a):
        d = dv.asdevice(a)
        check(_shadow(d))
        if finite and d.dtype.kind == "f" and d.size and not bool(xp.isfinite(d).all()):
            bad = np.argwhere(~np.isfinite(dv.tohost(d)))[0]
            raise ClearmapsError(f"{name} contains NaN or Inf (first at index {tuple(int(i) for i in bad)}); "
                                 "expected finite values.")
        return d
    return dv.asdevice(check(a))


# ---------------------------------------------------------------------------------------- the trace

@dataclass(frozen=True, eq=False)
class CudaTrace(Trace):
    """A :class:`clearmaps.reference.Trace` whose arrays are CuPy arrays when the input was on the GPU and
    NumPy arrays otherwise; ``device`` keeps the device copies the back-projection reads either way."""

    device: dict = field(default=None, repr=False)


# kernels/cuda/warmup.py's recorder: while set (in this thread or task only), _launch_sparse hands each
# launch to it instead of running it
SPARSE_RECORDER = contextvars.ContextVar("clearmaps_sparse_recorder", default=None)


def _launch_sparse(src, offsets, weight, bias, out, kernel, padding, pool, b0: int, kc: int, rect: bool):
    """out (I, n, H, W) = the stride-1 transposed conv (``kernel``, ``padding``) of src (O, n, Hs, Ws), read
    through a pool's switches when ``pool`` (``offsets``: their window offsets), as the sparse kernel, with
    ``bias`` (I,) added unless None; weight (O, kh, kw, I)."""
    recorder = SPARSE_RECORDER.get()
    if recorder is not None:
        return recorder(src, offsets, weight, bias, out, kernel, padding, pool, b0, kc, rect)
    O, n, Hs, Ws = src.shape
    I, _, H, W = out.shape
    spec = sk.specialisation(kernel, padding, pool, I, bias is not None)
    threads, _, (TY, TX), cpt, _ = spec[5:]  # (kh, kw, ph, pw, pool) come first
    tiles_y, tiles_x = ceil_div(H, TY), ceil_div(W, TX)
    launch(sk.sparse_transpose(*spec),
           (n * tiles_y * tiles_x, ceil_div(I, threads * cpt)), threads, src.reshape(-1),
           _dummy(np.int32) if offsets is None else offsets.reshape(-1), weight.reshape(-1),
           _dummy(np.float32) if bias is None else bias, out.reshape(-1), O, I, n, Hs, Ws, H, W, tiles_x, tiles_y, b0, kc,
           rect)


def _sparse_forward(layer: Conv) -> bool:
    """Whether a forward conv runs as the sparse kernel: stride 1, padding < kernel (the flipped conv's
    padding kh - 1 - ph must not be negative)."""
    (kh, kw), (ph, pw) = layer.kernel, layer.padding
    return (SPARSE_TRANSPOSE and sk.dense_pays(layer.in_channels, layer.out_channels, kh, kw) and ph < kh
            and pw < kw and sk.supports(kh, kw, *layer.stride, kh - 1 - ph, kw - 1 - pw, None))


def _tensor_cores(kernel, stride, padding, pool, source_channels: int, out_channels: int, sizes: tuple,
                  fast: bool) -> bool:
    """Whether a transposed conv (forward: of the flipped kernels) runs on the tensor-core kernel: in the fast
    mode with TENSOR_CORES on, for a geometry it supports, a source of at least tc.MIN_CHANNELS channels and
    arrays its 32-bit indices reach (``sizes``: the source's and the output's element counts; the switch
    offsets it reads are the chunk's images', no more than the source)."""
    weight = int(np.prod(tc.padded_shape(source_channels, out_channels, *kernel)))
    return (fast and TENSOR_CORES and source_channels >= tc.MIN_CHANNELS and tc.fits(*sizes)
            and tc.fits(weight, 0) and tc.supports(*kernel, *stride, *padding, pool) and tc.available() is None)


def _conv_forward(a, layer: Conv, plan: _ConvPlan, rect: bool, fast: bool):
    """a (I, Bc, H, W) → conv output (O, Bc, oh, ow) with bias; ``rect`` rectifies a pending ReLU."""
    I, Bc, H, W = a.shape
    O = layer.out_channels
    kh, kw = layer.kernel
    oh, ow = layer.output_size((H, W))
    flipped = (kh - 1 - layer.padding[0], kw - 1 - layer.padding[1])
    if _tensor_cores(layer.kernel, layer.stride, flipped, None, I, O, (a.size, O * Bc * oh * ow), fast):
        out = xp.empty((O, Bc, oh, ow), dtype=np.float32)
        tc.launch(a, _dummy(np.int32), plan.tensor_flipped, out, I, O, Bc, H, W, H, W, oh, ow, 0, 1, rect,
                  layer.kernel, flipped, None, plan.bias)
        return out
    if _sparse_forward(layer):  # the transposed conv of the flipped kernels, input channels as its "O"
        out = xp.empty((O, Bc, oh, ow), dtype=np.float32)
        _launch_sparse(a, None, plan.flipped, plan.bias, out, (kh, kw), (kh - 1 - layer.padding[0],
                       kw - 1 - layer.padding[1]), None, 0, 1, rect)
        return out
    rows = I * kh * kw + 1
    ncols = Bc * oh * ow
    out = xp.empty((O, ncols), dtype=np.float32)
    block = _column_block(rows, ncols)
    work = xp.empty(rows * min(block, ncols), dtype=np.float32)
    kernel = fk.forward_columns(*_geometry(layer))
    groups = ceil_div(I, fk.FORWARD_CHANNELS)
    flat = a.reshape(-1)
    for j0 in range(0, ncols, block):
        nb = min(block, ncols - j0)
        cols = work[:rows * nb]
        launch(kernel, (ceil_div(nb, THREADS), groups), THREADS, flat, cols, nb, j0, I, Bc, H, W, oh, ow, rect, True)
        dv.gemm_into(plan.forward, cols.reshape(rows, nb), out, j0, fast)
    return out.reshape(O, Bc, oh, ow)


def _forward_bytes_per_image(net: Network, sizes) -> int:
    biggest, C = 0, net.in_channels
    for i, layer in enumerate(net.layers):
        (H, W), (oh, ow) = sizes[i], sizes[i + 1]
        if isinstance(layer, Conv):
            biggest = max(biggest, layer.in_channels * H * W + layer.out_channels * oh * ow)
            C = layer.out_channels
        elif isinstance(layer, MaxPool):
            biggest = max(biggest, C * (H * W + oh * ow))
    return 4 * biggest


def forward(net: Network, x, *, fast=None) -> CudaTrace:
    """Run ``net`` on ``x`` (B, C, H, W) on the GPU, recording the max pools' switches.

    Same contract as :func:`clearmaps.reference.forward`, in float32. ``x`` may be a NumPy array (the
    Trace then holds NumPy arrays) or a GPU array (CuPy, or anything with DLPack /
    ``__cuda_array_interface__``; the Trace then holds CuPy arrays)."""
    _check_net(net)
    fast = _fast(fast)
    host_out = not dv.on_device(x)
    x = checked(x, "x", lambda a: check_input(net, a)).astype(np.float32, copy=False)
    B = x.shape[0]
    sizes = tuple(tuple(s) for s in net.layer_sizes(x.shape[2:]))
    plan = _plan(net)
    switches, sw32, channels = {}, {}, net.in_channels
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):
            channels = layer.out_channels
        elif isinstance(layer, MaxPool):
            shape = (B, channels, *sizes[i + 1])
            switches[i] = xp.empty(shape, dtype=np.int64)
            # what the back-projection reads, written by the same pass (no second pass over the switches)
            sw32[i] = _Switches(xp.empty(shape, dtype=np.int32), xp.empty(shape, dtype=np.int32), _geometry(layer))
    z = xp.empty((B, net.num_classes, *sizes[-1]), dtype=np.float32)
    per_image = _forward_bytes_per_image(net, sizes)
    available = _budget() - _column_bytes() - z.nbytes - 2 * sum(s.nbytes for s in switches.values())
    if available < per_image:
        raise ClearmapsError(f"one image of size {sizes[0]} needs about {per_image >> 20} MiB of GPU memory "
                             f"for the forward pass; only {max(available, 0) >> 20} MiB are available: use "
                             "smaller images or batches, or free GPU memory.")
    bc = max(1, min(B, available // max(per_image, 1)))
    _mark("forward start")
    for b0 in range(0, B, bc):
        a = xp.ascontiguousarray(x[b0:b0 + bc].transpose(1, 0, 2, 3))
        rect = False  # a ReLU waiting to be applied by whoever reads `a` next
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU):
                rect = True
            elif isinstance(layer, MaxPool):
                C, Bc = a.shape[:2]
                pooled = xp.empty((C, Bc, *sizes[i + 1]), dtype=np.float32)
                launch(fk.max_pool(*_geometry(layer)), ceil_div(pooled.size, THREADS), THREADS,
                       a, pooled, switches[i], sw32[i].index, sw32[i].offsets, b0, rect)
                a, rect = pooled, False
            else:
                a, rect = _conv_forward(a, layer, plan[i], rect, fast), False
            _mark(f"forward {i} {type(layer).__name__}")
        if rect:
            a = xp.maximum(a, np.float32(0))
        z[b0:b0 + bc] = a.transpose(1, 0, 2, 3)
    logits = z.mean(axis=(2, 3))
    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = e / e.sum(axis=1, keepdims=True)
    device = {"z": z, "switches": switches, "switches32": sw32}
    if host_out:
        return CudaTrace(sizes, {i: dv.tohost(s) for i, s in switches.items()}, dv.tohost(z),
                         dv.tohost(logits), dv.tohost(probabilities), device)
    return CudaTrace(sizes, dict(switches), z, logits, probabilities, device)


def _trace_device(net: Network, trace) -> tuple:
    """(z, switches) of ``trace`` on the device, after checking that the trace fits ``net``."""
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
    pools = [i for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)]
    if sorted(switches) != pools:
        raise ClearmapsError(f"trace.switches has layers {sorted(switches)}; this network pools at {pools}.")
    channels = net.in_channels
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):
            channels = layer.out_channels
        elif isinstance(layer, MaxPool):
            want = (B, channels, *sizes[i + 1])
            if tuple(switches[i].shape) != want:
                raise ClearmapsError(f"trace.switches[{i}] has shape {tuple(switches[i].shape)}; expected {want}.")
    # the back-projection reads the switches as int32 (half the bytes; an index into one plane fits), made
    # once per trace (kept with a forward()'s device arrays)
    sw32 = cached.get("switches32") if cached is not None else None
    mine = sw32 is None or all(sw32[i].pool == _geometry(net.layers[i]) for i in switches)
    if not mine:  # offsets made for another network's pools (same sizes, other windows): redone for this one
        sw32 = None
    if sw32 is None:
        if cached is None:  # switches that forward() did not make: each must index its pool's input plane
            for i, s in switches.items():
                plane = sizes[i][0] * sizes[i][1]
                if s.size and (int(s.min()) < 0 or int(s.max()) >= plane):
                    raise ClearmapsError(f"trace.switches[{i}] ranges over [{int(s.min())}, {int(s.max())}], "
                                         f"outside the {sizes[i][0]}x{sizes[i][1]} plane it indexes (0 .. {plane - 1}).")
        sw32 = {}
        for i, s in switches.items():
            s32 = xp.ascontiguousarray(s.astype(np.int32))
            # and each switch's offset in its window: what the sparse kernel dispatches a window's value on
            pool = _geometry(net.layers[i])
            offsets, inside = sk.window_offsets(s32, pool, sizes[i], xp)
            if not inside:
                raise ClearmapsError(f"trace.switches[{i}] has a switch outside its pool window: a max pool "
                                     f"{net.layers[i].kernel} with stride {net.layers[i].stride} and padding "
                                     f"{net.layers[i].padding} cannot have made it; pass the trace forward() made "
                                     "for this network.")
            sw32[i] = _Switches(s32, offsets, pool)
        if cached is not None and mine:
            cached["switches32"] = sw32
    return z, sw32, sizes


@dataclass(frozen=True)
class _Switches:
    """A pool's switches as the back-projection reads them: flat indices into the pool's input plane, int32
    (B, C, Hs, Ws), and their offsets in their windows (int32, same layout; sparse_kernels.window_offsets),
    for the pool geometry ``pool`` (kh, kw, sh, sw, ph, pw) they were computed for."""

    index: object
    offsets: object
    pool: tuple


# ------------------------------------------------------------------------------- back-projection

_DUMMIES = {}


def _dummy(dtype):
    # a one-element array for a kernel argument this call does not read (a dense source's switches, the
    # back-projection's bias): the kernels' signatures still want an array of that dtype
    key = np.dtype(dtype).name
    if key not in _DUMMIES:
        _DUMMIES[key] = xp.zeros(1, dtype=dtype)
    return _DUMMIES[key]


@dataclass
class _Source:
    """How the next kernel reads the signal (see backproject_kernels.py): a dense plane, or a pool's unpooled plane
    read through its switches, with the pending rectifications."""

    kind: int
    array: object          # dense: (C, n, Hs, Ws); unpooled: the pooled signal (C, n, Hs, Ws)
    plane: tuple           # (Hu, Wu): the size of the plane this source stands for
    pre: bool = False      # rectify values as read (dense) / before unpooling (unpooled)
    post: bool = False     # rectify after unpooling (unpooled only)
    switches: object = None  # unpooled: a _Switches (int32 (B, C, Hs, Ws) indices and window offsets)
    pool: tuple | None = None

    def rectified(self) -> "_Source":
        if self.kind == bk.DENSE:
            return _Source(bk.DENSE, self.array, self.plane, pre=True)
        return _Source(self.kind, self.array, self.plane, self.pre, True, self.switches, self.pool)

    def args(self):
        """(src, switches) flat, then the dims every kernel takes: C, n, Hs, Ws, Hu, Wu."""
        C, n, Hs, Ws = self.array.shape
        sw = _dummy(np.int32) if self.kind == bk.DENSE else self.switches.index.reshape(-1)
        return (self.array.reshape(-1), sw, C, n, Hs, Ws, *self.plane)

    def sparse(self, layer: Conv) -> bool:
        """Whether the transposed conv of ``layer`` on this source can run as the sparse kernel. It puts each
        window's (rectified) value at its switch; where windows overlap, a pixel's values are summed there,
        so a rectification AFTER the unpooling (a ReLU below the pool) is not the same unless one before
        already made every value >= 0."""
        if self.kind == bk.UNPOOLED_OVERLAP and self.post and not self.pre:
            return False
        if self.kind == bk.DENSE and not sk.dense_pays(layer.out_channels, layer.in_channels, *layer.kernel):
            return False
        return SPARSE_TRANSPOSE and sk.supports(*layer.kernel, *layer.stride, *layer.padding, self.pool)


def _materialise(src: _Source, b0: int, kc: int):
    """The source as a dense (C, n, Hu, Wu) plane, with its rectifications applied."""
    C, n = src.array.shape[:2]
    out = xp.empty((C, n, *src.plane), dtype=np.float32)
    src_flat, sw, *dims = src.args()
    launch(bk.materialise(src.kind, src.pool), ceil_div(out.size, THREADS), THREADS,
           src_flat, sw, out.reshape(-1), *dims, b0, kc, src.pre, src.post)
    return out


def _route(src: _Source, layer: Conv, out_size, fast: bool) -> str:
    """How the transposed conv of ``layer`` on ``src`` runs: "direct rows", "direct", "tensor cores",
    "sparse" or "gemm"."""
    if layer.in_channels <= DIRECT_MAX_CHANNELS:
        return ("direct rows" if ROWS_DIRECT and src.kind == bk.DENSE and layer.stride == (1, 1)
                else "direct")
    if _tensor_cores(layer.kernel, layer.stride, layer.padding, src.pool, layer.out_channels, layer.in_channels,
                     (src.array.size, layer.in_channels * src.array.shape[1] * out_size[0] * out_size[1]), fast):
        return "tensor cores"
    return "sparse" if src.sparse(layer) else "gemm"


def _transpose_conv(src: _Source, layer: Conv, plan: _ConvPlan, out_size, b0: int, kc: int, fast: bool):
    """G_l of the paper on a source: (O, n, Hu, Wu) → (I, n, H, W), H, W = ``out_size``."""
    O, I, kh, kw = layer.weight.shape
    n = src.array.shape[1]
    H, W = out_size
    out = xp.empty((I, n, H, W), dtype=np.float32)
    geometry = _geometry(layer)
    src_flat, sw, *dims = src.args()  # dims: O, n, Hs, Ws, Hu, Wu
    route = _route(src, layer, out_size, fast)
    if route == "direct rows":
        px = bk.DIRECT_ROW_PIXELS
        launch(bk.direct_rows(I, kh, kw, *layer.padding, px), ceil_div(n * H * ceil_div(W, px), THREADS), THREADS,
               src_flat, plan.weight.reshape(-1), out.reshape(-1), O, n, dims[2], dims[3], H, W, src.pre)
        return out
    if route == "direct":
        launch(bk.direct_transpose(I, *geometry, src.kind, src.pool), ceil_div(n * H * W, THREADS), THREADS,
               src_flat, sw, plan.weight.reshape(-1), out.reshape(-1), *dims, H, W, b0, kc, src.pre, src.post)
        return out
    if route == "tensor cores":
        # the switch offsets of this chunk's images only (signal t is image b0 + t // kc): 32-bit indices
        offsets = _dummy(np.int32) if src.kind == bk.DENSE else src.switches.offsets[b0:b0 + n // kc]
        tc.launch(src.array, offsets, plan.tensor, out, O, I, *dims[1:], H, W, 0, kc, src.pre or src.post,
                  layer.kernel, layer.padding, src.pool)
        return out
    if route == "sparse":
        _launch_sparse(src.array, None if src.kind == bk.DENSE else src.switches.offsets, plan.sparse, None, out,
                       (kh, kw), layer.padding, src.pool, b0, kc, src.pre or src.post)
        return out
    rows = O * kh * kw
    ncols = n * H * W
    out2d = out.reshape(I, ncols)
    block = _column_block(rows, ncols)
    work = xp.empty(rows * min(block, ncols), dtype=np.float32)
    kernel = bk.gather_columns(*geometry, src.kind, src.pool)
    groups = ceil_div(O, bk.GATHER_CHANNELS)
    for j0 in range(0, ncols, block):
        nb = min(block, ncols - j0)
        cols = work[:rows * nb]
        launch(kernel, (ceil_div(nb, THREADS), groups), THREADS, src_flat, sw, cols, nb, j0, *dims, H, W, b0, kc,
               src.pre, src.post)
        dv.gemm_into(plan.transposed, cols.reshape(rows, nb), out2d, j0, fast)
    return out


def _backproject_chunk(net, plan, sizes, z, classes, switches, b0, bc, k0, kc, rectify, fast):
    """R(x|c) of images b0 .. b0+bc-1 and class positions k0 .. k0+kc-1: (C, bc*kc, H, W) and whether a
    rectification is still pending on it."""
    head_i = net.head_index
    n = bc * kc
    B, N, h, w = z.shape
    if plan["fold"] is not None:  # the head, its ReLUs and conv j as one two-channel step (kernels/fold.py)
        top, weight = plan["fold"][0], plan["fold"][1 if rectify else 2]
        layer, folded = net.layers[top], True
    else:
        top, weight, layer, folded = head_i, plan[head_i].weight, net.head, False
    H, W = sizes[top]
    I = layer.in_channels
    signal = xp.empty((I, n, H, W), dtype=np.float32)
    launch(bk.head_signal(*_geometry(layer), folded), ceil_div(n * H * W, THREADS), THREADS,
           z.reshape(-1), classes.reshape(-1), weight.reshape(-1), signal.reshape(-1),
           N, classes.shape[1], h, w, I, n, H, W, b0, k0, kc)
    src = _Source(bk.DENSE, signal, (H, W))
    _mark(f"back {head_i} head" + (f" folded into {top}" if folded else ""))
    for i in range(top - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ReLU):
            if rectify:
                src = src.rectified()
        elif isinstance(layer, MaxPool):
            if src.kind != bk.DENSE:  # two pools in a row: the upper one's plane must exist
                src = _Source(bk.DENSE, _materialise(src, b0, kc), src.plane)
            pool = _geometry(layer)
            src = _Source(bk.source_kind(pool), src.array, tuple(sizes[i]), pre=src.pre, switches=switches[i],
                          pool=pool)
        else:
            how = _route(src, layer, sizes[i], fast) + (" from switches" if src.kind != bk.DENSE else "")
            src = _Source(bk.DENSE, _transpose_conv(src, layer, plan[i], sizes[i], b0, kc, fast), tuple(sizes[i]))
            _mark(f"back {i} Conv {how}")
    if src.kind != bk.DENSE:
        return _materialise(src, b0, kc), False
    return src.array, src.pre


def _backward_bytes_per_signal(net: Network, sizes) -> int:
    """Bytes one (image, class) signal needs at the widest step of the back-projection."""
    head_i = net.head_index
    H, W = sizes[head_i]
    current = net.head.in_channels * H * W  # floats of the signal alive now
    channels = net.head.in_channels
    biggest = current
    pooled = False
    for i in range(head_i - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, Conv):
            produced = layer.in_channels * sizes[i][0] * sizes[i][1]
            biggest = max(biggest, current + produced)
            current, channels, pooled = produced, layer.in_channels, False
        elif isinstance(layer, MaxPool):
            if pooled:  # two pools in a row: the upper one's unpooled plane is materialised
                plane = channels * sizes[i + 1][0] * sizes[i + 1][1]
                biggest = max(biggest, current + plane)
                current = plane
            pooled = True
    if pooled:  # a pool as the first layer: its plane is materialised at the end
        biggest = max(biggest, current + channels * sizes[0][0] * sizes[0][1])
    return 4 * biggest


def _chunks(B: int, K: int, per_signal: int, available: int):
    """(b0, bc, k0, kc) pieces covering the B x K (image, class) pairs within ``available`` bytes."""
    n_max = available // max(per_signal, 1)
    if n_max < 1:
        raise ClearmapsError(f"one (image, class) signal needs about {per_signal >> 20} MiB of GPU memory and "
                             f"only {max(available, 0) >> 20} MiB are available: free GPU memory or raise the "
                             "limit (clearmaps.kernels.cuda.set_memory_limit).")
    if n_max >= K:
        bc, kc = min(B, n_max // K), K
    else:
        bc, kc = 1, n_max
    return [(b0, min(bc, B - b0), k0, min(kc, K - k0)) for b0 in range(0, B, bc) for k0 in range(0, K, kc)]


def _prepare(net, trace, classes):
    _check_net(net)
    z, switches, sizes = _trace_device(net, trace)
    B = z.shape[0]
    if dv.is_device_array(classes):
        classes = dv.tohost(classes)
    classes = np.ascontiguousarray(check_classes(classes, B, net.num_classes))
    return z, switches, sizes, classes


def backproject(net: Network, trace, classes=None, rectify: bool = True, *, fast=None):
    """R(x|c) for each chosen class, (B, K, C, H, W) float32: :func:`clearmaps.reference.backproject`
    on the GPU (host arrays out when the trace holds host arrays)."""
    if not isinstance(rectify, (bool, np.bool_)):
        raise ClearmapsError(f"rectify={rectify!r}; expected True or False.")
    fast = _fast(fast)
    z, switches, sizes, classes = _prepare(net, trace, classes)
    B, K = classes.shape
    C, (H, W) = net.in_channels, sizes[0]
    out = xp.empty((B, K, C, H, W), dtype=np.float32)
    per_signal = _backward_bytes_per_signal(net, sizes) + 4 * C * H * W
    available = _budget() - _column_bytes() - out.nbytes
    classes_dev = dv.asdevice(classes)
    plan = _plan(net)
    for b0, bc, k0, kc in _chunks(B, K, per_signal, available):
        R, rect = _backproject_chunk(net, plan, sizes, z, classes_dev, switches, b0, bc, k0, kc, rectify, fast)
        if rect:
            R = xp.maximum(R, np.float32(0))
        out[b0:b0 + bc, k0:k0 + kc] = R.reshape(C, bc, kc, H, W).transpose(1, 2, 0, 3, 4)
    return dv.tohost(out) if not dv.on_device(trace.z) else out


def _levels(vmax, best_r, level_max):
    """V's normaliser per image, float64 (B,), on the device (see reference.resolve_vmax)."""
    B = best_r.shape[0]
    if vmax is None:
        return level_max.astype(np.float64)
    if isinstance(vmax, str) and vmax == "batch":
        return xp.full(B, float(level_max.max()), dtype=np.float64)
    # percentiles: NumPy's interpolation on the host, the same code as the reference
    return dv.asdevice(resolve_vmax(dv.tohost(best_r), vmax), np.float64)


def clear_from_trace(net: Network, trace, classes, rectify=True, reduce="sum", palette=None, vmax=None,
                     keep_responses=True, *, fast=None) -> Clear:
    """Responses, dominant class and response, and the RGB composite, from a forward trace.

    Same contract as :func:`clearmaps.reference.clear_from_trace`. All (image, class) pairs go through
    as one batch unless they do not fit in GPU memory; with ``keep_responses=False`` the (B, K, H, W) maps
    are never stored. Arrays come back on the GPU (CuPy) when the trace holds GPU arrays, else as NumPy.
    ``fast`` (default: :func:`set_precision`) allows TF32 GEMMs.
    """
    if not isinstance(rectify, (bool, np.bool_)):
        raise ClearmapsError(f"rectify={rectify!r}; expected True or False.")
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    if not isinstance(keep_responses, (bool, np.bool_)):
        raise ClearmapsError(f"keep_responses={keep_responses!r}; expected True or False.")
    _mark("clear entry")
    fast = _fast(fast)
    z, switches, sizes, classes = _prepare(net, trace, classes)
    B, K = classes.shape
    hues = check_palette(palette, K)
    resolve_vmax(np.zeros((1, 1, 1)), vmax)  # refuses a bad vmax before any work
    C, (H, W) = net.in_channels, sizes[0]
    plan = _plan(net)
    responses = xp.empty((B, K, H, W), dtype=np.float32) if keep_responses else xp.empty((1, 1, 1, 1), np.float32)
    best_r = xp.empty((B, H, W), dtype=np.float32)
    best_i = xp.empty((B, H, W), dtype=np.int64)
    rgb = xp.empty((B, H, W, 3), dtype=np.uint8)
    level_max = xp.zeros(B, dtype=np.float32)
    fixed = vmax is not None and not isinstance(vmax, str)
    level = xp.full(B, float(vmax) if fixed else 0.0, dtype=np.float64)
    palette_dev = dv.asdevice(hues, np.float64)
    per_signal = _backward_bytes_per_signal(net, sizes) + 4 * C * H * W
    available = _budget() - _column_bytes() - (responses.nbytes + best_r.nbytes + best_i.nbytes + rgb.nbytes)
    kernel = ek.epilogue(ek.REDUCE_CODES[reduce], bool(keep_responses), fixed, vmax is None or vmax == "batch")
    classes_dev = dv.asdevice(classes)
    _mark("clear start")
    for b0, bc, k0, kc in _chunks(B, K, per_signal, available):
        R, rect = _backproject_chunk(net, plan, sizes, z, classes_dev, switches, b0, bc, k0, kc, rectify, fast)
        launch(kernel, ceil_div(bc * H * W, THREADS), THREADS, R, responses, best_r, best_i, level_max, level,
               palette_dev, rgb, b0, k0, kc, k0 == 0, k0 + kc == K, rect)
        _mark("epilogue")
        del R
    if not fixed:
        level = _levels(vmax, best_r, level_max)
        launch(ek.compose_rgb, ceil_div(best_i.size, THREADS), THREADS, best_i, best_r, level, palette_dev, rgb)
        _mark("compose")
    out = Clear(responses if keep_responses else None, best_i, best_r, rgb)
    if not dv.on_device(trace.z):
        out = Clear(*(dv.tohost(a) for a in out))
    return out


def agreement(net: Network, x, classes=None, reference=None, rectify: bool = True, reduce: str = "sum") -> dict:
    """How often the fast (TF32) mode's dominant class equals the exact one's (or ``reference``'s, a
    Clear computed some other way, e.g. by the float64 reference).

    Returns {"agreement": fraction of all pixels, "decisive_agreement": fraction among pixels whose top
    two exact responses differ by more than 1e-3 of the image's largest response (where TF32's error
    cannot flip the order), "pixels": count}."""
    trace = forward(net, x, fast=False)
    ids = check_classes(classes, np.asarray(dv.tohost(trace.logits)).shape[0], net.num_classes)
    exact = reference or clear_from_trace(net, trace, ids, rectify, reduce, keep_responses=True, fast=False)
    fast_trace = forward(net, x, fast=True)
    quick = clear_from_trace(net, fast_trace, ids, rectify, reduce, keep_responses=False, fast=True)
    ref_index = np.asarray(dv.tohost(exact.dominant_index))
    got = np.asarray(dv.tohost(quick.dominant_index))
    same = ref_index == got
    r = np.sort(np.asarray(dv.tohost(exact.responses), dtype=np.float64), axis=1)
    scale = np.abs(r).reshape(r.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    gap = r[:, -1] - r[:, -2] if r.shape[1] > 1 else np.full(r.shape[:1] + r.shape[2:], np.inf)
    decisive = gap > 1e-3 * np.maximum(scale, 1e-30)
    return {"agreement": float(same.mean()),
            "decisive_agreement": float(same[decisive].mean()) if decisive.any() else 1.0,
            "pixels": int(same.size)}
