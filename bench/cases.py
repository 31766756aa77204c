"""Benchmark cases: a network, a batch of images and the classes to explain, plus their counted FLOPs.

A case is built once per run and shared by every method, so all methods see the same weights and inputs.
Weights are torch's default initialisation under a fixed seed (or a checkpoint given with --checkpoint);
images are seeded uniform noise in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clearmaps.reference import Conv, MaxPool, Network


@dataclass(frozen=True)
class CaseSpec:
    name: str
    arch: str                    # a clearmaps preset
    batch: int
    size: tuple                  # (H, W)
    small: bool                  # the NumPy reference is timed only on small cases


SPECS = {
    "allcnn-mnist": CaseSpec("allcnn-mnist", "allcnn-mnist", 64, (28, 28), True),
    "vgg16-fcn-64": CaseSpec("vgg16-fcn-64", "vgg16-fcn", 1, (64, 64), True),
    "vgg16-fcn": CaseSpec("vgg16-fcn", "vgg16-fcn", 1, (224, 224), False),
    # a quick smoke case for CI-sized checks of the harness itself
    "tiny": CaseSpec("tiny", "allcnn-mnist", 2, (28, 28), True),
}


@dataclass(eq=False)
class Case:
    """Everything a method needs: ``net`` (float32 weights), ``net64`` (the same weights in float64),
    ``x`` float32 (B, C, H, W), ``classes`` int64 (B, K), and the FLOP counts."""

    spec: CaseSpec
    net: Network
    net64: Network
    x: np.ndarray
    classes: np.ndarray
    flops: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def num_maps(self) -> int:
        return self.classes.shape[1]


def count_flops(net: Network, size, batch: int, num_maps: int) -> dict:
    """Multiply-adds × 2 of the convolutions, the way a dense deconvnet does them.

    forward: every conv; backward (per image and class): the head's single-kernel transpose, then every
    conv below it transposed over its full (unpooled, mostly zero) input plane. Pooling, ReLU, reduction
    and colour are not counted. A sparse method does fewer operations than counted: its GFLOP/s is then
    "dense-equivalent".
    """
    sizes = net.layer_sizes(size)
    forward = backward = 0
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, Conv):
            continue
        oh, ow = sizes[i + 1]
        o, c, kh, kw = layer.weight.shape
        forward += 2 * o * c * kh * kw * oh * ow
        backward += 2 * (1 if i == net.head_index else o) * c * kh * kw * oh * ow
    return {"forward": batch * forward, "backward": batch * num_maps * backward,
            "total": batch * (forward + num_maps * backward)}


def _network(arch: str, seed: int, checkpoint=None) -> Network:
    import torch

    import clearmaps

    if checkpoint:
        return clearmaps.load_checkpoint(checkpoint, arch=arch)
    torch.manual_seed(seed)
    spec = clearmaps.read_arch(arch)
    return clearmaps.from_torch(clearmaps.build_module(arch), spec["class_names"], spec["input_shape"])


def make_case(name: str, seed: int = 0, checkpoint=None) -> Case:
    if name not in SPECS:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    net64 = _network(spec.arch, seed, checkpoint)
    net = net64.astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(spec.batch, net.in_channels, *spec.size)).astype(np.float32)
    classes = np.tile(np.arange(net.num_classes, dtype=np.int64), (spec.batch, 1))
    case = Case(spec, net, net64, x, classes)
    case.flops = count_flops(net, spec.size, spec.batch, net.num_classes)
    return case


def describe(net: Network) -> str:
    convs = sum(isinstance(layer, Conv) for layer in net.layers)
    pools = sum(isinstance(layer, MaxPool) for layer in net.layers)
    return f"{convs} convs, {pools} pools, {net.num_classes} classes"
