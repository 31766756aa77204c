"""The two numbers before any GPU run (METHOD.md): FLOPs and bytes of the CUDA backend's design, per case,
and the time each would take at the measured ceilings.

    python -m bench.gpu_model [--copy-GBps 3000 --fp32-TFLOPs 51 --tf32-TFLOPs 415]

Per kernel of forward and back-projection it counts what the backend does: a GEMM's FLOPs and bytes (it
reads the columns and writes its output); the bytes of the other kernels (the column gather reads its
source and writes kh*kw rows per signal channel; the direct kernel reads its source once; the epilogue
reads R once). Source reads of
the gathers are counted once (their kh*kw-fold reuse is served by L1/L2). The predicted time is the sum
over kernels of max(FLOPs / rate, bytes / bandwidth): kernels run one after another.
"""

from __future__ import annotations

import argparse

import numpy as np

from clearmaps.reference import Conv, MaxPool, ReLU

from .cases import count_flops
from .device_bench import GPU_CASES

F = 4  # bytes per float32


def steps(net, size, B, K, direct_max=4):
    """(label, gemm_flops, bytes) per kernel group, exact design of kernels/cuda/backend.py."""
    sizes = net.layer_sizes(size)
    out = []
    C = net.in_channels
    for i, layer in enumerate(net.layers):  # forward over B images
        (H, W), (oh, ow) = sizes[i], sizes[i + 1]
        if isinstance(layer, Conv):
            O, I, kh, kw = layer.weight.shape
            rows, cols = I * kh * kw + 1, B * oh * ow
            flops = 2 * O * rows * cols
            out.append((f"fwd conv {i} {I}->{O} @{oh}x{ow} gather", 0, F * (I * B * H * W + rows * cols)))
            out.append((f"fwd conv {i} GEMM", flops, F * (rows * cols + O * cols)))
            C = O
        elif isinstance(layer, MaxPool):
            out.append((f"fwd pool {i}", 0, F * C * B * (H * W + oh * ow) + 8 * C * B * oh * ow))
    n = B * K
    hi = net.head_index
    H, W = sizes[hi]
    I = net.head.in_channels
    out.append(("back head", 2 * n * I * H * W * int(np.prod(net.head.kernel)), F * n * I * H * W))
    pooled = None  # size of the pooled source when reading through switches
    current = I * H * W
    for i in range(hi - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ReLU):
            continue
        if isinstance(layer, MaxPool):
            pooled = current
            continue
        O, I, kh, kw = layer.weight.shape
        H, W = sizes[i]
        src = F * n * current + (8 * n // K * current if pooled else 0)  # values (+ switches, per image)
        if I <= direct_max:
            out.append((f"back conv {i} direct {O}->{I} @{H}x{W}", 0, src + F * n * I * H * W))
            flops_direct = 2 * n * O * I * kh * kw * H * W
            out[-1] = (out[-1][0], -flops_direct, out[-1][2])  # CUDA-core FLOPs, not GEMM
        else:
            rows, cols = O * kh * kw, n * H * W
            out.append((f"back conv {i} {O}->{I} @{H}x{W} gather{' (through switches)' if pooled else ''}",
                        0, src + F * rows * cols))
            out.append((f"back conv {i} GEMM", 2 * I * rows * cols, F * (rows * cols + I * cols)))
        current, pooled = I * H * W, None
    Hin, Win = size
    out.append(("epilogue", 0, F * n * net.in_channels * Hin * Win + B * Hin * Win * (4 + 8 + 3)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copy-GBps", type=float, default=3000.0, help="device copy bandwidth, read+write")
    p.add_argument("--fp32-TFLOPs", type=float, default=51.0)
    p.add_argument("--tf32-TFLOPs", type=float, default=415.0)
    p.add_argument("--cuda-core-TFLOPs", type=float, default=20.0, help="what a direct numba kernel reaches")
    args = p.parse_args(argv)
    import torch

    import clearmaps

    for spec in GPU_CASES.values():
        torch.manual_seed(0)
        arch = clearmaps.read_arch(spec.arch)
        net = clearmaps.from_torch(clearmaps.build_module(spec.arch), arch["class_names"], arch["input_shape"])
        K = net.num_classes
        counted = count_flops(net, spec.size, spec.batch, K)
        rows = steps(net, spec.size, spec.batch, K)
        print(f"\n### {spec.name}: batch {spec.batch}, {spec.size}, {K} classes; counted (dense) "
              f"{counted['total'] / 1e9:.1f} GFLOP (forward {counted['forward'] / 1e9:.1f})")
        print(f"| step | GFLOP | GB moved | ms fp32 | ms tf32 |\n|---|---|---|---|---|")
        tot = {"flops": 0, "bytes": 0, "fp32": 0.0, "tf32": 0.0}
        for label, flops, byts in rows:
            t_mem = byts / (args.copy_GBps * 1e9)
            if flops < 0:  # CUDA-core work of a direct kernel
                t32 = t16 = max(-flops / (args.cuda_core_TFLOPs * 1e12), t_mem)
                flops = -flops
            else:
                t32 = max(flops / (args.fp32_TFLOPs * 1e12), t_mem)
                t16 = max(flops / (args.tf32_TFLOPs * 1e12), t_mem)
            tot["flops"] += flops
            tot["bytes"] += byts
            tot["fp32"] += t32
            tot["tf32"] += t16
            print(f"| {label} | {flops / 1e9:.1f} | {byts / 1e9:.2f} | {1e3 * t32:.2f} | {1e3 * t16:.2f} |")
        print(f"| **total** | {tot['flops'] / 1e9:.1f} | {tot['bytes'] / 1e9:.2f} | {1e3 * tot['fp32']:.1f} | "
              f"{1e3 * tot['tf32']:.1f} |")
        print(f"predicted: exact {spec.batch / tot['fp32']:.0f} images/s, fast {spec.batch / tot['tf32']:.0f} "
              f"images/s (copy {args.copy_GBps:.0f} GB/s, fp32 {args.fp32_TFLOPs:.0f}, tf32 {args.tf32_TFLOPs:.0f} "
              "TFLOP/s; launch overheads and the sync of the input check not included)")


if __name__ == "__main__":
    main()
