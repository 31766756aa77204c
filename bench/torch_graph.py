"""The peers of the graph benchmarks (issue 16): deconvnet maps of any torch classifier without clearmaps.

Both take a model, the head declaration of ``tests/archs.py`` (``HEADS``; format in ``tests/graph_oracle.py``)
and a batch, and return R(x|c) as float32 (B, K, C, H, W): the input gradient of E_c = ½·Σ z_L[c]² with every
ReLU's backward replaced by ReLU of the incoming gradient (DESIGN.md, "Networks as graphs").

``PlainTorchDeconvnet``: the best plain torch a careful user would write. A ``TorchFunctionMode`` swaps
every ReLU call (``nn.ReLU`` modules and ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` and their in-place
forms) for an ``autograd.Function`` whose backward rectifies; an in-place call returns its result out of
place, which is what forward code that uses the returned tensor (all of torchvision's) needs. Then either

- ``strategy="vmap"`` (the default: faster on this machine, see ``python -m bench.torch_graph``): one
  forward pass under ``torch.func.vjp``, then the K classes' backward passes as one ``vmap`` of the VJP over
  the K seeds ∂E_c/∂z_L (z_L[c] on channel c, zero elsewhere);
- ``strategy="repeat"``: the batch repeated once per class, one forward of B·K images, one backward with each
  copy's seed.

``CaptumDeconvnet``: Captum's ``Deconvolution`` on the forward function x ↦ (E_c)_c, one ``attribute`` call
per class (a forward and a backward each). Captum overrides ``nn.ReLU`` modules only, so where forward code
calls ``F.relu`` (GoogLeNet everywhere, DenseNet at its head: ``tests/archs.py`` ``RELUS``) its map is the
plain gradient at those ReLUs, not the deconvnet's. Where the head itself needs a ReLU (DenseNet's
``F.relu`` between features and pool) this class computes it functionally, as the model does.

Parameters never require grad here (only the input gradient is wanted), as a careful user would set.

``python -m bench.torch_graph`` checks both peers against the float64 oracle (``tests/graph_oracle.py``) on
every tiny architecture, then times ``vmap``, ``repeat`` and Captum on ResNet-50 (``--archs`` for others),
224×224, batch 1, its top-10 classes, float32, interleaved round by round, and prints the medians.

Measured on the 2-core development VM (no GPU; torch 2.13 CPU, 2 threads), ResNet-50, top-10, float32, per
image: in the two quiet runs (medians of 3 and of 5) vmap 0.79 / 0.89 s, repeat 1.32 / 1.40 s, Captum 1.65 /
1.69 s (process CPU time about twice the wall time: both threads busy); in four more runs under
other sessions' load (load average 3 to 27, so seconds rather than tenths) vmap was the fastest every time,
repeat taking 1.4 to 2.2 times and Captum 2.1 to 7 times as long: hence ``vmap`` is the default. (Under load,
MobileNetV2 once had repeat 8 % ahead of vmap, once 1.5x behind; DenseNet-121 repeat 1.6 to 1.8x behind.)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from clearmaps.reference import ClearmapsError

STRATEGIES = ("vmap", "repeat")


class _DeconvReLU(torch.autograd.Function):
    """relu forward; relu of the incoming gradient backward. The functorch form (setup_context, generated
    vmap rule) so that torch.func.vjp and vmap can run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return torch.relu(g)


_RELU_CALLS = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}


