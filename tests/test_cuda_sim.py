"""Runs the CUDA backend's kernels under Numba's CUDA simulator, in subprocesses.

``NUMBA_ENABLE_CUDASIM=1`` must be set before Numba is first imported, and this pytest process has
imported it already (the CPU backend, the strategies), so tests/cuda_sim runs in child pytests with
the variable set. The tensor-core tests (a C++ host emulation, mostly waiting on its threads' barriers) run
in one child and the rest (the simulator, single-threaded Python) in another, at the same time: on a 2-core
machine that takes about the time of the longer one instead of the sum. This test fails, printing a child's
output, if any simulator test fails or too few ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TENSOR_CORES = "tests/cuda_sim/test_tensor_cores.py"
# the fewest tests each child must pass: a child that collects nothing (a broken conftest) must not pass
CHILDREN = {"tensor cores": ([TENSOR_CORES], 30), "simulator": (["tests/cuda_sim", "--ignore", TENSOR_CORES], 40)}


def test_cuda_kernels_under_the_simulator(tmp_path):
    procs = {}
    for name, (args, _) in CHILDREN.items():
        # generated kernel sources go to a temporary folder, not the user's ~/.cache
        cache = tmp_path / name.replace(" ", "-")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1", CLEARMAPS_CACHE_DIR=str(cache))
        env.pop("CLEARMAPS_CUDA_REAL", None)
        log = open(tmp_path / f"{cache.name}.log", "w+")
        # -rs: a skip (none is expected; test_tensor_cores.py skips without a C++ compiler) says why
        procs[name] = (subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log)
    tails = []
    try:
        for name, (proc, log) in procs.items():
            code = proc.wait(timeout=900)
            log.seek(0)
            out = log.read()
            tail = out.strip().splitlines()[-1] if out.strip() else ""
            assert code == 0, f"{name} tests under the simulator failed (exit {code}):\n{out[-20000:]}"
            passed = re.search(r"(\d+) passed", tail)
            least = CHILDREN[name][1]
            assert passed and int(passed.group(1)) >= least and "skipped" not in tail, \
                f"too few {name} tests ran under the simulator (at least {least} expected):\n{out}"
            tails.append(f"{name}: {tail}")
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    print("\nCUDA simulator: " + "; ".join(tails))
