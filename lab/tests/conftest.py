"""The lab's tests run the CUDA backend under Numba's CUDA simulator (set here, before Numba is imported) or,
with ``CLEARMAPS_CUDA_REAL=1``, on a real GPU (bench/device.sh). They are not part of the suite's command
(``python -m pytest``, testpaths = tests); lab/README.md says how to run them."""

import os
import sys

if os.environ.get("CLEARMAPS_CUDA_REAL") != "1":
    if "numba" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise RuntimeError("lab/tests: Numba was imported before the CUDA simulator could be switched on; run "
                           "`python -m pytest lab/tests` on its own, or with NUMBA_ENABLE_CUDASIM=1")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