class DeconvReLUs(TorchFunctionMode):
    """Inside this context every ReLU call back-propagates relu(gradient). In-place calls are computed out of
    place (their result is returned; the input is left as it was)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_CALLS:
            return _DeconvReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def _head(head) -> tuple:
    ok = isinstance(head, (tuple, list)) and head and (
        tuple(head) == ("logits",)
        or (head[0] == "feature_map" and len(head) == 2)
        or (head[0] == "linear_at_positions" and len(head) == 3)
        or (head[0] == "linear_at_positions" and len(head) == 4 and head[3] == "relu"))
    if not ok or not all(isinstance(h, str) for h in head):
        raise ClearmapsError(f"head={head!r}; expected ('logits',), ('feature_map', module_path) or "
                             "('linear_at_positions', linear_path, features_path[, 'relu']).")
    return tuple(head)


def _prepared(model: nn.Module, head: tuple, dtype) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ClearmapsError(f"model is {type(model).__name__}; expected a torch.nn.Module.")
    if dtype not in (torch.float32, torch.float64):
        raise ClearmapsError(f"dtype={dtype}; expected torch.float32 or torch.float64.")
    m = copy.deepcopy(model).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for path in head[1:3]:
        try:
            m.get_submodule(path)
        except AttributeError:
            raise ClearmapsError(f"head {head!r}: {path!r} is not a submodule of {type(model).__name__}.") from None
    if head[0] == "linear_at_positions" and not isinstance(m.get_submodule(head[1]), nn.Linear):
        raise ClearmapsError(f"head {head!r}: {head[1]!r} is {type(m.get_submodule(head[1])).__name__}; "
                             "expected nn.Linear.")
    return m


def class_map_of(model: nn.Module, head: tuple, x: Tensor) -> Tensor:
    """z_L (B, N, h, w) of one forward pass, with whatever ReLU rule the caller's context sets."""
    if head[0] == "logits":
        return model(x)[:, :, None, None]
    store = {}
    handle = model.get_submodule(head[2] if head[0] == "linear_at_positions" else head[1]).register_forward_hook(
        lambda mod, inp, out: store.__setitem__("f", out))
    try:
        model(x)
    finally:
        handle.remove()
    f = store["f"]
    if head[0] == "feature_map":
        return f
    if len(head) == 4:
        f = F.relu(f)
    linear = model.get_submodule(head[1])
    z = torch.einsum("bchw,nc->bnhw", f, linear.weight)
    return z if linear.bias is None else z + linear.bias[:, None, None]


def _check_x(x, dtype) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point() or 0 in x.shape:
        raise ClearmapsError(f"x must be a non-empty float tensor (B, C, H, W); got "
                             f"{getattr(x, 'shape', type(x).__name__)}.")
    return x.detach().to(dtype)


def _class_ids(classes, z_mean: Tensor | None, batch: int, num_classes: int | None) -> Tensor:
    """(B, K) int64 ids: ``classes`` is K (the top K by logit: needs ``z_mean``), K shared ids, or (B, K)."""
    if isinstance(classes, int) and not isinstance(classes, bool):
        if z_mean is None or not 1 <= classes <= z_mean.shape[1]:
            raise ClearmapsError(f"classes={classes}: top-k needs 1 <= k <= the number of classes.")
        return torch.topk(z_mean, classes, dim=1).indices
    ids = torch.as_tensor(np.asarray(classes))
    if ids.dtype not in (torch.int64, torch.int32) or ids.ndim not in (1, 2) or ids.numel() == 0:
        raise ClearmapsError(f"classes={classes!r}; expected an int k (top k), K class ids or (B, K) ids.")
    ids = ids.long()
    ids = ids.expand(batch, -1) if ids.ndim == 1 else ids
    if ids.shape[0] != batch:
        raise ClearmapsError(f"classes has {ids.shape[0]} rows for a batch of {batch}; expected (B, K).")
    if num_classes is not None and (ids.min() < 0 or ids.max() >= num_classes):
        raise ClearmapsError(f"classes holds ids outside 0..{num_classes - 1}.")
    return ids


def _seeds(z: Tensor, ids: Tensor) -> Tensor:
    """(K, B, N, h, w): ∂E_c/∂z_L for each image's k-th class, z_L[b, c] on channel c and zero elsewhere."""
    B, K = ids.shape
    seeds = z.new_zeros(K, *z.shape)
    b = torch.arange(B)
    for k in range(K):
        seeds[k, b, ids[:, k]] = z[b, ids[:, k]]
    return seeds


