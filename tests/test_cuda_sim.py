"""Runs the CUDA backend's kernels under Numba's CUDA simulator, in subprocesses.

``NUMBA_ENABLE_CUDASIM=1`` must be set before Numba is first imported, and this pytest process has
imported it already (the CPU backend, the strategies), so the simulator runs in child pytests with the
variable set, two at once (each mostly one core: on a 2-core machine that takes about the time of the longer
one instead of the sum):

    properties  tests/test_backends.py, the property suite every backend meets, for "cuda" only
                (CLEARMAPS_TEST_BACKENDS=cuda; tests/conftest.py then draws smaller cases); the bodies of
                tests/test_graph.py's and tests/test_methods.py's backend tests for "cuda" on tiny draws
                (tests/cuda_sim/test_graph_bodies.py); and, to even the two children out, the CUDA backend's
                settings and warm (tests/cuda_sim/test_config.py, test_warm.py)
    routes      what only the CUDA backend has: tests/cuda_sim/test_routes.py (every route, the sparse
                kernel alone, the folded head, foreign traces, memory splitting), test_graph_ops.py (the graph
                path's kernels against the reference's operations, adjointness, known-wrong kernels) and
                test_graph_path.py (graphs and every method end to end, foreign traces, memory splitting)

This test fails, printing a child's output, if any simulator test fails or too few ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (pytest arguments, extra environment, the fewest tests that must pass: a child that collects nothing, a
# broken conftest, must not pass)
CHILDREN = {"properties": (["tests/test_backends.py", "tests/cuda_sim/test_graph_bodies.py", "tests/cuda_sim/test_config.py",
                            "tests/cuda_sim/test_warm.py"], {"CLEARMAPS_TEST_BACKENDS": "cuda"}, 50),
            "routes": (["tests/cuda_sim/test_routes.py", "tests/cuda_sim/test_graph_ops.py",
                        "tests/cuda_sim/test_graph_path.py"], {}, 55)}


def test_every_simulator_test_file_runs_in_a_child():
    """A test file added to tests/cuda_sim is run by one of the children (none is left out, none run twice)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "cuda_sim").glob("test_*.py"))
    given = sorted(a for args, _, _ in CHILDREN.values() for a in args if a.startswith("tests/cuda_sim/"))
    assert given == files, (given, files)


def test_cuda_kernels_under_the_simulator(tmp_path):
    procs = {}
    for name, (args, extra, _) in CHILDREN.items():
        # generated kernel sources go to a temporary folder, not the user's ~/.cache
        cache = tmp_path / name
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1", CLEARMAPS_CACHE_DIR=str(cache), **extra)
        env.pop("CLEARMAPS_CUDA_REAL", None)
        log = open(tmp_path / f"{name}.log", "w+")
        # -rs: a skip (none is expected) says why
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
            least = CHILDREN[name][2]
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
