"""The contract's own test bodies for the CUDA backend's graph path (kernels/cuda/graph.py), run here for
"cuda" as they are, on draws small enough for the simulator (every GPU thread is a Python thread):
tests/test_graph.py's fast-backend equivalence on hypothesis-drawn graphs of every operation, and
tests/test_methods.py's Captum equivalence of each method on chains and its Eqs. 4-6 composition of signed maps.
(tests/test_cuda_sim.py runs this file in the child with CLEARMAPS_TEST_BACKENDS=cuda; the bodies' files
themselves draw cases too large for the simulator.)"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc

from ..graph_strategies import graph_cases
from ..strategies import clear_cases
from ..test_graph import test_fast_backends_equal_the_reference_on_graphs as graph_equivalence
from ..test_methods import test_methods_equal_captum_on_chains as captum_on_chains
from ..test_methods import test_signed_maps_compose_as_eqs_4_to_6 as signed_maps

assert kc.is_available(), kc.why_unavailable()

TINY_GRAPHS = dict(max_blocks=3, min_size=6, max_size=9, max_batch=2, max_channels=2, max_classes=3)
TINY_CHAINS = dict(min_size=8, max_size=12, max_batch=2, max_classes=3, max_blocks=2, max_width=3)


def examples(n):
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@examples(25)
@given(graph_cases(**TINY_GRAPHS), st.data())
def test_graphs_equal_the_reference(case, data):
    """tests/test_graph.py::test_fast_backends_equal_the_reference_on_graphs, its body for "cuda"."""
    graph_equivalence.hypothesis.inner_test("cuda", case, data)


@examples(15)
@given(clear_cases(**TINY_CHAINS), st.sampled_from(ref.METHODS))
def test_methods_equal_captum_on_chains(case, method):
    """tests/test_methods.py::test_methods_equal_captum_on_chains, its body for "cuda" (the deconvnet on the
    fused chain kernels, the other methods on the graph path)."""
    captum_on_chains.hypothesis.inner_test("cuda", case, method)


@examples(10)
@given(clear_cases(**TINY_CHAINS), st.sampled_from(ref.METHODS[1:]), st.booleans())
def test_signed_maps_compose_as_eqs_4_to_6(case, method, keep):
    """tests/test_methods.py::test_signed_maps_compose_as_eqs_4_to_6, its body for "cuda"."""
    signed_maps.hypothesis.inner_test("cuda", case, method, keep)
