"""Runs the CUDA backend's kernels under Numba's CUDA simulator, in a subprocess.

``NUMBA_ENABLE_CUDASIM=1`` must be set before Numba is first imported, and this pytest process has
imported it already (the CPU backend, the strategies), so tests/cuda_sim runs in a child pytest with
the variable set. This test fails, printing the child's output, if any simulator test fails or none ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_kernels_under_the_simulator(tmp_path):
    # generated kernel sources go to a temporary folder, not the user's ~/.cache
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1", CLEARMAPS_CACHE_DIR=str(tmp_path))
    env.pop("CLEARMAPS_CUDA_REAL", None)
    # -rs: a skip (none is expected; tests/cuda_sim/test_tensor_cores.py skips without a C++ compiler) says why
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/cuda_sim"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    assert proc.returncode == 0, f"simulator tests failed (exit {proc.returncode}):\n{out[-20000:]}"
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in tail, f"too few simulator tests ran:\n{out}"
    print(f"\nCUDA simulator: {tail}")
