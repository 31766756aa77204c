"""clearmaps.kernels.cpu: the reference's functions, fast, on the CPU (Numba, float32).

What it computes: the same CLEAR maps as :mod:`clearmaps.reference` (Eqs. 1–6; docs/design.md), in float32,
with the same switches (first maximum in row-major window order) and the same colour bytes.

How it runs
-----------
- forward: images go channel-last (B, H, W, C); a conv is a Numba sparse gather (inputs listed without
  their zeros, then each output pixel sums value × weight row), or on the image itself (fewer than 8
  channels, no zeros to skip) a register-blocked dense kernel; max pooling records switches in a Numba
  kernel. No BLAS anywhere: its thread pool would spin against Numba's.
- back-projection: every (image, class) signal runs the whole plan of :func:`_plan` inside one Numba
  call, the pairs spread over ``numba.get_num_threads()`` workers, each with two ping-pong planes.
  A transposed conv first lists its input's non-zero entries as compressed sparse rows (after a
  rectification about half are zero), then each output pixel sums value × weight row over the entries
  that reach it. Unpool + rectify + transposed conv is fused: the sparse rows of the UNPOOLED plane are
  built straight from the pooled values and their switches (a quarter of that plane at most is non-zero,
  and it is never built densely) — :func:`unpool_conv_transpose2d` exposes it.
- dominant class and composite: with ``keep_responses=False`` the pairs run in chunks and each chunk's
  channel-reduced maps update a running max / argmax, so the (B, K, H, W) maps never exist
  (:func:`attentive_dominant`); the colour pass is a Numba kernel doing colorsys's float64 arithmetic.

Every buffer is a NumPy array allocated here in Python (the kernels allocate nothing). Input checks are
the reference's (``check_array``, ``check_pair``, ``check_input``, ``check_classes``, ``check_palette``).
The single operators and the colour pass live in :mod:`clearmaps.kernels.cpu_ops` (re-exported here);
every graph (a network that is not the paper's chain) runs in :mod:`clearmaps.kernels.cpu_graph`.
"""

from __future__ import annotations

import weakref

import numba
import numpy as np

from clearmaps.reference import REDUCTIONS, Clear, ClearmapsError, Conv, MaxPool, Network, ReLU, Trace
from clearmaps.reference import check_classes, check_input, check_method, check_palette, image_of, resolve_vmax, softmax

from . import _cpu_kernels as K
from . import cpu_graph
from .cpu_ops import (_compose, _conv_nhwc, _pool_nhwc, compose, conv2d, conv_transpose2d, dominant,  # noqa: F401
                      max_pool_with_switches, reduce_channels, unpool, unpool_conv_transpose2d)
from .fold import fold_head

__all__ = [
    "attentive_dominant", "backproject", "clear_from_trace", "compose", "conv2d", "conv_transpose2d",
    "dominant", "forward", "is_available", "max_pool_with_switches", "reduce_channels", "unpool",
    "unpool_conv_transpose2d",
]

_CHUNK_BYTES = 8 << 20         # keep_responses=False: a chunk's reduced maps take at most this
_CHUNK_PARTS = 4               # ... and at most 1/4 of the (image, class) pairs
_FEW_CHANNELS = 8             # transposed convs to fewer channels than this take dot products instead
_REDUCE = {"sum": K.REDUCE_SUM, "max": K.REDUCE_MAX, "norm": K.REDUCE_NORM}


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


# ------------------------------------------------------------------------------------------------ weights
class _Prepared:
    """A network's weights in the layouts the kernels read, made once per Network object."""

    def __init__(self, net: Network):
        self.fwd = {}       # conv i → its (kh, kw, I, O) weights as a (kh*kw*I, O) float32 matrix, and (O,) bias
        self.offset = {}    # conv i → offset of its weights in ``flat``, laid out (kh, kw, O, I), and
                            # for the head (N, kh, kw, I): kernel c's block is a (kh, kw, 1, I) layer
        self.few = {}       # conv i with few input channels → offset of its (I, kh, kw, O) weights
        parts, total = [], 0
        for i, layer in enumerate(net.layers):
            if isinstance(layer, Conv):
                w = np.asarray(layer.weight, dtype=np.float32)
                o = w.shape[0]
                self.fwd[i] = (np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, o)),
                                np.asarray(layer.bias, dtype=np.float32))
                layout = (0, 2, 3, 1) if i == net.head_index else (2, 3, 0, 1)
                parts.append(np.ascontiguousarray(w.transpose(*layout)).ravel())
                self.offset[i] = total
                total += parts[-1].size
                if w.shape[1] < _FEW_CHANNELS:
                    parts.append(np.ascontiguousarray(w.transpose(1, 2, 3, 0)).ravel())
                    self.few[i] = total
                    total += parts[-1].size
        self.fold = self._fold_head(net, parts, total)
        self.flat = np.concatenate(parts)

    @staticmethod
    def _fold_head(net: Network, parts, total):
        """The folded head (kernels/fold.py) in this backend's weight layout (kh, kw, 2, I) per class:
        (conv index, offset rectified, offset linear) or None."""
        folded = fold_head(net, _FEW_CHANNELS)
        if folded is None:
            return None
        j, rectified, linear = folded
        offsets = []
        for v in (rectified, linear):
            parts.append(np.ascontiguousarray(v, dtype=np.float32).ravel())
            offsets.append(total)
            total += parts[-1].size
        return j, offsets[0], offsets[1]