class PlainTorchDeconvnet:
    """Deconvnet maps in plain torch: one forward, the K backward passes batched (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        The classifier (copied, cast to ``dtype``, eval mode).
    head : tuple
        Its head declaration (``tests/archs.py`` ``HEADS``).
    strategy : {"vmap", "repeat"}
        ``torch.func.vjp`` + ``vmap`` over the seeds, or the batch repeated once per class.
    dtype : torch.dtype
        float32 (benchmarks) or float64.
    """

    def __init__(self, model: nn.Module, head, strategy: str = "vmap", dtype=torch.float32):
        if strategy not in STRATEGIES:
            raise ClearmapsError(f"strategy={strategy!r}; expected one of {STRATEGIES}.")
        self.head = _head(head)
        self.model = _prepared(model, self.head, dtype)
        self.strategy, self.dtype = strategy, dtype

    def _z(self, x: Tensor) -> Tensor:
        with DeconvReLUs():
            return class_map_of(self.model, self.head, x)

    def responses(self, x: Tensor, classes) -> Tensor:
        """R(x|c), (B, K, C, H, W) in the peer's dtype. ``classes``: an int k (the top k of this forward's
        logits), K shared ids, or (B, K) ids."""
        x = _check_x(x, self.dtype)
        B = x.shape[0]
        if self.strategy == "vmap":
            z, vjp = torch.func.vjp(self._z, x)
            ids = _class_ids(classes, z.mean((2, 3)), B, z.shape[1])
            (r,) = torch.func.vmap(vjp)(_seeds(z.detach(), ids))
            return r.transpose(0, 1)
        if isinstance(classes, int) and not isinstance(classes, bool):  # top-k needs a forward of its own
            with torch.no_grad():
                ids = _class_ids(classes, class_map_of(self.model, self.head, x).mean((2, 3)), B, None)
        else:
            ids = _class_ids(classes, None, B, None)
        K = ids.shape[1]
        xr = x.repeat_interleave(K, dim=0).requires_grad_(True)  # row b*K + k: image b for its k-th class
        z = self._z(xr)
        flat = ids.reshape(-1)
        if flat.max() >= z.shape[1] or flat.min() < 0:
            raise ClearmapsError(f"classes holds ids outside 0..{z.shape[1] - 1}.")
        rows = torch.arange(B * K)
        seed = torch.zeros_like(z)
        seed[rows, flat] = z.detach()[rows, flat]
        (r,) = torch.autograd.grad(z, xr, seed)
        return r.reshape(B, K, *x.shape[1:])


class _Energies(nn.Module):
    """x ↦ (B, N) with entry c = E_c = ½ Σ_{h,w} z_L[c]², the forward function Captum differentiates."""

    def __init__(self, model: nn.Module, head: tuple):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (class_map_of(self.model, self.head, x) ** 2).sum((2, 3))


def captum_available() -> str | None:
    return None if importlib.util.find_spec("captum") is not None else (
        "Captum is not installed (pip install captum, or the project's 'bench' extra)")


class CaptumDeconvnet:
    """Captum's ``Deconvolution`` on x ↦ (E_c)_c, one ``attribute`` call per class (module docstring).

    Parameters
    ----------
    model, head, dtype
        As for ``PlainTorchDeconvnet``.
    """

    def __init__(self, model: nn.Module, head, dtype=torch.float32):
        why = captum_available()
        if why:
            raise ClearmapsError(why)
        from captum.attr import Deconvolution

        self.head = _head(head)
        self.model = _prepared(model, self.head, dtype)
        self.dtype = dtype
        self.energies = _Energies(self.model, self.head)
        self.deconvolution = Deconvolution(self.energies)

    def responses(self, x: Tensor, classes) -> Tensor:
        """R(x|c), (B, K, C, H, W). ``classes`` as for ``PlainTorchDeconvnet.responses`` (top k costs one
        more forward here)."""
        import warnings

        x = _check_x(x, self.dtype)
        B = x.shape[0]
        if isinstance(classes, int) and not isinstance(classes, bool):
            with torch.no_grad():
                ids = _class_ids(classes, class_map_of(self.model, self.head, x).mean((2, 3)), B, None)
        else:
            ids = _class_ids(classes, None, B, None)
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(ReLU|require gradients).*")
            for k in range(ids.shape[1]):
                out.append(self.deconvolution.attribute(x.clone().requires_grad_(True),
                                                        target=ids[:, k].tolist()).detach())
        return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------
# python -m bench.torch_graph: correctness on every tiny architecture, then the ResNet-50 timing


