"""The CUDA backend's equivalence tests. They need the backend to run: under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, which must be set before Numba is imported, so tests/test_cuda_sim.py runs
this folder in a subprocess) or on a real GPU (``CLEARMAPS_CUDA_REAL=1``, as bench/device.sh does). In a
plain ``pytest`` run they are not collected here; test_cuda_sim.py runs them and fails if they fail."""

import os

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and os.environ.get("CLEARMAPS_CUDA_REAL") != "1":
    collect_ignore_glob = ["test_*.py"]