_PREPARED: "weakref.WeakKeyDictionary[Network, _Prepared]" = weakref.WeakKeyDictionary()


def _prepared(net: Network) -> _Prepared:
    p = _PREPARED.get(net)
    if p is None:
        p = _PREPARED[net] = _Prepared(net)
    return p


# ------------------------------------------------------------------------------------------------ forward
def forward(net: Network, x, method: str = "deconvnet") -> Trace:
    """Run ``net`` on ``x`` (B, C, H, W) in float32, recording switches and layer sizes.

    Returns a :class:`clearmaps.reference.Trace` like the reference's: ``z`` (B, N, h, w), ``logits`` and
    ``probabilities`` float32; switches int64 (B, C, oh, ow) with the reference's tie rule.
    """
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    method, rule = check_method(method)
    if not net.is_chain:
        return cpu_graph.forward(net, x, method)
    x = check_input(net, x)
    prep = _prepared(net)
    a = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)
    sizes, switches, saved = [], {}, {}
    for i, layer in enumerate(net.layers):
        sizes.append(tuple(int(s) for s in a.shape[1:3]))
        if isinstance(layer, Conv):
            a = _conv_nhwc(a, layer, *prep.fwd[i])
        elif isinstance(layer, ReLU):
            if rule in ("guided", "gradient"):
                # the ReLU's signs [x > 0], channel-last as the kernels read them, seen channel-first as the
                # reference keeps them (a view: no copy either way)
                saved[i] = (a > 0).transpose(0, 3, 1, 2)
            np.maximum(a, 0, out=a)
        else:
            a, sw = _pool_nhwc(a, layer)
            switches[i] = np.ascontiguousarray(sw.transpose(0, 3, 1, 2))
    sizes.append(tuple(int(s) for s in a.shape[1:3]))
    if method == "input_x_gradient":
        saved[-1] = np.asarray(x, dtype=np.float32)
    z = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    logits = z.mean(axis=(2, 3), dtype=np.float64)
    return Trace(tuple(sizes), switches, z, logits.astype(np.float32), softmax(logits).astype(np.float32),
                 None, saved)


