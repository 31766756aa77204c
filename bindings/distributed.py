"""Chunks of a dataset run on a Dask cluster: a LocalCluster of worker processes on this machine
(``workers=N``) or a running cluster (``scheduler="tcp://HOST:PORT"``, or ``"config"``: the address in Dask's
own configuration, ``scheduler-address`` / ``DASK_SCHEDULER_ADDRESS``). Paths travel absolute, so workers
elsewhere find the images and the store where this process does (a shared filesystem or an fsspec URL).

Only :func:`clearmaps.dataset_run.run_dataset` imports this module, and only when a cluster is asked for:
the in-process run needs no Dask.

- **The model is loaded once per worker.** It travels once, in a worker plugin that the scheduler keeps and
  gives to every worker, a restarted one included; each task finds it in its process.
- **A task is one chunk**: it reads its images itself (a slice of the listing travels with it, not the
  pixels), explains them with :func:`clearmaps.dataset_run.explain_chunk` (the function the in-process run
  calls) and writes the chunk to the shared store. It returns only a few numbers.
- **A dying worker costs a retry, never a lost or doubled chunk.** The scheduler runs a dead worker's tasks
  again elsewhere (up to ``distributed.scheduler.allowed-failures`` deaths per task); a chunk is written
  whole, commit last, and writing it twice writes the same bytes.
"""

from __future__ import annotations

import os
import pickle
import time

from distributed import Client, LocalCluster, WorkerPlugin, as_completed

from .reference import ClearmapsError

_MODELS: dict = {}  # token -> Network, in each worker process
_STORES: dict = {}  # url -> ResultsStore, in each worker process


class ModelPlugin(WorkerPlugin):
    """Puts the network into every worker process once (and into every worker that joins later)."""

    def __init__(self, token: str, payload: bytes):
        self.token, self.payload = token, payload

    def setup(self, worker):
        _MODELS[self.token] = pickle.loads(self.payload)

    def teardown(self, worker):
        _MODELS.pop(self.token, None)


def chunk_task(token: str, url: str, dataset, chunk: int, options, size) -> tuple:
    """One chunk on a worker: explain it and write it to the store. Returns (chunk, images, bad rows,
    seconds spent in explain_chunk, seconds writing)."""
    from .dataset_chunk import _bad_rows, explain_chunk
    from .store import open_store

    net = _MODELS.get(token)
    if net is None:  # a worker that missed the plugin: cannot happen unless the plugin failed
        raise ClearmapsError(f"worker {os.getpid()} has no model {token[:12]}; the model plugin did not run.")
    store = _STORES.get(url)
    if store is None:
        store = _STORES[url] = open_store(url)
    start, stop = store.bounds(chunk)
    t0 = time.perf_counter()
    arrays, table = explain_chunk(net, dataset, start, stop, options, size)
    t1 = time.perf_counter()
    store.write_chunk(chunk, arrays, table)
    return chunk, stop - start, _bad_rows(table), t1 - t0, time.perf_counter() - t1


def _local_cluster(workers: int):
    import logging

    # Numba's threads shared out among the worker processes, so that N workers do not each start one thread
    # per core on the same cores
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.ERROR, env=env)


def connect(workers: int | None = None, scheduler: str | None = None):
    """(client, cluster or None): a new LocalCluster of ``workers`` processes, or the cluster at ``scheduler``."""
    if scheduler == "config":  # Dask's own configuration: scheduler-address, or DASK_SCHEDULER_ADDRESS
        import dask

        scheduler = dask.config.get("scheduler-address", None)
        if not scheduler:
            raise ClearmapsError("--scheduler config: Dask's configuration names no scheduler (set "
                                 "DASK_SCHEDULER_ADDRESS=tcp://HOST:PORT or scheduler-address in ~/.config/dask).")
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise ClearmapsError(f"no Dask scheduler answered at {scheduler} ({exc}); start one (dask scheduler) "
                                 "or check the address.") from None
    cluster = _local_cluster(workers)
    return Client(cluster), cluster


def run_chunks(net, dataset, store, todo, options, size, workers=None, scheduler=None, progress=None,
               client=None, timings=None) -> list:
    """Run the chunks ``todo`` of ``store`` on a cluster (see the module docstring); returns the bad rows.

    ``client``: an existing :class:`distributed.Client` to use (then neither workers nor scheduler).
    ``timings``: a dict that gets chunk -> (seconds explaining, seconds writing) on its worker."""
    import hashlib

    own = client is None
    cluster = None
    if own:
        client, cluster = connect(workers, scheduler)
    payload = pickle.dumps(net, protocol=pickle.HIGHEST_PROTOCOL)
    token = hashlib.sha256(payload).hexdigest()
    bad_by_chunk: dict = {}
    try:
        client.register_plugin(ModelPlugin(token, payload), name=f"clearmaps-model-{token[:16]}")
        futures = []
        for chunk in todo:
            start, stop = store.bounds(chunk)
            futures.append(client.submit(chunk_task, token, store.url, dataset.slice(start, stop), chunk, options,
                                         size, key=f"clearmaps-chunk-{token[:8]}-{store.url[-24:]}-{chunk}",
                                         pure=False, retries=0))
        try:
            for future in as_completed(futures):
                try:
                    chunk, n, rows, explain_s, write_s = future.result()
                except ClearmapsError:
                    raise
                except Exception as exc:  # the worker's own exception, or KilledWorker after too many deaths
                    raise ClearmapsError(f"a chunk failed on the cluster ({type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0] if str(exc) else ''}); chunks already "
                                         "written are kept: rerun to finish.") from None
                bad_by_chunk[chunk] = rows
                if timings is not None:
                    timings[chunk] = (explain_s, write_s)
                if progress is not None:
                    progress(n)
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    return [row for chunk in sorted(bad_by_chunk) for row in bad_by_chunk[chunk]]
