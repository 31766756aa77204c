"""Shared fixtures: the backends every property runs on, and hypothesis settings."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def backends_under_test() -> list[str]:
    """Every backend this install has. "cpu" is listed whenever its module exists, so a broken Numba install
    fails loudly instead of silently dropping the backend; "cuda" when a GPU (or the CUDA simulator) can run
    it."""
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
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