# ------------------------------------------------------------------------------------------ back-projection
class _Plan:
    """The back-projection of one network for one input size, as rows of int64 fields (see _cpu_kernels)."""

    def __init__(self, net: Network, sizes, rule: str):
        prep = _prepared(net)
        code = {"identity": K.RULE_NONE, "rectify": K.RULE_RECTIFY, "guided": K.RULE_GUIDED,
                "gradient": K.RULE_GRADIENT}[rule]
        masked = code in (K.RULE_GUIDED, K.RULE_GRADIENT)
        self.masks = {}  # ReLU layer → (offset in the mask array, per-image count), for guided / gradient
        channels = [net.in_channels]  # channels[i] = channels of layer i's input
        for layer in net.layers:
            channels.append(layer.out_channels if isinstance(layer, Conv) else channels[-1])
        self.max_plane = max(int(np.prod(s)) * c for s, c in zip(sizes, channels))
        self.max_channels = max(channels)
        # a worker's sparse-row buffers hold a plane's entries and its pixels' row starts
        self.work = max(self.max_plane, max(int(np.prod(s)) for s in sizes) + 1)
        self.pools = {}  # pool layer → (offset in the switch array, per-image count)
        rows = []

        def row(kind, **f):
            r = np.zeros(K.NFIELDS, dtype=np.int64)
            r[K.F_KIND] = kind
            for name, value in f.items():
                r[getattr(K, "F_" + name.upper())] = value
            rows.append(r)

        def conv_fields(i):
            layer = net.layers[i]
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.padding
            return dict(woff=prep.offset[i], woff_few=prep.few.get(i, -1), i=layer.in_channels, kh=kh, kw=kw,
                        sh=sh, sw=sw, ph=ph, pw=pw, out_h=sizes[i][0], out_w=sizes[i][1])

        def rule_fields(relu):
            """F_RECT and the mask fields of a pending ReLU (layer ``relu``, or None: no rule)."""
            if relu is None:
                return dict(rect=K.RULE_NONE)
            if not masked:
                return dict(rect=code)
            if relu not in self.masks:
                self.masks[relu] = (sum(n for _, n in self.masks.values()), int(np.prod(sizes[relu])) * channels[relu])
            return dict(rect=code, moff=self.masks[relu][0], mcount=self.masks[relu][1])

        def pool_fields(j):
            c = channels[j]
            count = int(np.prod(sizes[j + 1])) * c
            if j not in self.pools:
                self.pools[j] = (sum(n for _, n in self.pools.values()), count)
            return dict(swoff=self.pools[j][0], swcount=count, in_h=sizes[j + 1][0], in_w=sizes[j + 1][1],
                        uh=sizes[j][0], uw=sizes[j][1])

        hi = net.head_index
        if prep.fold is not None and not masked:  # head, ReLUs and the conv below as one step (_fold_head)
            top = prep.fold[0]
            f = conv_fields(top)
            f["woff"] = prep.fold[1] if code == K.RULE_RECTIFY else prep.fold[2]
            row(K.HEAD_FOLDED, o=net.num_classes, in_h=sizes[hi + 1][0], in_w=sizes[hi + 1][1], **f)
        else:
            top = hi
            row(K.HEAD, o=net.num_classes, in_h=sizes[hi + 1][0], in_w=sizes[hi + 1][1], **conv_fields(hi))
        # pool: the MaxPool whose unpooling is pending; relu: the ReLU whose rule is pending (None: none)
        pool, relu = None, None
        for i in range(top - 1, -1, -1):
            layer = net.layers[i]
            if isinstance(layer, ReLU):
                if code == K.RULE_NONE:
                    continue
                if pool is not None and _overlapping(net.layers[pool]):
                    # windows that share a switch add before the ReLU: build the unpooled plane first
                    row(K.UNPOOL, o=channels[pool], **rule_fields(relu), **pool_fields(pool))
                    pool, relu = None, None
                if relu is None:  # two ReLUs in a row have one sign pattern: the first rule stands for both
                    relu = i
            elif isinstance(layer, MaxPool):
                if pool is not None:
                    row(K.UNPOOL, o=channels[pool], **rule_fields(relu), **pool_fields(pool))
                    pool, relu = None, None
                if relu is not None:
                    row(K.RECTIFY, size=int(np.prod(sizes[i + 1])) * channels[i + 1], **rule_fields(relu))
                    relu = None
                pool = i
            else:
                f = conv_fields(i)
                if i in prep.few:  # few output channels: dot products, from a built unpooled plane
                    if pool is not None:
                        row(K.UNPOOL, o=channels[pool], **rule_fields(relu), **pool_fields(pool))
                        pool, relu = None, None
                    row(K.CONV_T_FEW, o=layer.out_channels, in_h=sizes[i + 1][0], in_w=sizes[i + 1][1],
                        **rule_fields(relu), **f)
                elif pool is not None:
                    row(K.CONV_T_POOLED, o=layer.out_channels, **rule_fields(relu), **{**pool_fields(pool), **f})
                else:
                    row(K.CONV_T, o=layer.out_channels, in_h=sizes[i + 1][0], in_w=sizes[i + 1][1],
                        **rule_fields(relu), **f)
                pool, relu = None, None
        if pool is not None:
            row(K.UNPOOL, o=channels[pool], **rule_fields(relu), **pool_fields(pool))
        elif relu is not None:
            row(K.RECTIFY, size=int(np.prod(sizes[0])) * channels[0], **rule_fields(relu))
        self.steps = np.stack(rows)
        self.weights = prep.flat


def _overlapping(pool: MaxPool) -> bool:
    return pool.stride[0] < pool.kernel[0] or pool.stride[1] < pool.kernel[1]


