"""Compile every CUDA kernel of the backend (and of lab/) for a GPU architecture WITHOUT a GPU, and report what
the hardware will run: registers, spills, stack, and the SASS of each loop body (instructions, global loads,
stores, FMAs per iteration). It also catches Numba typing errors that the CUDA simulator cannot (the
simulator runs the kernels as Python).

    pip install "nvidia-cuda-nvrtc==13.*" "nvidia-nvvm==13.*" "nvidia-cuda-nvcc==13.*" "nvidia-cuda-nvdisasm==13.*"
    python -m bench.kernel_report [--cc 9.0] [--sass DIR]

How the numbers are used (bench/GPU_NOTES.md): a kernel whose loop body issues I instructions per element
moved needs I * elements / 32 warp instructions; an H100/H200 issues about 4 per SM per clock
(132 SMs x 4 x 1.98 GHz ~ 1.0e12 warp instructions/s), to be set against its bytes / copy bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path


def _tools():
    import nvidia

    for root in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_nvcc/bin", "cu12/bin"):
            b = Path(root) / sub
            if (b / "ptxas").exists():
                return b
    raise SystemExit("ptxas not found: pip install 'nvidia-cuda-nvcc==13.*' 'nvidia-cuda-nvdisasm==13.*'")


def _fake_device(cc):
    # device functions are compiled for the current device's compute capability; there is none here
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Device()


_INSTR = re.compile(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def loop_bodies(sass: str):
    """(instructions, LDG, STG, FFMA, HMMA) of every loop body: from a label to the backward branch to it."""
    lines = sass.splitlines()
    labels, out = {}, []
    for n, line in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = n
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), n) < n:
            ops = collections.Counter(x.group(1) for x in map(_INSTR.match, lines[labels[m.group(1)]:n + 1]) if x)
            out.append((sum(ops.values()), ops["LDG"], ops["STG"], ops["FFMA"], ops["HMMA"]))
    return out


def compile_one(kernel, sig, name, cc, tools, sass_dir=None) -> dict:
    """``kernel`` is a numba.cuda kernel compiled for ``sig``, or CUDA C source text (``sig`` None)."""
    from numba import cuda

    from lab.tensor_cores import nvrtc_ptx

    ptx = nvrtc_ptx(kernel, cc) if isinstance(kernel, str) else cuda.compile_ptx(kernel.py_func, sig, cc=cc)[0]
    work = Path(sass_dir or "/tmp/clearmaps-kernel-report")
    work.mkdir(parents=True, exist_ok=True)
    src, cubin = work / f"{name}.ptx", work / f"{name}.cubin"
    src.write_text(ptx)
    arch = f"sm_{cc[0]}{cc[1]}"
    res = subprocess.run([str(tools / "ptxas"), f"-arch={arch}", "-O3", "-v", str(src), "-o", str(cubin)],
                         capture_output=True, text=True, check=True)
    info = {"registers": int(re.search(r"Used (\d+) registers", res.stderr).group(1)),
            "stack": int(re.search(r"(\d+) bytes stack frame", res.stderr).group(1)),
            "spills": int(re.search(r"(\d+) bytes spill stores", res.stderr).group(1))}
    disasm = tools / "nvdisasm"
    if disasm.exists():
        sass = subprocess.run([str(disasm), "-c", str(cubin)], capture_output=True, text=True).stdout
        if sass_dir:
            (work / f"{name}.sass").write_text(sass)
        info["loops"] = [b for b in loop_bodies(sass) if b[0] > 1]
    return info


def kernels():
    """(name, kernel, signature) of every kernel shape the presets and the tests use."""
    from numba import types

    from clearmaps.kernels.cuda import backproject_kernels as bk
    from clearmaps.kernels.cuda import epilogue as ek
    from clearmaps.kernels.cuda import forward_kernels as fk
    from clearmaps.kernels.cuda import sparse_kernels as sk
    from lab import direct_rows, eager_offsets
    from lab import tensor_cores as tc

    f1, i1, l1 = (types.Array(t, 1, "C") for t in (types.float32, types.int32, types.int64))
    f4, l4, i4 = (types.Array(t, 4, "C") for t in (types.float32, types.int64, types.int32))
    i, b = types.int64, types.boolean
    convs = [(3, 3, 1, 1, 1, 1), (3, 3, 2, 2, 1, 1), (1, 1, 1, 1, 0, 0), (5, 5, 1, 1, 2, 2)]
    sources = [(bk.DENSE, None), (bk.UNPOOLED, (2, 2, 2, 2, 0, 0)), (bk.UNPOOLED, (2, 2, 3, 3, 1, 1)),
               (bk.UNPOOLED_OVERLAP, (3, 3, 2, 2, 1, 1))]
    out = []
    for g in convs:
        tag = "k{}x{}_s{}x{}_p{}x{}".format(*g)
        out.append((f"forward_columns_{tag}", fk.forward_columns(*g), (f1, f1) + (i,) * 8 + (b, b)))
        out.append((f"max_pool_{tag}", fk.max_pool(*g), (f4, f4, l4, i4, i4, i, b)))
        out.append((f"head_signal_{tag}", bk.head_signal(*g), (f1, l1, f1, f1) + (i,) * 11))
        out.append((f"head_signal_{tag}_folded", bk.head_signal(*g, True), (f1, l1, f1, f1) + (i,) * 11))
        for kind, pool in sources:
            out.append((bk.gather_columns(*g, kind, pool).__name__, bk.gather_columns(*g, kind, pool),
                        (f1, i1, f1) + (i,) * 12 + (b, b)))
            for I in (1, 3):
                k = bk.direct_transpose(I, *g, kind, pool)
                out.append((k.__name__, k, (f1, i1, f1, f1) + (i,) * 10 + (b, b)))
    for g in ((3, 3, 1, 1), (5, 5, 2, 2), (1, 1, 0, 0)):
        for _, pool in sources:
            tile = sk.tile_shape(pool, (4, 8))
            for threads, cpt in ((32, 1), (128, 1), (32, 2)):
                k = sk.sparse_transpose(*g, pool, threads, False, tile, cpt)
                out.append((k.__name__, k, (f1, i1, f1, f1, f1) + (i,) * 11 + (b,)))
                if pool and g == (3, 3, 1, 1):  # LAB: the offsets loaded ahead of the zero tests
                    k = eager_offsets.sparse_transpose(*g, pool, threads, False, tile, cpt)
                    out.append((k.__name__, k, (f1, i1, f1, f1, f1) + (i,) * 11 + (b,)))
        k = sk.sparse_transpose(*g, None, 128, True, sk.tile_shape(None, (4, 8)))  # a forward conv (bias)
        out.append((k.__name__, k, (f1, i1, f1, f1, f1) + (i,) * 11 + (b,)))
    # LAB (lab/README.md): the tensor-core kernels, CUDA C compiled by NVRTC as CuPy does, and the row-blocked
    # direct kernel
    for g in ((3, 3, 1, 1), (1, 1, 0, 0)):
        for pool in (None, (2, 2, 2, 2, 0, 0)):
            for bm in sorted(tc.TILES):
                tag = "k{}x{}_p{}x{}".format(*g) + ("_dense" if pool is None else "_unpooled_k2x2_s2x2")
                out.append((f"tc_transpose_{tag}_bm{bm}", tc.source(*g, pool, bm, True), None))
                pt = tc.PATCHES[tc.TILES[bm]["BN"]][0]  # the halo kernel on its squarest patch
                out.append((f"tc_halo_{tag}_bm{bm}_{pt[0]}x{pt[1]}", tc.source(*g, pool, bm, True, False, pt), None))
    out.append(("tc_transpose_k3x3_p1x1_dense_bm64_bias_masked", tc.source(3, 3, 1, 1, None, 64, False, True), None))
    for I, k_, p_ in ((1, 3, 1), (3, 3, 1), (1, 5, 2)):
        for px in (2, 4):
            k = direct_rows.direct_rows(I, k_, k_, p_, p_, px)
            out.append((k.__name__, k, (f1, f1, f1) + (i,) * 6 + (b,)))
    for kind, pool in sources:
        out.append((bk.materialise(kind, pool).__name__, bk.materialise(kind, pool), (f1, i1, f1) + (i,) * 8 + (b, b)))
    f3, l3 = types.Array(types.float32, 3, "C"), types.Array(types.int64, 3, "C")
    u4 = types.Array(types.uint8, 4, "C")
    d1 = types.Array(types.float64, 1, "C")
    for reduce in (ek.SUM, ek.MAX, ek.NORM):
        k = ek.epilogue(reduce, False, True, True)
        out.append((k.__name__, k, (f4, f4, f3, l3, f1, d1, d1, u4, i, i, i, b, b, b)))
    out.append(("compose_rgb", ek.compose_rgb, (l3, f3, d1, d1, u4)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cc", default="9.0", help="compute capability (9.0: H100/H200)")
    p.add_argument("--sass", default=None, help="folder to keep the PTX and SASS in")
    p.add_argument("--only", default="", help="substring of the kernel names to compile")
    args = p.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise SystemExit("unset NUMBA_ENABLE_CUDASIM: this compiles for a real GPU")
    cc = tuple(int(v) for v in args.cc.split("."))
    tools = _tools()
    _fake_device(cc)
    failed = 0
    print("| kernel | registers | stack B | spill B | loop bodies (instructions, LDG, STG, FFMA, HMMA) |\n"
          "|---|---|---|---|---|")
    for name, kernel, sig in kernels():
        if args.only not in name:
            continue
        try:
            info = compile_one(kernel, sig, name, cc, tools, args.sass)
        except Exception as exc:  # a kernel that does not compile is the finding
            failed += 1
            print(f"| {name} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | |")
            continue
        print(f"| {name} | {info['registers']} | {info['stack']} | {info['spills']} | {info.get('loops', '-')} |",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
