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

The first run() is timed apart ("first call": Numba compilation or cache loading, cuDNN autotuning, lazy
init), then ``warmup`` more runs, then ``repeats`` timed runs of which the median is reported.
:func:`run_methods` (what bench/run.py uses) interleaves the timed runs of all methods round by round, so
that a shared machine's changing load does not favour whichever method ran in a quiet minute.
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
    # a method's own forward switches ({pool layer: int64 (B, C, oh, ow)}), when it can say
    switches: dict | None = None
    # oracle only: the float64 back-projection through given switches (see compare)
    with_switches: Callable[[dict], "Output"] | None = None


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
    """Agreement of a method's output with the oracle's; "ok" says whether it meets the contract.

    A float32 forward pass can pick another switch than float64 where a pooling window holds two values
    within rounding of each other (deep layers of a randomly initialised VGG16 at 224×224 have a few), and
    one such flip moves a whole window's share of the map. So when a method reports its switches and they
    differ, the oracle is recomputed in float64 THROUGH THOSE SWITCHES (the rest of the contract is
    unchanged), and the number of flips is reported."""
    info = {}
    if out.switches is not None and oracle.with_switches is not None:
        flips = sum(int((np.asarray(out.switches[i]) != np.asarray(oracle.switches[i])).sum())
                    for i in oracle.switches)
        info["switch_flips_vs_float64"] = flips
        if flips:
            oracle = oracle.with_switches(out.switches)
    ref_r = oracle.responses
    mask = decisive(ref_r)
    info["decisive_fraction"] = float(mask.mean())
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


def _prepare(method: Method, case, oracle: Output, log=print):
    """Setup, first call (timed apart), correctness check. Returns (Result, Prepared or None)."""
    res = Result(case.name, method.name, method.device, "ok")
    if method.small_only and not case.spec.small:
        res.status, res.why = "skipped", "small cases only"
        return res, None
    why = method.available()
    if why:
        res.status, res.why = "skipped", why
        return res, None
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
            return res, None
        return res, prepared
    except Exception as exc:  # one broken method must not hide the others' results
        res.status, res.why = "error", f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
        return res, None


def _timer(prepared: Prepared):
    return prepared.timer or (lambda fn, k: wall_timer(fn, k, prepared.sync))


def _finish(res: Result, prepared: Prepared, log=print):
    try:
        res.median_s = statistics.median(res.times_s)
        if prepared.memory:
            res.memory = prepared.memory()
        if prepared.extra:
            res.extra = prepared.extra()
    except Exception as exc:
        res.status, res.why = "error", f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())


def run_method(method: Method, case, oracle: Output, repeats: int, warmup: int, log=print) -> Result:
    """One method alone: first call, check, ``warmup`` runs, ``repeats`` timed runs (median reported)."""
    res, prepared = _prepare(method, case, oracle, log)
    if prepared is None:
        return res
    try:
        timer = _timer(prepared)
        if warmup:
            timer(prepared.run, warmup)
        res.times_s = [float(t) for t in timer(prepared.run, method.repeats or repeats)]
    except Exception as exc:
        res.status, res.why = "error", f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
        return res
    _finish(res, prepared, log)
    return res


SETTLE_S = 0.25  # pause before each timed run (see run_methods)


def run_methods(methods, case, oracle: Output, repeats: int, warmup: int, log=print) -> list:
    """Every method on one case, timed INTERLEAVED: round r runs each method once, so a change in the
    machine's load (a shared machine) hits all methods alike and the ratios stay fair. A method with its
    own ``repeats`` (a slow one) takes part in that many rounds only.

    Each timed run starts SETTLE_S after the previous one ended: thread pools keep spinning for a while
    after their work (OpenBLAS's ~0.1 s, OpenMP's — Numba's and torch's — less), and on a 2-core machine
    a pool the previous method left spinning takes a core from the next one."""
    prepared = []
    for method in methods:
        log(f"  {method.name}: setup, first call, check ...")
        res, prep = _prepare(method, case, oracle, log)
        if prep is None:
            log(f"    {res.status}: {res.why}; check {res.check}")
        else:
            log(f"    first call {res.first_call_s:.2f} s; check {res.check}")
        prepared.append((method, res, prep))
    live = [(m, r, p) for m, r, p in prepared if p is not None]
    for m, r, p in live:
        if warmup and not m.repeats:
            _timer(p)(p.run, warmup)
    for round_ in range(max([m.repeats or repeats for m, _, _ in live], default=0)):
        for m, r, p in live:
            if round_ < (m.repeats or repeats) and r.status == "ok":
                time.sleep(SETTLE_S)
                try:
                    r.times_s += [float(t) for t in _timer(p)(p.run, 1)]
                except Exception as exc:
                    r.status, r.why = "error", f"{type(exc).__name__}: {exc}"
                    log(traceback.format_exc())
    for m, r, p in live:
        if r.status == "ok":
            _finish(r, p, log)
    return [r for _, r, _ in prepared]


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
                         f"class {100 * c['class_agreement']:.2f}%"
                         + (f", {c['switch_flips_vs_float64']} switch flips" if c.get("switch_flips_vs_float64")
                            else ""))
        else:
            cells = [r.method, r.device] + ["–"] * (4 + len(baselines)) + [f"{r.status}: {r.why}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fmt_bytes(n):
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    return f"{n / 2**20:.1f} MiB"
