"""The CPU methods: NumPy reference, clearmaps ``cpu`` (Numba), plain torch, Captum's Deconvolution."""

from __future__ import annotations

import importlib.util
import os
import tracemalloc

import numpy as np

import clearmaps

from .harness import Method, Output, Prepared, register
from .torch_deconvnet import TorchDeconvnet, compose as torch_compose


def _explain_output(e) -> Output:
    index = np.argmax(e.classes[:, :, None, None] == e.dominant_class[:, None], axis=1)
    return Output(index, np.asarray(e.dominant_response, dtype=np.float64), e.rgb,
                  None if e.responses is None else np.asarray(e.responses, dtype=np.float64))


def _setup_reference(case) -> Prepared:
    x = case.x.astype(np.float64)
    last = {}

    def run():  # the reference computes every map whatever keep_responses says; keep them for the check
        last["e"] = clearmaps.explain(case.net64, x, case.classes[0], backend="reference")
        return last["e"]

    return Prepared(run, lambda: _explain_output(last["e"]), notes="float64")


register(Method("reference", "cpu", _setup_reference, "clearmaps.reference: the NumPy oracle (float64)",
                small_only=True, baseline=True, repeats=3))


def _cpu_available():
    if importlib.util.find_spec("clearmaps.kernels.cpu") is None:
        return "clearmaps.kernels.cpu is not there"
    return None


def _setup_cpu(case) -> Prepared:
    def run():
        return clearmaps.explain(case.net, case.x, case.classes[0], backend="cpu", keep_responses=False)

    def check():
        from clearmaps.kernels import cpu

        out = _explain_output(clearmaps.explain(case.net, case.x, case.classes[0], backend="cpu"))
        out.switches = cpu.forward(case.net, case.x).switches  # the same forward explain() ran
        return out

    def memory():
        """tracemalloc peaks: every buffer of the cpu backend is a NumPy array allocated from Python (the Numba
        kernels allocate nothing), so tracemalloc sees its whole footprint."""
        from clearmaps.kernels import cpu

        def peak(fn):
            tracemalloc.start()
            fn()
            out = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return out

        trace = cpu.forward(case.net, case.x)
        return {"how": "tracemalloc peak (NumPy allocations; the cpu backend allocates nothing else)",
                "forward_bytes": peak(lambda: cpu.forward(case.net, case.x)),
                "composite_only_bytes": peak(lambda: cpu.clear_from_trace(case.net, trace, case.classes,
                                                                           keep_responses=False)),
                "all_maps_bytes": peak(lambda: cpu.clear_from_trace(case.net, trace, case.classes)),
                "maps_array_bytes": int(4 * case.num_maps * case.x.shape[0] * np.prod(case.x.shape[2:]))}

    def extra():
        return {"numba_compile_cold_s": cold_compile_seconds(case.spec.arch, case.x.shape[1:])}

    return Prepared(run, check, memory=memory, extra=extra, notes="float32, keep_responses=False")


