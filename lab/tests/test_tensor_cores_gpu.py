"""The tensor-core variants on a real GPU (bench/device.sh's lab step, CLEARMAPS_CUDA_REAL=1): the preset
networks at realistic sizes against the float64 reference. Skipped under the simulator, where these sizes
would take hours; lab/tests/test_tensor_cores.py runs the same kernels there on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from clearmaps.kernels import cuda as kc
from tests.tolerances import RTOL_F32, decisive

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import device as dv  # noqa: E402

from lab import tensor_cores as tc  # noqa: E402
from lab.variants import TensorCores  # noqa: E402

pytestmark = pytest.mark.skipif(dv.cp is None, reason="needs a GPU (CLEARMAPS_CUDA_REAL=1); the simulator is too slow")


def _preset(arch, seed=0):
    import torch

    import clearmaps

    torch.manual_seed(seed)
    spec = clearmaps.read_arch(arch)
    return clearmaps.from_torch(clearmaps.build_module(arch), spec["class_names"], spec["input_shape"])


@pytest.mark.parametrize("arch, size", [("allcnn-mnist", 28), ("vgg16-fcn", 64)])
@pytest.mark.parametrize("halo", [False, True], ids=["flat", "halo"])
def test_tensor_cores_on_the_gpu(monkeypatch, arch, size, halo):
    """The fast mode with the TensorCores variant (flat, or the halo kernel), compiled by NVRTC for the real
    GPU: every stride-1 transposed conv it takes, and the forward convs, against the float64 reference on
    the exact trace's switches (TF32 accuracy), and its dominant-class agreement as agreement() reports it."""
    from clearmaps import reference as ref

    config = kc.CudaConfig(variants=(TensorCores(halo=halo),))
    used = []
    real = tc.launch
    monkeypatch.setattr(tc, "launch", lambda *a, **k: used.append(a[4:6]) or real(*a, **k))
    net = _preset(arch, 6)
    x = np.random.default_rng(6).uniform(size=(3, net.in_channels, size, size)).astype(np.float32)
    classes = np.tile(np.arange(10), (3, 1))
    trace = kc.forward(net, x, fast=False, config=config)
    got = kc.clear_from_trace(net, trace, classes, fast=True, config=config)
    assert len(used) >= 2, used
    want = ref.clear_from_trace(net, ref.forward(net, x), classes)
    err = np.linalg.norm(got.responses - want.responses) / np.linalg.norm(want.responses)
    assert RTOL_F32 < err < 5e-3, err
    mask = decisive(want.responses, margin=0.02)
    assert mask.mean() > 0.3
    assert (got.dominant_index[mask] == want.dominant_index[mask]).mean() >= 0.999
    report = kc.agreement(net, x, config=config)
    assert report["decisive_agreement"] >= 0.97, report
