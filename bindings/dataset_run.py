"""A whole dataset through :func:`clearmaps.explain` into a results store (:mod:`clearmaps.store`).

    from clearmaps.datasets import open_dataset
    from clearmaps.dataset_run import RunOptions, run_dataset
    ds = open_dataset("ds/", net.class_names)                    # ImageFolder tree, glob, CSV or .npz
    summary = run_dataset(net, ds, "results/", RunOptions(backend="cpu"))

The dataset is cut into chunks of ``batch_size`` images; each chunk is read, explained in one call and
written (arrays, then its table part) by :func:`explain_chunk` + :meth:`ResultsStore.write_chunk`, in this
process (the default: no Dask needed) or on Dask workers (:mod:`clearmaps.distributed`). Both run the same
function on the same chunks, so they write the same bytes. A rerun does only the chunks not yet done.
What one chunk does and what the table holds per image: :mod:`clearmaps.dataset_chunk`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from .dataset_chunk import RunOptions, _bad_rows, _n_maps, array_specs, explain_chunk
from .datasets import Dataset
from .reference import ClearmapsError, Network

# The chunk's names, where they were before the chunk moved out of this module: ``clearmaps.dataset_run.X``
# and ``from .dataset_run import X`` keep working
from .dataset_chunk import DEFAULT_TAU, THUMBNAIL_SIDE, TOP_K  # noqa: F401
from .dataset_chunk import class_shares, table_schema, thumbnail_size  # noqa: F401

RESPONSE_BUDGET = {"cuda": 1 << 30}  # bytes of (B, K, H, W) responses a default batch may hold
DEFAULT_BUDGET = 256 << 20
MAX_BATCH = 256


def default_batch_size(net: Network, n_maps: int, size, backend: str) -> int:
    """Images per chunk when none is asked for: as many as keep the (B, K, H, W) float32 responses within
    the backend's budget (256 MiB on the host, 1 GiB on a GPU), between 1 and 256."""
    h, w = size
    per_image = max(1, n_maps * h * w * 4)
    budget = RESPONSE_BUDGET.get(backend, DEFAULT_BUDGET)
    return int(max(1, min(MAX_BATCH, budget // per_image)))


def store_settings(net: Network, dataset: Dataset, options: RunOptions, batch_size: int, size,
                   model_identity: str) -> dict:
    """Everything the store's bytes depend on; a rerun with anything else is refused (unless --force)."""
    from . import __version__

    c = net.input_shape[0]
    explain = {k: v for k, v in options.explain_kwargs().items()}
    explain["classes"] = None if options.classes is None else (
        options.classes if isinstance(options.classes, str) else list(options.classes))
    from .explanation import explain as explain_fn

    method = inspect.signature(explain_fn).parameters.get("method")
    if method is not None:  # the response method, once explain has them: other maps, other settings
        explain["method"] = options.method or method.default
    return {
        "clearmaps": __version__,
        "count": len(dataset), "chunk_size": int(batch_size), "size": list(size), "channels": c,
        "arrays": array_specs(net, options, size, c),
        "model": {"identity": model_identity, "class_names": list(net.class_names),
                  "input_shape": list(net.input_shape)},
        "dataset": {"kind": dataset.kind, "identity": dataset.identity(), "labelled": dataset.labelled},
        "explain": explain,
        "preprocess": options.transform.settings(),
        "table": {"tau": options.tau, "top_k": options.top_k},
        # not skip_bad: a chunk with a bad image is never written without it, so --skip-bad may be added to
        # finish a run that stopped at one
    }


def network_identity(net: Network) -> str:
    """A digest of a network's structure and weights, for a model given as a Python object."""
    import hashlib
    import pickle

    return "network:" + hashlib.sha256(pickle.dumps(net, protocol=4)).hexdigest()


# ---- progress -----------------------------------------------------------------------------------------------

class RunProgress:
    """Images done, images/s and the time left: a tqdm bar on a terminal, else a line every ``every`` s
    (logs and pipes get a few lines, not a bar redrawn in place)."""

    def __init__(self, total: int, done: int, quiet: bool, every: float = 10.0, out=None):
        self.total, self.done, self.quiet, self.every = total, done, quiet, every
        self.out = out or sys.stderr
        self.start, self.last, self.new = time.perf_counter(), time.perf_counter(), 0
        self.bar = None
        if not quiet and getattr(self.out, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc="explaining", unit="img", file=self.out,
                                dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                pass

    def rate(self) -> float:
        return self.new / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int) -> None:
        self.done += n
        self.new += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            rate = self.rate()
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            print(f"explaining: {self.done:,}/{self.total:,} images, {rate:.1f} img/s, "
                  f"about {_duration(left)} left", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- the run ------------------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    store: object
    explained: int  # images explained by this run
    already: int  # images found done
    seconds: float
    bad: list  # (file, why) of images skipped as bad by this run

    @property
    def images_per_second(self) -> float:
        return self.explained / self.seconds if self.seconds > 0 else 0.0


def prepare_run(net: Network, dataset: Dataset, out, options: RunOptions, batch_size: int | None = None,
                model_identity: str | None = None, force: bool = False):
    """Create (or resume) the store for this run; returns (store, size, chunks to do)."""
    from .backends import BACKENDS
    from .store import create_store

    if not isinstance(net, Network):
        raise ClearmapsError(f"net is a {type(net).__name__}; expected a clearmaps Network.")
    if not isinstance(dataset, Dataset):
        raise ClearmapsError(f"dataset is a {type(dataset).__name__}; expected a clearmaps.datasets.Dataset "
                             "(clearmaps.datasets.open_dataset).")
    if options.backend not in BACKENDS:
        raise ClearmapsError(f"backend={options.backend!r}; expected one of {BACKENDS}.")
    c, h, w = net.input_shape
    size = (h, w) if h is not None else dataset.first_size(options.transform, c)
    if batch_size is None:
        batch_size = default_batch_size(net, _n_maps(net, options.classes), size,
                                        _resolved(options.backend))
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ClearmapsError(f"batch_size={batch_size!r}; expected a positive int.")
    settings = store_settings(net, dataset, options, int(batch_size), size,
                              model_identity or network_identity(net))
    store = create_store(out, settings, force=force)
    todo = [i for i in range(store.chunks) if i not in store.done()]
    return store, size, todo


def _resolved(backend: str) -> str:
    if backend != "auto":
        return backend
    from .backends import get_backend

    return get_backend("auto").__name__.rsplit(".", 1)[-1]


def run_dataset(net: Network, dataset: Dataset, out, options: RunOptions = RunOptions(),
                batch_size: int | None = None, model_identity: str | None = None, force: bool = False,
                workers: int | None = None, scheduler: str | None = None, quiet: bool = True,
                progress_out=None) -> RunSummary:
    """Explain every image of ``dataset`` into the results store at ``out`` (see :mod:`clearmaps.store`).

    Parameters
    ----------
    net : Network
    dataset : clearmaps.datasets.Dataset
    out : str or path
        The store folder (or an fsspec URL every writer can reach).
    options : RunOptions
    batch_size : int, optional
        Images per chunk (default: sized to the backend, see :func:`default_batch_size`).
    model_identity : str, optional
        What identifies the model in the settings (default: a digest of ``net``).
    force : bool
        Start over even if the store holds results (of these or other settings).
    workers : int, optional
        Run the chunks on a dask.distributed LocalCluster with this many worker processes.
    scheduler : str, optional
        Run them on the Dask cluster at this address (tcp://HOST:PORT).
    quiet : bool
        No progress bar or lines.

    Returns
    -------
    RunSummary
    """
    if workers is not None and scheduler is not None:
        raise ClearmapsError("give workers (a local cluster) or scheduler (a running one), not both.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ClearmapsError(f"workers={workers!r}; expected a positive int.")
    if workers is not None or scheduler is not None:
        try:
            from .distributed import run_chunks
        except ImportError as exc:
            raise ClearmapsError(f"a Dask run needs dask.distributed ({exc}): pip install 'dask[distributed]', "
                                 "or run in this process instead.") from None
    store, size, todo = prepare_run(net, dataset, out, options, batch_size, model_identity, force)
    already = store.count - sum(store.bounds(i)[1] - store.bounds(i)[0] for i in todo)
    t0 = time.perf_counter()
    bar = RunProgress(store.count, already, quiet, out=progress_out)
    bad: list = []
    try:
        if workers is None and scheduler is None:
            for chunk in todo:
                start, stop = store.bounds(chunk)
                arrays, table = explain_chunk(net, dataset, start, stop, options, size)
                store.write_chunk(chunk, arrays, table)
                bad += _bad_rows(table)
                bar.update(stop - start)
        else:

            bad = run_chunks(net, dataset, store, todo, options, size, workers=workers, scheduler=scheduler,
                             progress=bar.update)
    finally:
        bar.close()
    store.finish()
    return RunSummary(store, store.count - already, already, time.perf_counter() - t0, bad)