def cold_compile_seconds(arch, shape) -> float:
    """Seconds of a first explain(backend="cpu") call on one image in a fresh process with an empty Numba
    cache: the compile time a new install (or CI) pays once; cache=True then loads it in well under that."""
    import subprocess
    import sys
    import tempfile

    code = ("import time, numpy as np, clearmaps, clearmaps.kernels.cpu\n"
            f"net = clearmaps.from_torch(clearmaps.build_module({arch!r}), input_shape={tuple(shape)!r}, check=False)\n"
            f"x = np.zeros((1,) + {tuple(shape)!r}, np.float32)\n"
            "t0 = time.perf_counter(); clearmaps.explain(net, x, backend='cpu', keep_responses=False)\n"
            "print(time.perf_counter() - t0)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


register(Method("cpu", "cpu", _setup_cpu, "clearmaps backend='cpu' (Numba, float32)", available=_cpu_available))


def torch_setup(device: str, dtype=None, tf32: bool = False):
    """A setup function for the plain-torch deconvnet on ``device`` (the CUDA methods reuse it)."""
    import torch

    def setup(case) -> Prepared:
        d = dtype or torch.float32
        model = TorchDeconvnet(case.net64, d, device)
        x = torch.from_numpy(case.x).to(device=device, dtype=d)
        classes = torch.from_numpy(case.classes).to(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else None

        def run():
            with torch.inference_mode():
                return model(x, classes)[1:]

        def check():
            with torch.inference_mode():
                r, index, response, rgb = model(x, classes)
                switches = {i: s.cpu().numpy() for i, s in model.forward(x)[2].items()}
            return Output(index.cpu().numpy(), response.double().cpu().numpy(), rgb.cpu().numpy(),
                          r.double().cpu().numpy(), switches=switches)

        return Prepared(run, check, sync=sync, notes=f"{str(d).replace('torch.', '')}, all classes in one batch")

    return setup


register(Method("torch", "cpu", torch_setup("cpu"), "plain-torch deconvnet (bench/torch_deconvnet.py, float32)",
                baseline=True))


def energy_model(net, dtype, device):
    """The network as an nn.Sequential ending in E = ½ Σ_hw z_L², one value per class: Captum's gradient of
    E_c with its Deconvolution ReLU rule is exactly R(x|c) (docs/design.md's autograd oracle)."""
    import torch
    from torch import nn

    class Energy(nn.Module):
        def forward(self, z):
            return 0.5 * z.square().sum(dim=(2, 3))

    mods = []
    for layer in net.layers:
        if isinstance(layer, clearmaps.Conv):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding)
            conv.weight.data = torch.tensor(np.asarray(layer.weight), dtype=dtype)
            conv.bias.data = torch.tensor(np.asarray(layer.bias), dtype=dtype)
            mods.append(conv)
        elif isinstance(layer, clearmaps.MaxPool):
            mods.append(nn.MaxPool2d(layer.kernel, layer.stride, layer.padding))
        else:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods, Energy()).to(device).eval()
    for p in model.parameters():  # a fair baseline: no weight gradients
        p.requires_grad_(False)
    return model


def captum_setup(device: str):
    import torch

    def setup(case) -> Prepared:
        import warnings

        from captum.attr import Deconvolution

        # Captum warns on every call that it sets requires_grad and hooks the ReLUs; both are expected
        warnings.filterwarnings("ignore", module="captum")

        model = energy_model(case.net64, torch.float32, device)
        deconv = Deconvolution(model)
        x = torch.from_numpy(case.x).to(device)
        classes = torch.from_numpy(case.classes).to(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else None

        def maps():
            r = torch.stack([deconv.attribute(x, target=classes[:, k]).sum(dim=1)
                             for k in range(classes.shape[1])], dim=1)
            response, index = r.max(dim=1)
            return r, index, response

        def run():
            r, index, response = maps()
            return torch_compose(index, response, classes.shape[1])

        def check():
            r, index, response = maps()
            rgb = torch_compose(index, response, classes.shape[1])
            # Captum runs torch's float32 forward (the same F.conv2d / max_pool2d): its switches are those
            with torch.no_grad():
                switches = {i: s.cpu().numpy() for i, s in TorchDeconvnet(case.net64, torch.float32, device)
                            .forward(x)[2].items()}
            return Output(index.cpu().numpy(), response.double().cpu().numpy(), rgb.cpu().numpy(),
                          r.detach().double().cpu().numpy(), switches=switches)

        return Prepared(run, check, sync=sync, notes="one attribute() call per class")

    return setup


def _captum_available():
    if importlib.util.find_spec("captum") is None:
        return "captum is not installed (pip install -e '.[bench]')"
    return None


register(Method("captum", "cpu", captum_setup("cpu"), "Captum Deconvolution, looping over classes (float32)",
                available=_captum_available, baseline=True))
