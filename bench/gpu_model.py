"""The two numbers before a GPU run (FLOPs and bytes) plus the third one that run 2 showed matters:
instructions. Per kernel of the CUDA backend's design (kernels/cuda/pipeline.py, routing.py), the time each would
take at the measured ceilings, and the sum.

    python -m bench.gpu_model [--copy-GBps 4139 --fp32-TFLOPs 51 --tf32-TFLOPs 412 --issue 1.045e12]

Per kernel: a GEMM's FLOPs (at the rate cuBLAS reached for that shape in run 2's ceilings: skinny
M = 32-64 row GEMMs 44 fp32 / 117 TF32 TFLOP/s, M >= 256 51 / 307) and bytes (it reads the columns, writes
its output); a gather's bytes (reads its source and, through a pool, the int32 switches once; writes
kh*kw rows per channel) and instructions: the SASS loop body per (pixel, channel) measured by
``python -m bench.kernel_report`` (sm_90), times the number of (pixel, channel) iterations / 32 lanes,
at ``--issue`` warp instructions per second (132 SMs x 4 schedulers x 1.98 GHz). Each kernel takes
max(FLOPs / rate, bytes / bandwidth, warp instructions / issue rate); kernels run one after another.
``--efficiency`` scales the bandwidth and issue rate (achieved / peak) for the "expected" column.
"""

from __future__ import annotations

import argparse


from clearmaps.kernels.fold import fold_head
from clearmaps.reference import Conv, MaxPool, ReLU

from .cases import count_flops
from .device_bench import GPU_CASES

F = 4  # bytes per float32
# SASS instructions per loop iteration (one channel of one pixel / column), from bench.kernel_report, sm_90
INSTR = {
    ("gather", "dense", 9): 132, ("gather", "unpooled", 9): 216, ("gather", "dense", 1): 31,
    ("gather", "unpooled", 1): 45,
    ("direct", "dense", 9): {1: 84, 3: 120}, ("direct", "unpooled", 9): {1: 124, 3: 168},
    ("forward", "dense", 9): 132, ("forward", "dense", 1): 31,
    ("head", 1): 29,  # per output element of a 1x1 head
    # per output element of the folded head (kernels/fold.py): the loop body over output channels, 3x3
    # (18 weight loads, 18 FMAs, 1 store) and 1x1 (unrolled by 4: 151 per 4)
    ("head folded", 9): 51, ("head folded", 1): 38,
}
# The sparse transposed conv (kernels/cuda/sparse_kernels.py), per input channel o of a warp's tile, from the
# sm_90 SASS of sparse_transpose_k3x3_p1x1_t32_4x8_unpooled_k2x2_s2x2_p0x0: the loop over o costs ~20 (kh*kw
# weight loads, counters); a window whose value is 0 costs ~2.25 (FSETP + BRA; its value comes in an
# LDS.128 with three others); a nonzero one ~5 (LDS of its offset, the compare-and-branch dispatch, the
# branch out) plus its FFMAs (1 + FFMAs from a dense source: no dispatch). Staging: ~28 per channel and
# pass of 32 windows (each lane one window); the output through shared memory ~35 per 32 values.
SPARSE = {"per_o": 20, "zero": 2.25, "nonzero_pooled": 5, "nonzero_dense": 1, "stage": 28, "store": 35}


def gemm_rate(M: int, fast: bool, args) -> float:
    """TFLOP/s cuBLAS reached in run 2 (H200) for an M-row GEMM with a long N."""
    if M <= 64:
        return args.skinny_tf32 if fast else args.skinny_fp32
    if M >= 256:
        return args.tf32_TFLOPs * 307 / 412 if fast else args.fp32_TFLOPs
    return (args.skinny_tf32 + args.tf32_TFLOPs * 307 / 412) / 2 if fast else (args.skinny_fp32 + args.fp32_TFLOPs) / 2


