"""warm(net, x): compile, in parallel processes, the sparse kernel's specialisations a network will use.

Numba compiles each specialisation of the sparse kernel (sparse_kernels.py: one per conv geometry, pool,
channels per thread, tile and bias) on its first launch, 4-26 s each on one CPU core, one after another: a
network's first call on the CUDA backend can wait a minute or two before its first map. Compiled kernels are
kept in Numba's file cache (CLEARMAPS_CACHE_DIR), so this is paid once per machine and layer shape.

``warm`` pays it up front and in parallel. It runs the network once on one image with the sparse launcher
replaced by a recorder (zero-filled outputs: which kernels a layer needs depends on its shapes, not on its
values), then launches each recorded specialisation once, on zero inputs of the recorded shapes, in its own
worker process, so that each compiles into the file cache. The caller's later calls load them from there.
Under Numba's CUDA simulator (which compiles nothing) the same steps run, which is how CI tests them.

The workers are spawned, so a script that calls ``warm`` must keep its top-level code under
``if __name__ == "__main__":`` (each worker imports the script's main module, as with any multiprocessing
code); without it the workers fail to start, and ``warm`` warns and returns instead of compiling.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ...reference import ClearmapsError
from . import backend, simulated
from . import sparse_kernels as sk

# what _launch_sparse reads besides its arguments: a worker sets them as the caller had them when recording
KNOB_NAMES = ("TILE_ROWS", "TILE_COLS", "MAX_CHANNELS_PER_THREAD", "EAGER_OFFSETS")
# a worker holds its own CUDA context (100s of MB of GPU memory): the default leaves room on small GPUs
MAX_DEFAULT_JOBS = 8


def record(net, x, *, fast=None, rectify: bool = True) -> dict:
    """{specialisation name: the launch that compiles it (shapes, geometry, knobs)} for ``net`` on images
    shaped like ``x`` (only its first image is run), in the mode ``fast`` (None: the current precision), for
    maps with or without ``rectify``. For warm() and bench/device_warm.py; arguments are not checked here."""
    calls = {}

    def recorder(src, offsets, weight, bias, out, kernel, padding, pool, b0, kcount, rect):
        name = sk.kernel_name(*sk.specialisation(kernel, padding, pool, out.shape[0], bias is not None))
        calls.setdefault(name, dict(
            src=tuple(src.shape), offsets=None if offsets is None else tuple(offsets.shape),
            weight=tuple(weight.shape), bias=None if bias is None else tuple(bias.shape), out=tuple(out.shape),
            kernel=tuple(kernel), padding=tuple(padding), pool=pool, b0=b0, kc=kcount, rect=rect,
            knobs={k: getattr(sk, k) for k in KNOB_NAMES}))
        out[...] = 0

    token = backend.SPARSE_RECORDER.set(recorder)  # this thread's launches only: other threads run as usual
    try:
        trace = backend.forward(net, x[:1], fast=fast)  # one image: the batch does not change the kernels
        backend.clear_from_trace(net, trace, np.zeros((1, 1), np.int64), rectify, keep_responses=False,
                                 fast=fast)
    finally:
        backend.SPARSE_RECORDER.reset(token)
    return calls


def compile_one(item):
    """One launch of the real launcher on zero inputs, with the knobs it was recorded under (restored after):
    (name, seconds, error or None). Run in a worker, or in this process when there is one."""
    name, call = item
    xp = backend.xp
    saved = {k: getattr(sk, k) for k in call["knobs"]}

    def zeros(shape, dtype, one=False):  # one: a single signal (src and out are (C, n, H, W))
        return None if shape is None else xp.zeros((shape[0], 1, *shape[2:]) if one else shape, dtype=dtype)

    t = time.perf_counter()
    try:
        for k, v in call["knobs"].items():
            setattr(sk, k, v)
        backend._launch_sparse(zeros(call["src"], "float32", True), zeros(call["offsets"], "int32"),
                               zeros(call["weight"], "float32"), zeros(call["bias"], "float32"),
                               zeros(call["out"], "float32", True), call["kernel"], call["padding"], call["pool"],
                               call["b0"], call["kc"], call["rect"])
        if xp.__name__ == "cupy":
            xp.cuda.runtime.deviceSynchronize()
    except Exception as exc:  # reported, not raised: the caller's own call then compiles it itself
        return name, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"
    finally:
        for k, v in saved.items():
            setattr(sk, k, v)
    return name, time.perf_counter() - t, None


def compile_all(calls: dict, jobs: int):
    """Yield (name, seconds, error or None) of compile_one over ``calls`` as each finishes: in ``jobs``
    spawned processes, or in this one when jobs is 1 or there is one call. Workers that cannot start, or
    die, end the pool: what was left is yielded with the error instead of waiting for it forever."""
    items = sorted(calls.items())
    if jobs < 1:
        raise ValueError(f"compile_all: jobs {jobs}; expected at least 1")
    if jobs == 1 or len(items) <= 1:
        yield from map(compile_one, items)
        return
    left = dict(items)
    try:
        with ProcessPoolExecutor(min(jobs, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(compile_one, item) for item in items]):
                result = future.result()
                left.pop(result[0], None)
                yield result
    except BrokenProcessPool as exc:
        for name in sorted(left):
            yield name, 0.0, (f"the worker processes stopped: {exc} A script that calls warm must do so under "
                              "`if __name__ == '__main__':`, or each worker runs it again")


def default_jobs() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (a container's limit)
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(MAX_DEFAULT_JOBS, cpus - 1))


def kernel_of(call):
    """The sparse kernel (its Numba dispatcher) that a recorded launch runs, with the knobs as they are now."""
    return sk.sparse_transpose(*sk.specialisation(call["kernel"], call["padding"], call["pool"], call["out"][0],
                                                  call["bias"] is not None))


def _built_here(call) -> bool:
    """Whether this process has the specialisation compiled already (nothing to warm)."""
    return bool(getattr(kernel_of(call), "overloads", None))


def warm(net, x, *, fast=None, rectify: bool = True, jobs=None) -> dict:
    """Compile the sparse-kernel specialisations that ``explain(net, x, backend="cuda", rectify=rectify)``
    will use, in ``jobs`` parallel processes (default: the usable CPUs less one, at most 8; each holds a CUDA
    context), into the file cache its later calls load from.

    ``x``: images (B, C, H, W) as they will be explained; only the first is run. ``fast``: the precision to
    warm for (None: the current one, :func:`set_precision`). Returns {specialisation: seconds its worker
    took}; empty when this process has them all already. When a specialisation fails to compile, or the
    kernel cache is off (CLEARMAPS_CUDA_CACHE=0, or a folder that cannot be written), ``warm`` warns and
    leaves it to the call that needs it, which compiles it itself (and fails there if it must)."""
    backend._check_net(net)
    if jobs is None:
        jobs = default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise ClearmapsError(f"jobs is {jobs!r}; expected a whole number of processes, at least 1.")
    if not isinstance(rectify, (bool, np.bool_)):
        raise ClearmapsError(f"rectify is {rectify!r}; expected True or False.")
    shape = getattr(x, "shape", None)
    if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(s, (int, np.integer)) for s in shape)
            and shape[0] >= 1):
        raise ClearmapsError(f"x has shape {shape}; expected images (B, C, H, W) with B >= 1, shaped as they "
                             "will be explained.")
    calls = {name: call for name, call in record(net, x, fast=fast, rectify=bool(rectify)).items()
             if not _built_here(call)}
    uncached = sorted(name for name, call in calls.items() if not getattr(kernel_of(call), "file_cached", True))
    if uncached and not simulated():
        warnings.warn(f"clearmaps.kernels.cuda.warm: the kernel cache is off (CLEARMAPS_CUDA_CACHE=0, or "
                      f"{sk.cache_root()} cannot be written), so {len(uncached)} kernels compile on first use "
                      "instead", RuntimeWarning, stacklevel=2)
        return {}
    done = {}
    for name, seconds, error in compile_all(calls, int(jobs)):
        if error is None:
            done[name] = seconds
        else:
            warnings.warn(f"clearmaps.kernels.cuda.warm: {name} did not compile ({error}); the call that needs "
                          "it will compile it itself", RuntimeWarning, stacklevel=2)
    return done
