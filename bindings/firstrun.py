"""The first run on a machine: say that the CPU kernels are being compiled, and how far it has got.

The CPU backend's kernels are Numba functions compiled on first use and cached on disk
(``@njit(cache=True)``): the first :func:`clearmaps.explain` on a machine spends half a minute to a minute
compiling them (the built-in model's 21 kernels: 26 s on this project's 2-core machine when quiet, 57 s under
a load of 3), later runs load them in about a second. Numba announces every compile that misses its cache as a ``numba:compile`` event, and never one that
hits it, so the notice below appears exactly when a kernel is compiled, before its compile starts, and never
on a warm cache.

The API logs through the ``clearmaps`` logger: one WARNING when the first kernel starts compiling (shown by
Python's default handler, in a notebook too; silence it with
``logging.getLogger("clearmaps").setLevel(logging.ERROR)``), each kernel at DEBUG, the total at INFO. The
``clearmaps`` command installs a :class:`Reporter` of its own that prints the notice and a progress line.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("clearmaps")

ESTIMATE = "30 to 60 s on 2 cores"
_MODULES = ("clearmaps.kernels",)  # whose compiles are announced: the CPU kernels (not their CUDA siblings)


class Reporter:
    """What is said about a first compile. The default logs; the command line prints (cli_outputs)."""

    def start(self, where: str) -> None:
        log.warning("compiling clearmaps' CPU kernels for this machine, once (%s); they are cached in %s, so "
                    "later runs start at once", ESTIMATE, where)

    def kernel(self, count: int, name: str) -> None:
        log.debug("compiling kernel %d: %s", count, name)

    def done(self, count: int, seconds: float, where: str) -> None:
        log.info("compiled %d kernels in %.0f s; cached in %s", count, seconds, where)


_reporter: Reporter = Reporter()
_lock = threading.Lock()
_depth = 0
_listener = None


def set_reporter(reporter: Reporter | None) -> Reporter:
    """Install ``reporter`` (None: the logging one); returns the previous one."""
    global _reporter
    previous, _reporter = _reporter, reporter if reporter is not None else Reporter()
    return previous


def _is_ours(dispatcher, modules) -> bool:
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module.startswith(modules) and ".cuda" not in module


def _make_listener(modules):
    from numba.core import event

    class Compiles(event.Listener):
        """Counts the compiles of our kernels while a call is inside :func:`compile_notice`."""

        def __init__(self):
            self.count = 0
            self.started = None
            self.where = None

        def on_start(self, ev):
            dispatcher = (ev.data or {}).get("dispatcher")
            if dispatcher is None or not _is_ours(dispatcher, modules):
                return
            self.count += 1
            if self.started is None:
                self.started = time.perf_counter()
                cache = getattr(dispatcher, "_cache", None)
                self.where = getattr(cache, "_cache_path", None) or "Numba's cache folder"
                _reporter.start(self.where)
            _reporter.kernel(self.count, getattr(dispatcher.py_func, "__name__", "?"))

        def on_end(self, ev):
            pass

    return Compiles()


@contextmanager
def compile_notice(impl=None, modules=_MODULES):
    """Announce, through the installed :class:`Reporter`, the kernels Numba compiles inside this block.

    ``impl`` is the backend module about to run (nothing is watched for the NumPy reference); blocks may
    nest (only the outermost reports). ``modules``: whose compiles count (module name prefixes).
    """
    global _depth, _listener
    if getattr(impl, "__name__", "") == "clearmaps.reference" or "numba" not in sys.modules:
        yield  # the NumPy reference has no kernels; without Numba loaded nothing can compile
        return
    from numba.core import event

    with _lock:
        _depth += 1
        outer = _depth == 1
        if outer:
            _listener = _make_listener(tuple(modules))
            event.register("numba:compile", _listener)
        listener = _listener
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if outer:
                event.unregister("numba:compile", listener)
                _listener = None
        if outer and listener.count:
            _reporter.done(listener.count, time.perf_counter() - listener.started, listener.where)