def _check_trace(net: Network, trace) -> None:
    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    if not isinstance(trace, Trace):
        raise ClearmapsError(f"trace is a {type(trace).__name__}; expected the Trace that forward(net, x) returns.")
    z = np.asarray(trace.z)
    hi = net.head_index
    if len(trace.sizes) != len(net.layers) + 1 or z.ndim != 4 or z.shape[1] != net.num_classes \
            or tuple(z.shape[2:]) != tuple(trace.sizes[-1]) \
            or set(trace.switches) != {i for i, layer in enumerate(net.layers) if isinstance(layer, MaxPool)}:
        raise ClearmapsError("trace does not belong to this network (layer sizes, z or switches differ); "
                             "compute it with forward(net, x) for the same net.")
    if tuple(trace.sizes) != tuple(tuple(s) for s in net.layer_sizes(trace.sizes[0])) or hi < 0:
        raise ClearmapsError("trace.sizes do not follow from the network for its input size; use forward(net, x).")


def _switch_array(plan: _Plan, trace: Trace, batch: int) -> np.ndarray:
    """Every pool's switches, channel-last int32 per image, one after another (see _Plan.pools)."""
    total = sum(count for _, count in plan.pools.values())
    out = np.empty(batch * total, dtype=np.int32)
    for j, (offset, count) in plan.pools.items():
        sw = np.asarray(trace.switches[j])
        out[batch * offset:batch * (offset + count)] = sw.transpose(0, 2, 3, 1).ravel()
    return out


def _mask_array(plan: _Plan, trace: Trace, batch: int) -> np.ndarray:
    """Every masked ReLU's signs [x > 0], channel-last uint8 per image, one layer after another (see
    _Plan.masks); empty when the plan's rule reads no mask."""
    total = sum(count for _, count in plan.masks.values())
    out = np.empty(batch * total, dtype=np.uint8)
    saved = trace.saved or {}
    for j, (offset, count) in plan.masks.items():
        if j not in saved:
            raise ClearmapsError(f"trace lacks the signs of ReLU layer {j}, which this method needs on the way back; "
                                 "compute it with forward(net, x, method=...) for the method you ask.")
        signs = np.asarray(saved[j]).transpose(0, 2, 3, 1)
        out[batch * offset:batch * (offset + count)] = signs.reshape(-1)
    return out


class _Job:
    """One back-projection job: plan, switches, z and the (image, class) pairs, ready for the kernel."""

    def __init__(self, net: Network, trace: Trace, classes, rectify: bool = True, method: str = "deconvnet"):
        _check_trace(net, trace)
        method, rule = check_method(method, rectify)
        z = np.asarray(trace.z)
        B = z.shape[0]
        self.classes = check_classes(classes, B, net.num_classes)
        self.B, self.K = self.classes.shape
        self.plan = _Plan(net, trace.sizes, rule)
        # the plan's switch and mask offsets are per-image counts; scale them to the batch layout
        steps = self.plan.steps.copy()
        for r in steps:
            if r[K.F_KIND] in (K.CONV_T_POOLED, K.UNPOOL):
                r[K.F_SWOFF] *= B
            r[K.F_MOFF] *= B
        self.steps = steps
        self.switches = _switch_array(self.plan, trace, B)
        self.masks = _mask_array(self.plan, trace, B)
        if method == "input_x_gradient":
            image = np.asarray(image_of(trace), dtype=np.float32)
            self.images = np.ascontiguousarray(image.transpose(0, 2, 3, 1)).reshape(B, -1)
        else:
            self.images = np.zeros((0, 1), dtype=np.float32)
        self.z = np.ascontiguousarray(z, dtype=np.float32).reshape(B * z.shape[1], -1)
        self.H, self.W = trace.sizes[0]
        self.C = net.in_channels
        self.pairs = np.stack([np.repeat(np.arange(self.B, dtype=np.int64), self.K),
                               self.classes.reshape(-1)], axis=1)
        self.nworkers = max(1, min(numba.get_num_threads(), len(self.pairs)))
        self.scratch = np.empty((self.nworkers, 2, self.plan.max_plane), dtype=np.float32)
        self.wsf = np.empty((self.nworkers, 1, self.plan.work), dtype=np.float32)
        self.wsi = np.empty((self.nworkers, 3, self.plan.work), dtype=np.int32)

    def run(self, lo, hi, reduce_code, out):
        """out[:hi-lo] ← the maps of pairs lo..hi-1."""
        K._backproject_pairs(self.steps, self.plan.weights, self.switches, self.masks, self.z, self.pairs[lo:hi],
                             self.H, self.W, self.C, reduce_code, self.scratch, self.wsf, self.wsi, out, self.images)


