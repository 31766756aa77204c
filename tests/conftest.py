"""Shared fixtures: the backends every property runs on, and hypothesis settings.

``CLEARMAPS_TEST_BACKENDS`` (a comma-separated list of backend names) restricts the ``backend`` fixture to
those backends, and deselects the tests of a property file (one with tests that take the fixture) that do
not take it, such as its negative controls, which the main run has run already: tests/test_cuda_sim.py runs
the property suite this way for "cuda" under Numba's CUDA simulator, in a child pytest.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ONLY = [name for name in os.environ.get("CLEARMAPS_TEST_BACKENDS", "").split(",") if name]


def backends_under_test() -> list[str]:
    """Every backend this install has, or those of CLEARMAPS_TEST_BACKENDS. "cpu" is listed whenever its
    module exists, so a broken Numba install fails loudly instead of silently dropping the backend; "cuda"
    when a GPU (or the CUDA simulator) can run it. A backend asked for by name is listed as it is: if it
    cannot run, its tests fail."""
    if ONLY:
        return list(ONLY)
    names = ["reference"]
    if importlib.util.find_spec("clearmaps.kernels.cpu") is not None:
        names.append("cpu")
    if importlib.util.find_spec("clearmaps.kernels.cuda") is not None:
        from clearmaps import ClearmapsError, get_backend

        try:
            get_backend("cuda")
            names.append("cuda")
        except ClearmapsError:
            pass
    return names


def simulated_cuda_only() -> bool:
    """True in the child run of the property suite for the CUDA backend under the simulator, where every GPU
    thread is a Python thread: the property tests then draw smaller cases, fewer of them."""
    return ONLY == ["cuda"] and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(params=backends_under_test())
def backend(request) -> str:
    """The name of a backend; test bodies compare its results with the float64 reference."""
    return request.param


def _gpu_present() -> bool:
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if ONLY:  # the property files' tests for the named backends only
        def per_backend(item):
            return "backend" in getattr(item, "fixturenames", ())

        suites = {item.path for item in items if per_backend(item)}
        deselected = [item for item in items if item.path in suites and not per_backend(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item not in deselected]
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