def check_against_oracle(k: int = 2, batch: int = 2, rtol: float = 1e-4) -> list[dict]:
    """Each peer in float32 against the float64 graph oracle on every tiny architecture of tests/archs.py,
    for each image's top-k classes (a class map that is all zero, as a fixed class of SqueezeNet's ReLU head
    can be, would make the comparison vacuous). Returns one row per (architecture, peer) with the relative
    error; Captum's rows also say whether the architecture has functional ReLUs (where Captum is expected to
    differ)."""
    from tests import archs
    from tests.graph_oracle import graph_responses
    from tests.tolerances import rel_err

    rows = []
    for name in sorted(archs.ARCHS):
        model = archs.build(name, 6, tiny=True)
        x = archs.example_input(name, batch)
        with torch.no_grad():
            ids = torch.topk(model.double()(x), k, dim=1).indices
        model.float()
        want = graph_responses(model, archs.HEADS[name], x, ids.numpy())
        if not (np.abs(want).reshape(batch * k, -1).max(axis=1) > 0).all():
            raise AssertionError(f"{name}: a top-{k} class has an all-zero map; the check would be vacuous")
        peers = {f"torch-{s}": PlainTorchDeconvnet(model, archs.HEADS[name], s) for s in STRATEGIES}
        if captum_available() is None:
            peers["captum"] = CaptumDeconvnet(model, archs.HEADS[name])
        for peer, impl in peers.items():
            got = impl.responses(x.float(), ids).double().numpy()
            err = rel_err(got, want)
            expected_wrong = peer == "captum" and archs.RELUS[name] in ("functional", "mixed")
            rows.append({"arch": name, "peer": peer, "rel_err": err, "relus": archs.RELUS[name],
                         "ok": (err > rtol) if expected_wrong else (err <= rtol),
                         "expected": "differs (functional ReLUs)" if expected_wrong else f"<= {rtol:g}"})
    return rows


def time_peers(name: str = "resnet50", repeats: int = 5, k: int = 10, with_captum: bool = True) -> dict:
    """Median seconds per call of each peer on the full-size architecture ``name`` (1000 classes, 224×224),
    batch 1, its top-k classes, float32, the calls interleaved round by round after one warm-up call each."""
    from tests import archs

    model = archs.build(name, 1000)
    head = archs.HEADS[name]
    x = archs.example_input(name, 1, tiny=False, seed=1, dtype=torch.float32)
    with torch.no_grad():
        ids = torch.topk(model(x), k, dim=1).indices
    peers = {f"torch-{s}": PlainTorchDeconvnet(model, head, s) for s in STRATEGIES}
    if with_captum and captum_available() is None:
        peers["captum"] = CaptumDeconvnet(model, head)
    # the warm-up calls; their maps compared with the first peer's (float32 against float32)
    results = {n: peer.responses(x, ids) for n, peer in peers.items()}
    first = next(iter(results.values()))
    agreement = {n: float((r - first).norm() / first.norm()) for n, r in results.items()}
    times = {n: [] for n in peers}
    cpu = {n: [] for n in peers}  # process CPU seconds: less at the mercy of a shared machine's load
    for _ in range(repeats):
        for n, peer in peers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            peer.responses(x, ids)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return {"arch": name, "median_s": {n: statistics.median(t) for n, t in times.items()},
            "all_s": times, "median_cpu_s": {n: statistics.median(t) for n, t in cpu.items()},
            "rel_diff_to_first": agreement,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor()}".strip()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet50", help="comma-separated names of tests/archs.py")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--no-captum", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_check:
        rows = check_against_oracle()
        for r in rows:
            print(f"{r['arch']:20s} {r['peer']:13s} rel err {r['rel_err']:.2e}  expected {r['expected']:27s} "
                  f"{'ok' if r['ok'] else 'FAILED'}")
        if not all(r["ok"] for r in rows):
            raise SystemExit("a peer disagrees with the oracle")
    for name in args.archs.split(","):
        res = time_peers(name, args.repeats, args.top_k, with_captum=not args.no_captum)
        print(f"{name} 224x224, batch 1, top-{args.top_k}, float32, {res['threads']} threads:")
        for peer, t in res["median_s"].items():
            print(f"  {peer:13s} median {t * 1e3:8.1f} ms (CPU {res['median_cpu_s'][peer] * 1e3:8.1f} ms)   runs "
                  f"{[round(v * 1e3) for v in res['all_s'][peer]]}   rel diff to "
                  f"{next(iter(res['median_s']))}: {res['rel_diff_to_first'][peer]:.1e}")


if __name__ == "__main__":
    main()