def _fused(net, method) -> bool:
    """Whether the fused chain kernels compute this: the paper's chain, with any method."""
    return isinstance(net, Network) and net.is_chain


def backproject(net: Network, trace: Trace, classes=None, rectify: bool = True, method: str = "deconvnet") -> np.ndarray:
    """R(x|c) for each chosen class (Eq. 3): float32 (B, K, C, H, W); the reference's signature."""
    method, rule = check_method(method, rectify)
    if not _fused(net, method):
        return cpu_graph.backproject_method(net, trace, classes, method, rule)
    job = _Job(net, trace, classes, rectify, method)
    out = np.empty((job.B * job.K, job.C * job.H * job.W), dtype=np.float32)
    job.run(0, len(job.pairs), K.REDUCE_NONE, out)
    return out.reshape(job.B, job.K, job.C, job.H, job.W)


def attentive_dominant(net: Network, trace: Trace, classes=None, rectify: bool = True, reduce: str = "sum",
                       keep_responses: bool = True, method: str = "deconvnet"):
    """Fused channel reduction + Eqs. 4–5: (responses (B, K, H, W) or None, dominant index (B, H, W) int64
    into the K classes, dominant response (B, H, W) float32).

    With ``keep_responses=False`` the (image, class) pairs run in chunks whose channel-reduced maps update a
    running max / argmax (first class wins ties) and are then overwritten: memory stays at one chunk.
    """
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    method, rule = check_method(method, rectify)
    if not _fused(net, method):
        out = cpu_graph.clear_from_trace(net, trace, classes, method, rule, reduce, None, None, keep_responses,
                                         lambda *a: None)
        return out.responses, out.dominant_index, out.dominant_response
    job = _Job(net, trace, classes, rectify, method)
    P, n = len(job.pairs), job.H * job.W
    image, position = job.pairs[:, 0].copy(), np.tile(np.arange(job.K, dtype=np.int64), job.B)
    best = np.empty((job.B, n), dtype=np.float32)
    index = np.empty((job.B, n), dtype=np.int64)
    code = _REDUCE[reduce]
    if keep_responses:
        maps = np.empty((P, n), dtype=np.float32)
        job.run(0, P, code, maps)
        K._merge_dominant(maps, image, position, best, index)
        responses = maps.reshape(job.B, job.K, job.H, job.W)
    else:
        # at most a quarter of the pairs (so never all K maps) and _CHUNK_BYTES, at least one per worker;
        # few chunks keep the parallel launches few (waking the thread pool costs ~1 ms on a busy machine)
        chunk = max(job.nworkers, min(-(-P // _CHUNK_PARTS), _CHUNK_BYTES // (4 * n)))
        chunk -= chunk % job.nworkers
        maps = np.empty((chunk, n), dtype=np.float32)
        for lo in range(0, P, chunk):
            hi = min(P, lo + chunk)
            job.run(lo, hi, code, maps)
            K._merge_dominant(maps[:hi - lo], image[lo:hi], position[lo:hi], best, index)
        responses = None
    return responses, index.reshape(job.B, job.H, job.W), best.reshape(job.B, job.H, job.W)


def clear_from_trace(net: Network, trace: Trace, classes, rectify=True, reduce="sum", palette=None, vmax=None,
                     keep_responses=True, method="deconvnet") -> Clear:
    """Everything after the forward pass, fused: responses (if kept), dominant class and response, RGB.

    Same signature and results as :func:`clearmaps.reference.clear_from_trace` (float32 responses).
    """
    if reduce not in REDUCTIONS:
        raise ClearmapsError(f"reduce={reduce!r}; expected one of {REDUCTIONS}.")
    method, rule = check_method(method, rectify)
    if not _fused(net, method):
        return cpu_graph.clear_from_trace(net, trace, classes, method, rule, reduce, palette, vmax, keep_responses,
                                          _compose)
    _check_trace(net, trace)
    B = np.asarray(trace.z).shape[0]
    k = check_classes(classes, B, net.num_classes).shape[1]
    hues = check_palette(palette, k)
    resolve_vmax(np.zeros((1, 1, 1)), vmax)  # refuse a bad vmax before the work, not after
    responses, index, response = attentive_dominant(net, trace, classes, rectify, reduce, keep_responses, method)
    return Clear(responses, index, response, _compose(index, response, hues, vmax))
