"""The benchmark harness: a registry of methods, a correctness check against the oracle, and timing.

A **method** is registered once (in ``bench/methods_cpu.py``, ``bench/methods_cuda.py``, ...) with
:func:`register`. For each case the harness calls ``method.setup(case)``, which does the untimed work
(building modules, uploading weights and images) and returns a :class:`Prepared`:

    run()            the timed work: forward + every class's attentive response + dominant class + RGB
                     composite, composite only (no K maps kept) where the method can do that
    check()          untimed: an :class:`Output` (NumPy) compared with the oracle before any timing
    sync()           optional: wait for the device, called after each run() under the wall-clock timer
    timer(fn, n)     optional: a custom timer returning n times in seconds (e.g. :func:`cuda_event_timer`)
    memory()         optional: peak memory figures (bytes) of a composite-only run and of an all-K-maps run
    extra()          optional: other figures for the JSON and the log (e.g. cold compile time)

The first run() is timed apart ("first call": Numba compilation, cuDNN autotuning, lazy init), then
``warmup`` more runs, then ``repeats`` timed runs of which the median is reported.
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tests.tolerances import RTOL_F32, decisive, rel_err


@dataclass
class Output:
    """What a method hands back for checking, as NumPy arrays."""

    dominant_index: np.ndarray              # (B, H, W) position into the case's K classes
    dominant_response: np.ndarray           # (B, H, W)
    rgb: np.ndarray | None = None           # (B, H, W, 3) uint8
    responses: np.ndarray | None = None     # (B, K, H, W)


@dataclass
class Prepared:
    run: Callable[[], Any]
    check: Callable[[], Output]
    sync: Callable[[], None] | None = None
    timer: Callable[[Callable[[], Any], int], list] | None = None
    memory: Callable[[], dict] | None = None
    extra: Callable[[], dict] | None = None
    notes: str = ""


@dataclass(frozen=True)
class Method:
    """A way to compute CLEAR maps.

    name       short key used on the command line and in the JSON ("cpu", "torch-cpu", "cuda-fast", ...)
    device     "cpu" or "cuda": ``--device`` picks which methods run
    setup      case -> Prepared
    available  () -> None when it can run here, else a sentence saying why not
    exact      held to the float32 tolerance; False (TF32/bf16 modes) reports agreement without failing
    small_only run only on cases marked small (the NumPy reference)
    baseline   the table shows every method's speed-up against it
    repeats    override the run's repeat count (slow methods), or None
    """

    name: str
    device: str
    setup: Callable[[Any], Prepared]
    description: str = ""
    available: Callable[[], str | None] = lambda: None
    exact: bool = True
    small_only: bool = False
    baseline: bool = False
    repeats: int | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def wall_timer(fn, n, sync=None):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def cuda_event_timer(fn, n):
    """Times n calls of fn with CUDA events on torch's current stream (seconds)."""
    import torch

    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


@dataclass
class Result:
    case: str
    method: str
    device: str
    status: str                    # "ok", "wrong", "skipped", "error"
    why: str = ""
    first_call_s: float | None = None
    times_s: list = field(default_factory=list)
    median_s: float | None = None
    check: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    notes: str = ""

    def per_image_ms(self, batch):
        return None if self.median_s is None else 1e3 * self.median_s / batch


def compare(out: Output, oracle: Output, exact: bool) -> dict:
    """Agreement of a method's output with the oracle's; "ok" says whether it meets the contract."""
    ref_r = oracle.responses
    mask = decisive(ref_r)
    info = {"decisive_fraction": float(mask.mean())}
    ok = True
    if out.responses is not None:
        info["responses_rel_err"] = rel_err(out.responses, ref_r)
        ok &= info["responses_rel_err"] <= RTOL_F32
    best = np.take_along_axis(ref_r, np.asarray(out.dominant_index)[:, None], axis=1)[:, 0]
    info["dominant_response_rel_err"] = rel_err(out.dominant_response, oracle.dominant_response)
    ok &= info["dominant_response_rel_err"] <= RTOL_F32
    same = np.asarray(out.dominant_index) == oracle.dominant_index
    info["class_agreement"] = float(same.mean())
    info["class_agreement_decisive"] = float(same[mask].mean()) if mask.any() else 1.0
    ok &= bool(same[mask].all())
    # where the method picked another class, its pick must be a near-tie in the oracle's responses
    info["max_regret"] = float((oracle.dominant_response - best).max()) if best.size else 0.0
    if out.rgb is not None and oracle.rgb is not None:
        diff = np.abs(out.rgb.astype(np.int16) - oracle.rgb.astype(np.int16))
        info["rgb_max_byte_diff_decisive"] = int(diff[mask].max(initial=0))
        info["rgb_equal_fraction"] = float((diff == 0).all(axis=-1).mean())
        ok &= info["rgb_max_byte_diff_decisive"] <= 1
    info["ok"] = bool(ok) if exact else True
    return info


def run_method(method: Method, case, oracle: Output, repeats: int, warmup: int, log=print) -> Result:
    res = Result(case.name, method.name, method.device, "ok")
    if method.small_only and not case.spec.small:
        res.status, res.why = "skipped", "small cases only"
        return res
    why = method.available()
    if why:
        res.status, res.why = "skipped", why
        return res
    try:
        prepared = method.setup(case)
        res.notes = prepared.notes
        t0 = time.perf_counter()
        prepared.run()
        if prepared.sync:
            prepared.sync()
        res.first_call_s = time.perf_counter() - t0
        res.check = compare(prepared.check(), oracle, method.exact)
        if not res.check["ok"]:
            res.status, res.why = "wrong", "output differs from the oracle beyond the float32 contract"
            return res
        n = method.repeats or repeats
        timer = prepared.timer or (lambda fn, k: wall_timer(fn, k, prepared.sync))
        if warmup:
            timer(prepared.run, warmup)
        res.times_s = [float(t) for t in timer(prepared.run, n)]
        res.median_s = statistics.median(res.times_s)
        if prepared.memory:
            res.memory = prepared.memory()
        if prepared.extra:
            res.extra = prepared.extra()
    except Exception as exc:  # one broken method must not hide the others' results
        res.status, res.why = "error", f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
    return res


def table(case, results: list[Result]) -> str:
    """Markdown table: ms/image, images/s, GFLOP/s against the counted FLOPs, ratio to each baseline."""
    B, flops = case.batch, case.flops["total"]
    timed = {r.method: r for r in results if r.median_s}
    baselines = [m for m in timed if METHODS[m].baseline]
    head = ["method", "device", "ms/image", "images/s", "GFLOP/s", "first call s"] + \
           [f"× {b}" for b in baselines] + ["check"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.median_s:
            cells = [r.method, r.device, f"{r.per_image_ms(B):.3f}", f"{B / r.median_s:.1f}",
                     f"{flops / r.median_s / 1e9:.1f}", f"{r.first_call_s:.2f}"]
            cells += [f"{timed[b].median_s / r.median_s:.2f}" for b in baselines]
            c = r.check
            cells.append(f"rel {c.get('responses_rel_err', c.get('dominant_response_rel_err')):.1e}, "
                         f"class {100 * c['class_agreement']:.2f}%")
        else:
            cells = [r.method, r.device] + ["–"] * (4 + len(baselines)) + [f"{r.status}: {r.why}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fmt_bytes(n):
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    return f"{n / 2**20:.1f} MiB"