def sparse_instructions(kh, kw, ph, pw, pool, O, I, n, H, W, nonzero):
    """Warp instructions of one sparse_transpose launch, a fraction ``nonzero`` of the staged values being
    nonzero (about 1/2 behind a ReLU with rectification on random weights) and offsets uniform in a window."""
    from clearmaps.kernels.cuda import CudaConfig
    from clearmaps.kernels.cuda import sparse_kernels as sk

    TY, TX, _, _, NWY, NWX, windows = sk.layout(kh, kw, ph, pw, pool, sk.tile_shape(pool, CudaConfig().tile))
    cells = (pool[0] * pool[1]) if pool else 1
    nwin = NWY * NWX
    fmas = sum(len(f) for _, cases in windows for _, f in cases) / cells  # per nonzero window, summed
    per_nonzero = SPARSE["nonzero_pooled" if pool else "nonzero_dense"]
    used = len(windows)  # windows that can reach the tile (the others are skipped at generation)
    cpt = sk.channels_per_thread(I)  # each window's test and dispatch serve cpt channels' FMAs
    per_o = (SPARSE["per_o"] + (cpt - 1) * kh * kw + used * SPARSE["zero"]
             + nonzero * (used * per_nonzero + cpt * fmas))
    threads = sk.block_threads(I, cpt)
    warps = threads // 32
    blocks = n * -(-H // TY) * -(-W // TX) * -(-I // (threads * cpt))
    chunks = -(-O // sk.CHUNK)
    passes = -(-nwin // 32)
    per_warp = O * per_o + chunks * sk.CHUNK / warps * passes * SPARSE["stage"] + cpt * TY * TX * SPARSE["store"]
    return blocks * warps * per_warp


def steps(net, size, B, K, direct_max=4, sparse=True, nonzero=0.5, dense_max=None):
    """(label, GEMM rows M or 0, gemm_flops, bytes, warp instructions) per kernel, exact design of
    kernels/cuda/routing.py (``sparse``: stride-1 convs on the sparse kernel, those on a dense input where
    routing.dense_pays with the default configuration, or, given ``dense_max``, every one of at most that many
    output channels)."""
    from clearmaps.kernels.cuda import CudaConfig
    from clearmaps.kernels.cuda.routing import dense_pays

    def pays(source_channels, out_channels, kh, kw):
        if dense_max is None:
            return dense_pays(CudaConfig(), source_channels, out_channels, kh, kw)
        return out_channels <= dense_max
    sizes = net.layer_sizes(size)
    out = []
    C = net.in_channels
    for i, layer in enumerate(net.layers):  # forward over B images
        (H, W), (oh, ow) = sizes[i], sizes[i + 1]
        if isinstance(layer, Conv):
            O, I, kh, kw = layer.weight.shape
            (ph, pw) = layer.padding
            if sparse and layer.stride == (1, 1) and ph < kh and pw < kw and pays(I, O, kh, kw):  # flipped, transposed
                instr = sparse_instructions(kh, kw, kh - 1 - ph, kw - 1 - pw, None, I, O, B, oh, ow,
                                            1.0 if i == 0 else nonzero)
                out.append((f"fwd conv {i} sparse {I}->{O} @{oh}x{ow}", 0, 0, F * (I * B * H * W + O * B * oh * ow),
                            instr))
                C = O
                continue
            rows, cols = I * kh * kw + 1, B * oh * ow
            instr = INSTR[("forward", "dense", kh * kw)] * I * cols / 32
            out.append((f"fwd conv {i} {I}->{O} @{oh}x{ow} gather", 0, 0, F * (I * B * H * W + rows * cols), instr))
            out.append((f"fwd conv {i} GEMM", O, 2 * O * rows * cols, F * (rows * cols + O * cols), 0))
            C = O
        elif isinstance(layer, MaxPool):
            out.append((f"fwd pool {i}", 0, 0, F * C * B * (H * W + oh * ow) + 8 * C * B * oh * ow, 0))
    n = B * K
    top = net.head_index
    folded = fold_head(net)
    if folded is None:
        H, W = sizes[top]
        I = net.head.in_channels
        out.append(("back head", 0, 0, F * n * I * H * W, INSTR[("head", 1)] * n * I * H * W / 32))
    else:  # the head, its ReLUs and conv j in one kernel (two input channels: z+, z-)
        top = folded[0]
        (H, W), (kh, kw) = sizes[top], net.layers[top].kernel
        I = net.layers[top].in_channels
        out.append((f"back head folded into conv {top} ->{I} @{H}x{W}", 0, 0, F * n * I * H * W,
                    INSTR[("head folded", kh * kw)] * n * I * H * W / 32))
    pooled = False
    current = I * H * W
    for i in range(top - 1, -1, -1):
        layer = net.layers[i]
        if isinstance(layer, ReLU):
            continue
        if isinstance(layer, MaxPool):
            pooled = (*layer.kernel, *layer.stride, *layer.padding)
            continue
        O, I, kh, kw = layer.weight.shape
        H, W = sizes[i]
        kind = "unpooled" if pooled else "dense"
        src = F * n * current + (4 * (n // K) * current if pooled else 0)  # values (+ int32 switches, per image)
        if sparse and I > direct_max and layer.stride == (1, 1) and (pooled or pays(O, I, kh, kw)):
            (Hs, Ws) = sizes[i + 1] if not pooled else sizes[i + 2]
            instr = sparse_instructions(kh, kw, *layer.padding, pooled or None, O, I, n, H, W, nonzero)
            out.append((f"back conv {i} sparse {O}->{I} @{H}x{W}{' (through switches)' if pooled else ''}", 0, 0,
                        src + F * n * I * H * W, instr))
        elif I <= direct_max:
            instr = INSTR[("direct", kind, kh * kw)][min(I, 3) if I != 1 else 1] * O * n * H * W / 32
            out.append((f"back conv {i} direct {O}->{I} @{H}x{W}{' (through switches)' if pooled else ''}", 0, 0,
                        src + F * n * I * H * W, instr))
        else:
            rows, cols = O * kh * kw, n * H * W
            instr = INSTR[("gather", kind, kh * kw)] * O * cols / 32
            out.append((f"back conv {i} {O}->{I} @{H}x{W} gather{' (through switches)' if pooled else ''}", 0, 0,
                        src + F * rows * cols, instr))
            out.append((f"back conv {i} GEMM", I, 2 * I * rows * cols, F * (rows * cols + I * cols), 0))
        current, pooled = I * H * W, False
    Hin, Win = size
    out.append(("epilogue", 0, 0, F * n * net.in_channels * Hin * Win + B * Hin * Win * (4 + 8 + 3), 0))
    return out


def predict(rows, args, fast: bool, efficiency: float = 1.0) -> tuple:
    """(total seconds, per-step seconds) at the ceilings, bandwidth and issue rate scaled by ``efficiency``."""
    per = []
    for label, M, flops, byts, instr in rows:
        t_mem = byts / (args.copy_GBps * 1e9 * efficiency)
        t_issue = instr / (args.issue * efficiency)
        t_flop = flops / (gemm_rate(M, fast, args) * 1e12) if flops else 0.0
        per.append(max(t_flop, t_mem, t_issue))
    return sum(per), per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copy-GBps", type=float, default=4139.0, help="device copy bandwidth, read+write (H200, run 2)")
    p.add_argument("--fp32-TFLOPs", type=float, default=51.0)
    p.add_argument("--tf32-TFLOPs", type=float, default=412.0)
    p.add_argument("--skinny-fp32", type=float, default=44.2, help="cuBLAS fp32 at M=64 rows (run 2)")
    p.add_argument("--skinny-tf32", type=float, default=117.2, help="cuBLAS TF32 at M=64 rows (run 2)")
    p.add_argument("--issue", type=float, default=132 * 4 * 1.98e9, help="warp instructions per second")
    p.add_argument("--efficiency", type=float, default=0.6,
                   help="achieved fraction of bandwidth and issue rate for the 'expected' figures")
    p.add_argument("--gemm", action="store_true", help="model the columns + GEMM path instead of the sparse kernel")
    p.add_argument("--sparse-all", action="store_true", help="every stride-1 conv on the sparse kernel, at any width")
    args = p.parse_args(argv)
    import torch

    import clearmaps

    for spec in (GPU_CASES[name] for name in ("allcnn-mnist-b1024", "vgg16-fcn-b8")):
        torch.manual_seed(0)
        arch = clearmaps.read_arch(spec.arch)
        net = clearmaps.from_torch(clearmaps.build_module(spec.arch), arch["class_names"], arch["input_shape"])
        K = net.num_classes
        counted = count_flops(net, spec.size, spec.batch, K)
        rows = steps(net, spec.size, spec.batch, K)
        if args.gemm or args.sparse_all:
            rows = steps(net, spec.size, spec.batch, K, sparse=not args.gemm, dense_max=1 << 30)
        exact, per32 = predict(rows, args, False)
        fast, per16 = predict(rows, args, True)
        exact_e, per32e = predict(rows, args, False, args.efficiency)
        fast_e, _ = predict(rows, args, True, args.efficiency)
        print(f"\n### {spec.name}: batch {spec.batch}, {spec.size}, {K} classes; counted (dense) "
              f"{counted['total'] / 1e9:.1f} GFLOP (forward {counted['forward'] / 1e9:.1f})")
        print("| step | GFLOP | GB moved | G warp instr | ms exact | ms fast | ms exact at "
              f"{args.efficiency:.0%} |\n|---|---|---|---|---|---|---|")
        for (label, M, flops, byts, instr), a, b, c in zip(rows, per32, per16, per32e):
            print(f"| {label} | {flops / 1e9:.1f} | {byts / 1e9:.2f} | {instr / 1e9:.2f} | {1e3 * a:.2f} | "
                  f"{1e3 * b:.2f} | {1e3 * c:.2f} |")
        print(f"| **total** | {sum(r[2] for r in rows) / 1e9:.1f} | {sum(r[3] for r in rows) / 1e9:.2f} | "
              f"{sum(r[4] for r in rows) / 1e9:.2f} | {1e3 * exact:.1f} | {1e3 * fast:.1f} | {1e3 * exact_e:.1f} |")
        print(f"ceiling: exact {spec.batch / exact:.0f} images/s, fast {spec.batch / fast:.0f}; expected at "
              f"{args.efficiency:.0%} of bandwidth and issue rate: exact {spec.batch / exact_e:.0f}, fast "
              f"{spec.batch / fast_e:.0f} images/s (launch gaps and the input check's sync not included)")


if __name__ == "__main__":
    main()
