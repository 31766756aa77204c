"""Stride-1 convolutions as a tiled direct kernel that skips zeros: no columns, no GEMM.

Why. Run 4 (bench/GPU_NOTES.md) put allcnn-mnist's exact back-projection within 2x of a dense-GEMM floor:
the gather + GEMM path multiplies every zero of the unpooled plane (3/4 of it behind a 2x2 pool) and of
the rectified signal (about half of what is left), and it writes and reads kh*kw columns per input value.
This kernel reads the pooled (or dense) signal once, through shared memory, and does a multiply-add only
for values that are not zero. Exact float32 FMAs, summed in a fixed order: deterministic.

What it computes (stride-1 transposed convs; routing.py sends strided ones to the GEMM path, and convs.py
runs a forward stride-1 conv here as the transposed conv of its flipped kernels, plus the bias):

    out[i, t, y, x] = sum over o, ky, kx of weight[o, i, ky, kx] * U[o, t, y + ph - ky, x + pw - kx]

where U is the source: a dense plane (C, n, Hs, Ws), rectified as read when ``rect``; or the unpooled plane
of a max pool, given as the pooled signal (C, n, Hs, Ws) and, per pooled value, its switch's OFFSET IN ITS
WINDOW d = dy*pkw + dx (int32, written by the forward pass's pool kernel, or made from a trace's switches
by validation.py): window (p, q)'s value
(rectified when ``rect``) is added at unpooled pixel (p*psh - pph + dy, q*psw - ppw + dx). Where windows
overlap (3x3/2) a pixel gets the sum of the windows whose switch it is, as unpooling defines it; the
routing does not send an overlapping pool here when a rectification must follow the sum.

How the work is laid out. A block owns one signal t, one tile of TY x TX output pixels (TY, TX multiples of
the pool's stride, so that the tile's windows sit at the same places relative to every tile) and up to
BLOCK_CHANNELS x cpt output channels: each thread computes cpt of them (1, or 2 where there are at least
64, so that each window's test and dispatch serve twice the FMAs), lanes of a warp on consecutive channels.
Everything a thread does depends on (t, tile, o) only, never on i, so the 32 lanes of a warp take the same
branches: skipping a zero, or dispatching on d, costs no divergence. Per chunk of CHUNK input channels the
block stages into shared memory, for each window of the tile's halo, the (rectified) value and d. Then per
input channel o each thread loads its kh*kw weights weight[o, i, :, :] into registers (coalesced: the
weights are laid out (O, kh, kw, I)) and walks the halo's windows: a window whose value is 0 costs a
test and a branch (the values of four windows come in one wide shared load); otherwise d picks one of pkh*pkw straight-line blocks of FMAs into the
accumulators of the tile pixels that the nonzero pixel reaches (at most kh*kw of them).

That walk is straight-line code: which accumulator each (window, d, tap) feeds is known when the kernel is
specialised (the tile's position relative to the pool grid is fixed), so the generator below writes one
FMA statement per (window, d, tap) that lands in the tile, with the TY*TX accumulators as scalar locals —
registers, with no reliance on the compiler unrolling nested loops over a local array. The output goes
through shared memory so that its stores are coalesced (a warp writes whole 32-byte rows of one channel).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from numba import cuda

from .backproject_kernels import _ix

# Input channels staged in shared memory at a time (values and offsets of the tile's windows).
CHUNK = 32
# Threads per block, at most: four warps share one staging of the tile's windows. Blocks have 1, 2 or 4
# warps, each staging CHUNK / warps channels of every chunk (sparse_transpose refuses other counts).
BLOCK_CHANNELS = 128
# The largest tile the generator will unroll (accumulators per thread, per output channel).
MAX_TILE_PIXELS = 64
# Static shared memory a block may declare (CUDA's limit without the dynamic opt-in).
SHARED_LIMIT = 48 << 10
# Which convs come here, the tile and the channels per thread are the caller's choice
# (clearmaps.kernels.cuda.CudaConfig: sparse, dense_*, tile, max_channels_per_thread; routing.py).

_DENSE_POOL = (1, 1, 1, 1, 0, 0)


def tile_shape(pool: tuple | None, tile: tuple) -> tuple[int, int]:
    """(TY, TX): the requested ``tile`` (rows, cols) rounded down to multiples of the pool's stride (at least
    one stride; a dense source has stride 1), so that the tile's windows sit at the same places relative to
    every tile."""
    psh, psw = (pool or _DENSE_POOL)[2:4]
    rows, cols = tile
    return psh * max(1, rows // psh), psw * max(1, cols // psw)


def supports(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, pool: tuple | None, tile: tuple) -> bool:
    """Whether the sparse kernel can do this transposed conv (kernel, stride, padding) on ``tile`` (TY, TX)
    (from :func:`tile_shape` of ``pool``: the pool whose switches the source is read through, None for a
    dense source): stride 1, a tile small enough to keep in registers, and its staging within the shared
    memory of a block of BLOCK_CHANNELS threads."""
    return ((sh, sw) == (1, 1) and tile[0] * tile[1] <= MAX_TILE_PIXELS
            and shared_bytes(kh, kw, ph, pw, pool, BLOCK_CHANNELS, tile) <= SHARED_LIMIT)


def channels_per_thread(I: int, most: int = 2) -> int:
    """Output channels per thread: 2 when there are at least 64 (each window's test and dispatch then
    serves twice the FMAs, at ~117 registers instead of 64: fewer warps per SM), else 1; at most ``most``."""
    return min(most, 2 if I >= 64 else 1)


def block_threads(I: int, cpt: int = 1) -> int:
    """Threads per block for I output channels, ``cpt`` per thread: 1, 2 or 4 warps (a power of two, so that
    the warps split each CHUNK of staged channels evenly), at most BLOCK_CHANNELS."""
    warps = -(-I // (32 * cpt))
    return min(BLOCK_CHANNELS, 32 * (1 << (warps - 1).bit_length()))


def specialisation(kernel: tuple, padding: tuple, pool: tuple | None, I: int, bias: bool, tile: tuple,
                   most_per_thread: int = 2) -> tuple:
    """The arguments of :func:`sparse_transpose` (and :func:`kernel_name`) for a launch with I output
    channels on the requested ``tile`` (rows, cols), at most ``most_per_thread`` channels per thread
    (CudaConfig.tile and max_channels_per_thread)."""
    cpt = channels_per_thread(I, most_per_thread)
    return (*kernel, *padding, pool, block_threads(I, cpt), bool(bias), tile_shape(pool, tile), cpt)


def layout(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, tile: tuple):
    """The specialisation's static plan on ``tile`` (TY, TX): (TY, TX, PLO, QLO, NWY, NWX, windows).

    The tile with rows [y0, y0 + TY) reads source rows u = y + ph - ky in [y0 + ph - kh + 1, y0 + TY - 1 + ph];
    window p covers rows p*psh - pph + [0, pkh). With y0 = tile_row * TY and TY a multiple of psh, the
    windows that can reach the tile are p = tile_row * TY/psh + PLO + wy, wy < NWY (likewise q). ``windows``
    lists, per window (index wy*NWX + wx), its cases (d, [(accumulator, tap), ...]) with a nonempty list:
    window pixel d = dy*pkw + dx reaches output (ty, tx) = (u - ph + ky, v - pw + kx) through tap ky*kw + kx,
    accumulator ty*TX + tx. Where windows do not overlap, every (tile pixel, tap) pair appears at most once over
    all windows and cases; a pixel shared by overlapping windows appears once per window. Tuples, computed
    once per geometry: the routing asks (through supports) for every conv of every call."""
    return _layout(kh, kw, ph, pw, pool, *tile)


@lru_cache(maxsize=None)
def _layout(kh, kw, ph, pw, pool, TY, TX):
    pkh, pkw, psh, psw, pph, ppw = pool or _DENSE_POOL
    # relative to the tile: source rows/cols needed
    ulo, uhi = ph - kh + 1, TY - 1 + ph
    vlo, vhi = pw - kw + 1, TX - 1 + pw
    # windows intersecting them (floor division rounds toward -inf, as needed for negative positions)
    plo, phi = -((-(ulo + pph - pkh + 1)) // psh), (uhi + pph) // psh
    qlo, qhi = -((-(vlo + ppw - pkw + 1)) // psw), (vhi + ppw) // psw
    NWY, NWX = phi - plo + 1, qhi - qlo + 1
    windows = []
    for wy in range(NWY):
        for wx in range(NWX):
            cases = []
            for dy in range(pkh):
                for dx in range(pkw):
                    u = (plo + wy) * psh - pph + dy
                    v = (qlo + wx) * psw - ppw + dx
                    fmas = []
                    for ky in range(kh):
                        for kx in range(kw):
                            ty, tx = u - ph + ky, v - pw + kx
                            if 0 <= ty < TY and 0 <= tx < TX:
                                fmas.append((ty * TX + tx, ky * kw + kx))
                    if fmas:
                        cases.append((dy * pkw + dx, tuple(fmas)))
            if cases:
                windows.append((wy * NWX + wx, tuple(cases)))
    return TY, TX, plo, qlo, NWY, NWX, tuple(windows)


def kernel_source(kh, kw, ph, pw, pool, threads, bias, tile, cpt) -> str:
    """The kernel's Python source (see the module docstring); ``bias`` adds bias[i] to every output."""
    pooled = pool is not None
    TY, TX, plo, qlo, NWY, NWX, windows = layout(kh, kw, ph, pw, pool, tile)
    psh, psw = (pool or _DENSE_POOL)[2:4]
    taps, npix, nwin = kh * kw, TY * TX, NWY * NWX
    L = []
    a = L.append
    a("def kernel(src, offs, weight, bias, out, O, I, n, Hs, Ws, H, W, tiles_x, tiles_y, b0, kc, rect):")
    # one float32 buffer: the staged values while the tile is computed, then the tile on its way out
    a(f"    sval = cuda.shared.array({max(CHUNK * nwin, threads * (npix + 1))}, float32)")
    if pooled:
        a(f"    soff = cuda.shared.array({CHUNK * nwin}, int32)")
    a("    tid = cuda.threadIdx.x")
    # thread tid computes channels i0 + c*threads, c < cpt (consecutive lanes on consecutive channels)
    a(f"    i0 = cuda.blockIdx.y * {threads * cpt} + tid")
    for c in range(cpt):
        a(f"    iw{c} = min(i0 + {c * threads}, I - 1)")
    a("    bx = cuda.blockIdx.x")
    a("    txi = bx % tiles_x")
    a("    r = bx // tiles_x")
    a("    tyi = r % tiles_y")
    a("    t = r // tiles_y")
    a("    b = b0 + t // kc")
    a(f"    P0 = tyi * {TY // psh} + ({plo})")
    a(f"    Q0 = txi * {TX // psw} + ({qlo})")
    a("    plane = Hs * Ws")
    a("    zero = float32(0.0)")
    for k in range(npix):
        for c in range(cpt):
            a(f"    a{k}_{c} = zero")
    # staging: lane l of warp w stages window w0 + l of every pass w0, channels w, w + warps, ...: where each
    # of its windows reads (and whether it is inside the plane) is worked out once, here
    warps = threads // 32
    passes = -(-nwin // 32)
    a("    lane = tid % 32")
    a("    warp = tid // 32")
    a("    nplane = n * plane")
    for j in range(passes):
        a(f"    wi{j} = lane + {32 * j}")
        a(f"    wy = wi{j} // {NWX}")
        a("    p = P0 + wy")
        a(f"    q = Q0 + wi{j} - wy * {NWX}")
        a(f"    ok{j} = wi{j} < {nwin} and p >= 0 and p < Hs and q >= 0 and q < Ws")
        a(f"    k{j} = p * Ws + q if ok{j} else 0")
        a(f"    src{j} = t * plane + k{j}")
        if pooled:
            a(f"    off{j} = b * O * plane + k{j}")
    a(f"    for c0 in range(0, O, {CHUNK}):")
    a("        cuda.syncthreads()")  # the previous chunk's readers are done
    # running indices, stepped by additions (no 64-bit multiplies in the loop)
    a("        so = c0 + warp")
    a(f"        sm = warp * {nwin} + lane")
    for j in range(passes):
        a(f"        si{j} = src{j} + so * nplane")
        if pooled:
            a(f"        oi{j} = off{j} + so * plane")
    a(f"        for _ in range({CHUNK // warps}):")  # a fixed count: the loop stays warp-uniform
    a("            live = so < O")
    for j in range(passes):
        a("            val = zero")
        if pooled:
            a("            dd = int32(0)")
        a(f"            if live and ok{j}:")
        a(f"                val = src[_ix(si{j})]")
        a("                if rect and val < zero:")
        a("                    val = zero")
        if pooled:
            a(f"                dd = offs[_ix(oi{j})]")
        guard = "" if 32 * (j + 1) <= nwin else f"if wi{j} < {nwin}: "
        a(f"            {guard}sval[_ix(sm + {32 * j})] = val")
        if pooled:
            a(f"            {guard}soff[_ix(sm + {32 * j})] = dd")
        a(f"            si{j} += {warps} * nplane")
        if pooled:
            a(f"            oi{j} += {warps} * plane")
    a(f"            so += {warps}")
    a(f"            sm += {warps * nwin}")
    a("        cuda.syncthreads()")
    a(f"        for oc in range(min({CHUNK}, O - c0)):")
    a(f"            wb = (c0 + oc) * {taps} * I")
    for c in range(cpt):
        for k in range(taps):
            a(f"            w{k}_{c} = weight[_ix(wb + iw{c} + {k} * I)]")
    a(f"            sb = oc * {nwin}")
    for wi, cases in windows:
        # (the values of consecutive windows come in wide shared loads; the offset is loaded in the branch,
        # where the compiler sinks it even when it is written before the test)
        a(f"            s = sval[_ix(sb + {wi})]")
        a("            if s != zero:")
        if pooled:
            a(f"                d = soff[_ix(sb + {wi})]")
        for n_case, (d, fmas) in enumerate(cases):
            ind = "                "
            if pooled:
                a(f"{ind}{'if' if n_case == 0 else 'elif'} d == {d}:")
                ind += "    "
            for acc, tap in fmas:
                for c in range(cpt):
                    a(f"{ind}a{acc}_{c} += s * w{tap}_{c}")
    # the tile through shared memory (row stride npix + 1: no bank conflicts), then coalesced stores; one
    # round per channel a thread holds, so the buffer never needs more than threads * (npix + 1) floats
    a("    HW = H * W")
    for c in range(cpt):
        a("    cuda.syncthreads()")
        a(f"    ob = tid * {npix + 1}")
        for k in range(npix):
            a(f"    sval[_ix(ob + {k})] = a{k}_{c}")
        a("    cuda.syncthreads()")
        a(f"    for e in range(tid, {threads * npix}, {threads}):")
        a(f"        ch = e // {npix}")
        a(f"        px = e - ch * {npix}")
        a(f"        ty = px // {TX}")
        a(f"        y = tyi * {TY} + ty")
        a(f"        x = txi * {TX} + px - ty * {TX}")
        a(f"        ii = cuda.blockIdx.y * {threads * cpt} + {c * threads} + ch")
        a("        if ii < I and y < H and x < W:")
        a(f"            v = sval[_ix(ch * {npix + 1} + px)]")
        if bias:
            a("            v += bias[ii]")
        a("            out[_ix((ii * n + t) * HW + y * W + x)] = v")
    return "\n".join(L) + "\n"


def shared_bytes(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, threads: int, tile: tuple) -> int:
    """Static shared memory of a specialisation on ``tile`` (TY, TX): the staged values (or the outgoing tile,
    whichever is larger) and, through a pool, the staged offsets. At most SHARED_LIMIT (sparse_transpose
    checks)."""
    TY, TX, _, _, NWY, NWX, _ = layout(kh, kw, ph, pw, pool, tile)
    nwin = NWY * NWX
    return 4 * max(CHUNK * nwin, threads * (TY * TX + 1)) + (4 * CHUNK * nwin if pool is not None else 0)


def kernel_name(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, threads: int, bias: bool, tile: tuple,
                cpt: int) -> str:
    """The name of :func:`sparse_transpose`'s specialisation for these arguments."""
    return (f"sparse_transpose_k{kh}x{kw}_p{ph}x{pw}_t{threads}x{cpt}_{tile[0]}x{tile[1]}" +
            ("_bias" if bias else "") + "_" +
            ("dense" if pool is None else "unpooled_k{}x{}_s{}x{}_p{}x{}".format(*pool)))


def check_specialisation(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, threads: int, tile: tuple):
    """Raise ValueError for a specialisation the kernel cannot be: a block that is not 1, 2 or 4 warps, a tile
    too large or not a multiple of the pool's stride, or staging beyond a block's static shared memory."""
    if threads % 32 or CHUNK % (threads // 32):
        raise ValueError(f"sparse_transpose: {threads} threads; expected whole warps that divide the {CHUNK} "
                         "channels staged at a time (block_threads gives 32, 64 or 128)")
    if tile[0] * tile[1] > MAX_TILE_PIXELS or (pool and (tile[0] % pool[2] or tile[1] % pool[3])):
        raise ValueError(f"sparse_transpose: tile {tile} does not fit pool {pool}")
    if shared_bytes(kh, kw, ph, pw, pool, threads, tile) > SHARED_LIMIT:
        raise ValueError(f"sparse_transpose: {shared_bytes(kh, kw, ph, pw, pool, threads, tile)} bytes of shared "
                         f"memory for a {kh}x{kw} conv on tile {tile}; a block's static limit is {SHARED_LIMIT}")


def jit_source(code: str, name: str):
    """The generated kernel ``code`` as a numba.cuda kernel named ``name``, file-cached where it can be (see
    below); ``source`` and ``file_cached`` (whether other processes can compile it for this one, warmup.py)
    are kept on it."""
    fn, cached = _define(code, name)
    kernel = cuda.jit(fn, cache=cached)
    kernel.source = code
    kernel.file_cached = cached
    return kernel


@lru_cache(maxsize=None)
def sparse_transpose(kh: int, kw: int, ph: int, pw: int, pool: tuple | None, threads: int, bias: bool,
                     tile: tuple, cpt: int = 1):
    """Kernel: the stride-1 transposed conv of a dense source (``pool`` None) or of a pool's unpooled plane
    read through its switches (``pool`` = (pkh, pkw, psh, psw, pph, ppw)), zeros skipped (module docstring).

    Launch with grid (n * tiles_y * tiles_x, ceil(I / (threads * cpt))) and ``threads``
    (:func:`block_threads`) threads, each computing ``cpt`` output channels; tiles_y = ceil(H / TY), tiles_x =
    ceil(W / TX), (TY, TX) = ``tile`` (from :func:`tile_shape`: a multiple of the pool's stride). Arguments:
    src (C*n*Hs*Ws,) float32; offs (B*C*Hs*Ws,) int32 window offsets (any int32 array for a dense source);
    weight (O*kh*kw*I,) float32 laid out (O, kh, kw, I); bias (I,) float32 (read only when ``bias``);
    out (I*n*H*W,) float32; O, I, n, Hs, Ws, H, W, tiles_x, tiles_y, b0, kc; rect (rectify the source)."""
    tile = tuple(tile)
    check_specialisation(kh, kw, ph, pw, pool, threads, tile)
    return jit_source(kernel_source(kh, kw, ph, pw, pool, threads, bias, tile, cpt),
                      kernel_name(kh, kw, ph, pw, pool, threads, bias, tile, cpt))


# Numba spends 5-15 s compiling one specialisation (typing and lowering its hundreds of statements), once per
# process. Its file cache needs the function in a real source file: the generated source is written to
# CLEARMAPS_CACHE_DIR (default ~/.cache/clearmaps)/cuda-kernels/, named by its hash, and the compiled kernel
# is cached beside it; CLEARMAPS_CUDA_CACHE=0, or a folder that cannot be written, falls back to exec.
_HEADER = ("# Generated by clearmaps/kernels/cuda/sparse_kernels.py: a cache, safe to delete.\n"
           "from numba import cuda\nfrom numpy import float32, int32, uint64 as _ix\n\n\n")


def cache_root() -> Path:
    """Where clearmaps keeps compiled kernels: CLEARMAPS_CACHE_DIR, else $XDG_CACHE_HOME/clearmaps or
    ~/.cache/clearmaps (the lab's host emulation builds go there too)."""
    return Path(os.environ.get("CLEARMAPS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clearmaps"))


def _cache_dir() -> Path:
    return cache_root() / "cuda-kernels"


def _define(code: str, name: str):
    """(the Python function of ``code`` renamed ``name``, whether it lives in a file Numba can cache by)."""
    code = code.replace("def kernel(", f"def {name}(", 1)
    if os.environ.get("CLEARMAPS_CUDA_CACHE", "1") != "0":
        text = _HEADER + code
        module = f"clearmaps_generated_{name}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        try:
            folder = _cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{module}.py"
            if not path.exists() or path.read_text() != text:
                tmp = folder / f".{module}.{os.getpid()}.tmp"
                tmp.write_text(text)
                os.replace(tmp, path)  # atomic: another process never reads half a file
            spec = importlib.util.spec_from_file_location(module, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
            return getattr(mod, name), True
        except OSError:
            pass
    namespace = {"cuda": cuda, "float32": np.float32, "int32": np.int32, "_ix": _ix}
    exec(compile(code, f"<{name}>", "exec"), namespace)
    return namespace[name], False


def window_offsets(switches, pool: tuple, plane: tuple, xp=np):
    """Each switch as its offset in its window, d = dy*pkw + dx (int32, the layout of ``switches``).

    switches (B, C, Hs, Ws): flat indices into the (Hu, Wu) = ``plane`` of the pool's input, as forward()
    records them; pool (pkh, pkw, psh, psw, pph, ppw). Returns (offsets, ok): ``ok`` is False when some
    switch lies outside its window (a trace that no max pool of this geometry made)."""
    pkh, pkw, psh, psw, pph, ppw = pool
    Hs, Ws = switches.shape[2:]
    Wu = int(plane[1])
    u = switches // Wu
    v = switches - u * Wu
    dy = u - (xp.arange(Hs, dtype=switches.dtype) * psh - pph).reshape(1, 1, Hs, 1)
    dx = v - (xp.arange(Ws, dtype=switches.dtype) * psw - ppw).reshape(1, 1, 1, Ws)
    ok = switches.size == 0 or bool(((dy >= 0) & (dy < pkh) & (dx >= 0) & (dx < pkw)).all())
    return xp.ascontiguousarray((dy * pkw + dx).astype(np.int32)), ok
