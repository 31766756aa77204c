"""warm(net, x): compile, in parallel processes, the sparse kernel's specialisations a network will use.

Numba compiles each specialisation of the sparse kernel (sparse_kernels.py: one per conv geometry, pool,
channels per thread, tile and bias) on its first launch, 4-26 s each on one CPU core, one after another: a
network's first call on the CUDA backend can wait a minute or two before its first map. Compiled kernels are
kept in Numba's file cache (CLEARMAPS_CACHE_DIR), so this is paid once per machine and layer shape.

``warm`` pays it up front and in parallel. It runs the network once on one image with a recorder as the
configuration's profiler, which takes each sparse launch instead of running it (zero-filled outputs: which
kernels a layer needs depends on its shapes, not on its values), then launches each recorded
specialisation once, on zero inputs of the recorded shapes, in its own worker process, so that each
compiles into the file cache. The caller's later calls load them from there.
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
from . import device as dv
from . import pipeline, simulated
from . import sparse_kernels as sk
from .config import Profiler, resolve
from .convs import SparseLaunch
from .validation import check_net

# a worker holds its own CUDA context (100s of MB of GPU memory): the default leaves room on small GPUs
MAX_DEFAULT_JOBS = 8


class Recorder(Profiler):
    """A profiler that takes every sparse launch instead of running it: {kernel name: the launch's recipe}
    (the kernel's factory and arguments, the arrays' shapes), its output zero-filled."""

    def __init__(self):
        self.calls = {}

    def sparse_launch(self, launch: SparseLaunch) -> bool:
        self.calls.setdefault(launch.name, dict(
            build=launch.build, spec=launch.spec, src=tuple(launch.src.shape),
            offsets=None if launch.offsets is None else tuple(launch.offsets.shape),
            weight=tuple(launch.weight.shape), bias=None if launch.bias is None else tuple(launch.bias.shape),
            out=tuple(launch.out.shape), b0=launch.b0, kc=launch.kc, rect=launch.rect))
        launch.out[...] = 0
        return True


def record(net, x, *, fast=None, rectify: bool = True, config=None) -> dict:
    """{specialisation name: the launch that compiles it (factory, arguments, shapes)} for ``net`` on images
    shaped like ``x`` (only its first image is run), in the mode ``fast`` (None: the configuration's
    precision), for maps with or without ``rectify``, with ``config``'s routing (None: the default). For
    warm() and bench/device_warm.py; arguments are not checked here."""
    config, fast = resolve(config, fast)
    recorder = Recorder()
    config = config.replace(profiler=recorder)  # this call's launches only: other calls run as usual
    trace = pipeline.forward(net, x[:1], fast=fast, config=config)  # one image: the batch does not change the kernels
    pipeline.clear_from_trace(net, trace, np.zeros((1, 1), np.int64), rectify, keep_responses=False, fast=fast,
                              config=config)
    return recorder.calls


def compile_one(item):
    """One launch of the recorded kernel on zero inputs: (name, seconds, error or None). Run in a worker, or
    in this process when there is one."""
    name, call = item
    xp = dv.xp

    def zeros(shape, dtype, one=False):  # one: a single signal (src and out are (C, n, H, W))
        return None if shape is None else xp.zeros((shape[0], 1, *shape[2:]) if one else shape, dtype=dtype)

    t = time.perf_counter()
    try:
        SparseLaunch(call["build"], call["spec"], name, zeros(call["src"], "float32", True),
                     zeros(call["offsets"], "int32"), zeros(call["weight"], "float32"), zeros(call["bias"], "float32"),
                     zeros(call["out"], "float32", True), call["b0"], call["kc"], call["rect"]).run()
        if xp.__name__ == "cupy":
            xp.cuda.runtime.deviceSynchronize()
    except Exception as exc:  # reported, not raised: the caller's own call then compiles it itself
        return name, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"
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
    """The sparse kernel (its Numba dispatcher) that a recorded launch runs."""
    return call["build"](*call["spec"])


def _built_here(call) -> bool:
    """Whether this process has the specialisation compiled already (nothing to warm)."""
    return bool(getattr(kernel_of(call), "overloads", None))


def warm(net, x, *, fast=None, rectify: bool = True, jobs=None, config=None) -> dict:
    """Compile the sparse-kernel specialisations that ``explain(net, x, backend="cuda", rectify=rectify)``
    will use, in ``jobs`` parallel processes (default: the usable CPUs less one, at most 8; each holds a CUDA
    context), into the file cache its later calls load from.

    ``x``: images (B, C, H, W) as they will be explained; only the first is run. ``fast``: the precision to
    warm for (None: the configuration's); ``config``: the configuration the calls will use (None: the
    default). Returns {specialisation: seconds its worker
    took}; empty when this process has them all already. When a specialisation fails to compile, or the
    kernel cache is off (CLEARMAPS_CUDA_CACHE=0, or a folder that cannot be written), ``warm`` warns and
    leaves it to the call that needs it, which compiles it itself (and fails there if it must)."""
    check_net(net)
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
    calls = {name: call for name, call in record(net, x, fast=fast, rectify=bool(rectify), config=config).items()
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
