"""Dataset runs on a dask.distributed LocalCluster of two worker processes: the same bytes as one process,
also when a worker is killed (SIGKILL) mid-run. Each cluster runs in a child process of its own session,
with a time limit; on a timeout the whole process group (driver, nannies, workers) is killed, so no test
leaves a process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from clearmaps import builtin
from clearmaps.cli import main
from clearmaps.dataset_run import RunOptions, run_dataset
from clearmaps.datasets import open_dataset

from .test_store import assert_same_bytes, make_tree

LIMIT_S = 240


@pytest.fixture(scope="module")
def digits():
    return builtin.heldout()


def run_bounded(argv, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the Dask run took more than {LIMIT_S} s and was killed:\n{err[-3000:]}")
    finally:
        try:  # workers that outlived their driver (none should)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_cli_two_worker_cluster_writes_the_bytes_one_process_writes(tmp_path, capsys, digits):
    images, labels = digits
    make_tree(tmp_path / "ds", images, labels, range(0, 1000, 8))  # 125 digits, 13 chunks
    common = ["explain", str(tmp_path / "ds"), "--batch-size", "10", "--backend", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    proc = run_bounded([sys.executable, "-m", "clearmaps", *common, "--out", str(tmp_path / "two"), "--workers", "2"],
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on a local Dask cluster of 2 worker processes" in proc.stdout and "explained 125 image(s)" in proc.stdout
    assert_same_bytes(tmp_path / "one", tmp_path / "two")


KILL_ONE_WORKER = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

from distributed import Client

from clearmaps import builtin
from clearmaps.dataset_run import RunOptions, prepare_run
from clearmaps.datasets import open_dataset
from clearmaps.distributed import _local_cluster, run_chunks

if __name__ == "__main__":
    data, out = sys.argv[1], Path(sys.argv[2])
    net = builtin.load_model()
    ds = open_dataset(data, net.class_names)
    options = RunOptions(backend="cpu")
    store, size, todo = prepare_run(net, ds, str(out), options, 10, "test-model")
    cluster = _local_cluster(2)
    client = Client(cluster)
    before = client.run(os.getpid)
    killed = {}

    def kill_one_worker():
        while len(list((out / "table").glob("part-*"))) < 2:
            time.sleep(0.005)
        killed["pid"] = min(before.values())
        killed["parts"] = len(list((out / "table").glob("part-*")))
        os.kill(killed["pid"], signal.SIGKILL)

    threading.Thread(target=kill_one_worker, daemon=True).start()
    try:
        run_chunks(net, ds, store, todo, options, size, client=client)
        store.finish()
        client.wait_for_workers(2, timeout=60)
        after = client.run(os.getpid)
    finally:
        client.close()
        cluster.close()
    print(json.dumps({"killed": killed, "before": sorted(before.values()), "after": sorted(after.values()),
                      "chunks": store.chunks}))
"""


def test_a_worker_killed_mid_run_costs_a_retry_not_a_chunk(tmp_path, digits):
    images, labels = digits
    np_path = tmp_path / "set.npz"
    import numpy as np

    np.savez(np_path, images=images[:400], labels=labels[:400])  # 40 chunks
    (tmp_path / "kill.py").write_text(KILL_ONE_WORKER)
    proc = run_bounded([sys.executable, str(tmp_path / "kill.py"), str(np_path), str(tmp_path / "cluster")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    killed = report["killed"]
    assert killed["pid"] in report["before"] and killed["pid"] not in report["after"]  # it died; a new one came
    assert 2 <= killed["parts"] < report["chunks"]  # mid-run
    table = pq.read_table(tmp_path / "cluster" / "images.parquet")
    assert table.column("index").to_pylist() == list(range(400))  # nothing lost, nothing doubled

    net = builtin.load_model()
    run_dataset(net, open_dataset(np_path, net.class_names), tmp_path / "one", RunOptions(backend="cpu"),
                batch_size=10, model_identity="test-model")
    assert_same_bytes(tmp_path / "one", tmp_path / "cluster")
