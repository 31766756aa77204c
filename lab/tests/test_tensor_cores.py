"""The fast mode's tensor-core kernels (lab/tensor_cores.py, flat and halo) against the float64 reference.

Under the simulator its CUDA C runs through lab/tc_host.hpp (blocks as threads, the mma instruction emulated
with the PTX ISA's fragment layouts); on a GPU (bench/device.sh) the same tests run the real kernel. The
reference is fed the inputs rounded to TF32, as the kernel rounds them, so what is left is float32
summation: a wrong index, lane, register or row anywhere would be an O(1) error."""

from __future__ import annotations

import numpy as np
import pytest

from clearmaps import reference as ref
from clearmaps.kernels import cuda as kc
from clearmaps.reference import Conv, MaxPool, Network, ReLU
from tests.cuda_sim.signals import signals
from tests.tolerances import RTOL_F32, assert_close, assert_equal, decisive, rel_err

assert kc.is_available(), kc.why_unavailable()
from clearmaps.kernels.cuda import device as dv  # noqa: E402
from clearmaps.kernels.cuda import memory  # noqa: E402

from lab import tensor_cores as tc  # noqa: E402
from lab.variants import TensorCores  # noqa: E402

# the emulation needs a C++20 compiler: without one these tests fail here, saying so (never a silent skip)
assert tc.available() is None, tc.available()


def _tf32(a):
    return tc.round_tf32(a).astype(np.float64)


def run_kernel(seed, k, p, pool, O, I, B, kc_, Hu, Wu, rect, bias=False, halo=False, wide=False):
    """(kernel output (n, I, H, W), float64 reference of the TF32-rounded inputs)."""
    rng = np.random.default_rng(seed)
    kh, kw = k
    n = B * kc_
    y, offsets, geo, unpool = signals(rng, B, kc_, O, Hu, Wu, pool)
    U = unpool(_tf32(y))
    weight = rng.normal(size=(O, I, kh, kw))
    want = ref.conv_transpose2d(np.maximum(U, 0) if rect else U, _tf32(weight), 1, p)
    b = rng.normal(size=I).astype(np.float32)
    if bias:
        want = want + b.reshape(1, I, 1, 1)
    H, W = want.shape[2:]
    Hs, Ws = y.shape[2:]
    out = dv.asdevice(np.full((I, n, H, W), np.nan, np.float32))
    tc.launch(dv.asdevice(np.ascontiguousarray(y.transpose(1, 0, 2, 3), np.float32)), dv.asdevice(offsets),
              dv.asdevice(tc.weight_layout(weight)), out, O, I, n, Hs, Ws, Hu, Wu, H, W, 0, kc_,
              rect, (kh, kw), p, geo, dv.asdevice(b) if bias else None, halo=halo, wide=wide)
    return dv.tohost(out).transpose(1, 0, 2, 3), want


# (kernel, padding, pool, O, I, B, kc, Hu, Wu, rect): dense and pooled sources (windows that tile, are
# padded, leave gaps); O a multiple of 32 (no channel masks: FULL_CHUNKS) or not, one or several steps per
# tap; I <= 32 (32 x 128 tiles) and wider (64 x 64), ragged against the tile; several images with several
# classes each (the switches are the signal's image's); non-square kernels and padding
CASES = [
    ((3, 3), (1, 1), None, 32, 20, 1, 3, 7, 9, True),
    ((3, 3), (1, 1), None, 37, 70, 2, 1, 6, 5, False),
    ((3, 2), (2, 0), None, 5, 33, 1, 2, 5, 8, True),
    ((3, 3), (1, 1), (2, 2, 0), 64, 33, 2, 2, 8, 10, True),
    ((3, 3), (1, 1), (2, 2, 0), 9, 20, 1, 3, 9, 7, False),
    ((3, 3), (1, 1), (2, 2, 1), 32, 64, 2, 1, 8, 8, True),
    ((2, 3), (1, 0), (2, 3, 1), 33, 5, 1, 2, 11, 10, True),
    ((1, 1), (0, 0), (2, 2, 0), 40, 96, 1, 2, 6, 6, False),
    # flat planes, where the halo kernel picks its flattest patches: 4 x 32 (32-channel tiles), 2 x 32 (64)
    ((3, 3), (1, 1), None, 32, 20, 1, 1, 4, 30, False),
    ((3, 3), (1, 1), None, 32, 70, 1, 1, 2, 30, False),
]


# the two kernels: the flat one (B gathered per tap) and the halo one (halo=True: B staged per patch and chunk)
KERNELS = [False, True]
KERNEL_IDS = ["flat", "halo"]


def _halo_ran(monkeypatch):
    """Record the patch of every launch (None: the flat kernel). With halo on, every launch of these tests
    must have one: else a change to PATCHES or the tiles would quietly test the flat kernel twice."""
    patches = []
    real = tc.patch
    monkeypatch.setattr(tc, "patch", lambda *a: patches.append(real(*a)) or patches[-1])
    return patches


def _run_with(monkeypatch, name, code, case=None, halo=False):
    """run_kernel(3, case (default CASES[3])) with the kernel source tc.<name> replaced by ``code``: the
    compiled kernels are rebuilt for it, and again after it is restored."""
    original = getattr(tc, name)
    monkeypatch.setattr(tc, name, code)
    tc._host_library.cache_clear()
    tc._gpu_kernel.cache_clear()
    try:
        return run_kernel(3, *(case or CASES[3]), halo=halo)
    finally:
        monkeypatch.setattr(tc, name, original)
        tc._host_library.cache_clear()
        tc._gpu_kernel.cache_clear()


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_tensor_core_transpose_equals_reference(monkeypatch, case, halo):
    patches = _halo_ran(monkeypatch)
    got, want = run_kernel(3, *case, halo=halo)
    assert not np.isnan(got).any(), "pixels left unwritten"
    assert_close(got, want, RTOL_F32, "tensor-core transposed conv (TF32 inputs)")
    assert all(patches) and len(patches) == halo  # the halo kernel ran where asked, and only there


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
def test_wide_tiles(monkeypatch, halo):
    """wide: 128-channel blocks (4 x 4 mma tiles per warp) for a layer of 130 output channels (a ragged
    second block), behind a pool and on a dense source."""
    patches = _halo_ran(monkeypatch)
    assert tc.tile_m(130, True) == 128 and tc.tile_m(64, True) == 64 and tc.tile_m(130) == 64
    for case in (((3, 3), (1, 1), (2, 2, 0), 32, 130, 1, 2, 8, 6, True),
                 ((3, 3), (1, 1), None, 40, 130, 1, 1, 5, 7, False)):
        got, want = run_kernel(5, *case, halo=halo, wide=True)
        assert_close(got, want, RTOL_F32, "tensor-core transposed conv on 128-channel tiles")
    assert all(patches) and len(patches) == 2 * halo


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
def test_a_nan_in_the_source_stays_nan(monkeypatch, halo):
    """Rectification as the reference does it (s < 0 -> 0): a NaN that overflow left in a signal comes out as
    NaN where it reaches, rectified or not, never as a plausible 0."""
    patches = _halo_ran(monkeypatch)
    rng = np.random.default_rng(2)
    y = rng.normal(size=(32, 1, 4, 4)).astype(np.float32)
    y[5, 0, 1, 2] = np.nan
    w = dv.asdevice(tc.weight_layout(rng.normal(size=(32, 8, 3, 3))))
    for rect in (True, False):
        out = dv.asdevice(np.zeros((8, 1, 4, 4), np.float32))
        tc.launch(dv.asdevice(y), dv.asdevice(np.zeros(1, np.int32)), w, out, 32, 8, 1, 4, 4, 4, 4, 4, 4, 0, 1, rect,
                  (3, 3), (1, 1), None, halo=halo)
        got = dv.tohost(out)
        assert np.isnan(got[:, 0, 0:3, 1:4]).all() and not np.isnan(got[:, 0, 3, 0]).any(), rect
    assert all(patches) and len(patches) == 2 * halo


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
def test_tensor_core_bias(monkeypatch, halo):
    """The forward conv's bias (BIAS): added once per output channel."""
    patches = _halo_ran(monkeypatch)
    got, want = run_kernel(4, *CASES[1], bias=True, halo=halo)
    assert_close(got, want, RTOL_F32, "tensor-core transposed conv with bias")
    assert all(patches) and len(patches) == halo


def test_wrong_fragment_layouts_are_caught(monkeypatch):
    """Negative controls: the kernel with registers a1/a2 of the A fragment swapped, with A laid out row by row
    instead of in fragment order (or with a1/a2's rows and columns confused in the layout), with B's b1
    taken from b0's row, or with B's pairs read unswizzled, must fail the comparison (the emulation models the PTX layouts; it does not forgive
    them)."""
    case = CASES[3]
    rows_first = tc.weight_layout

    def layout(order):
        def wrong(w):
            a = rows_first(w).reshape(-1, 8, 4, 4)  # (m * kb, g, t, 2 c + r), as weight_layout makes it
            m, K8 = tc.padded_shape(*np.shape(w)[:2], *np.shape(w)[2:])[:2]
            a = a.reshape(m, K8, 8, 4, 2, 2)  # (m, kb, g, t, c, r)
            if order == "rows":  # plain (16 x 8) row-major blocks
                a = a.transpose(0, 1, 5, 2, 4, 3)  # (m, kb, r, g, c, t): row 8 r + g, column 4 c + t
            else:  # register 2 r + c
                a = a.transpose(0, 1, 2, 3, 5, 4)
            return np.ascontiguousarray(a).reshape(m, K8, 32, 4)
        return wrong

    controls = [("source", "a[mi][1] = f.y;", "a[mi][1] = f.z;"), ("source", "a[mi][2] = f.z;", "a[mi][2] = f.y;"),
                ("source", "b[ni][1] = f.y;", "b[ni][1] = f.x;"),
                ("source", "[t4 ^ ((col / 4) % 4)]", "[t4]"),
                ("layout", "rows", None), ("layout", "registers", None)]
    for kind, old, new in controls:
        if kind == "source":
            assert old in tc._SOURCE
            got, want = _run_with(monkeypatch, "_SOURCE", tc._SOURCE.replace(old, new), case)
        else:
            with monkeypatch.context() as m:
                m.setattr(tc, "weight_layout", layout(old))
                got, want = run_kernel(3, *case)
        assert rel_err(got, want) > 0.1, (old, rel_err(got, want))


def test_weight_layout_is_the_fragment_order():
    """weight_layout against its definition, element by element: F[m, kb, 4 g + t, q] is A[16 m + g + 8 (q % 2),
    8 kb + t + 4 (q // 2)], A[i, (ky kw + kx) O' + o] = w[o, i, ky, kx] rounded to TF32, zeros in the padding."""
    rng = np.random.default_rng(2)
    O, I, kh, kw = 37, 20, 3, 2
    w = rng.normal(size=(O, I, kh, kw))
    F = tc.weight_layout(w)
    assert F.shape == tc.padded_shape(O, I, kh, kw) == (128 // 16, kh * kw * 64 // 8, 32, 4)
    assert F.dtype == np.float32 and F.flags.c_contiguous
    OP = 64
    A = np.zeros((128, kh * kw * OP), np.float32)
    for ky in range(kh):
        for kx in range(kw):
            A[:I, (ky * kw + kx) * OP:(ky * kw + kx) * OP + O] = w[:, :, ky, kx].T
    A = tc.round_tf32(A)
    for m in range(F.shape[0]):
        for kb in range(F.shape[1]):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for q in range(4):
                    assert F[m, kb, lane, q] == A[16 * m + g + 8 * (q % 2), 8 * kb + t + 4 * (q // 2)]


def test_halo_kernel_mistakes_are_caught(monkeypatch):
    """Negative controls of the halo kernel: the tap's shift taken the wrong way round, b0 and b1 of a staged
    pair swapped, the patch's rows read with the halo's width dropped, and (emulation only, warp 0 delayed)
    the barrier after each tap's A store deleted, or the first chunk's, which publishes the halo's source
    cells: each must fail the comparison."""
    controls = [("(KH - 1 - tap / KW) * HW2 + (KW - 1 - tap % KW)", "(tap / KW) * HW2 + (tap % KW)"),
                ("Bs[grp][pix][pr] = make_uint2(r[0], r[1]);", "Bs[grp][pix][pr] = make_uint2(r[1], r[0]);"),
                ("pb[ni] = (col / TW) * HW2 + col % TW;", "pb[ni] = col;")]
    barrier = "                store_a(buf ^ 1);\n                __syncthreads();"
    if dv.cp is None:
        controls.append((barrier, "                tc_host_skew(warp);\n                store_a(buf ^ 1);"))
        # the chunk loop's first barrier also makes each halo pixel's source cell (Hc) visible: skipped for
        # the first chunk, with warp 0 filling its cells late
        first = "        __syncthreads();  // the previous chunk's readers are done\n"
        fill = "    for (int p = tid; p < HP; p += THREADS) {"
        late_fill = (fill, "    tc_host_skew(warp);\n" + fill)
        controls.append((*late_fill, first, "        if (c0) __syncthreads();\n"))
        # the positive controls: the same delays with the barriers kept are harmless
        for old, new in ((barrier, "                tc_host_skew(warp);\n" + barrier), late_fill):
            assert old in tc._HALO_SOURCE, old
            got, want = _run_with(monkeypatch, "_HALO_SOURCE", tc._HALO_SOURCE.replace(old, new), halo=True)
            assert rel_err(got, want) < RTOL_F32, old
    for control in controls:  # (old, new) pairs, each replaced in the source
        code = tc._HALO_SOURCE
        for old, new in zip(control[::2], control[1::2]):
            assert old in code, old
            code = code.replace(old, new)
        got, want = _run_with(monkeypatch, "_HALO_SOURCE", code, halo=True)
        assert rel_err(got, want) > 0.1, (control, rel_err(got, want))


def test_halo_patches():
    """tc.patch: the patch that computes the fewest pixels of the plane (then the smallest halo), within the
    48 KB of static shared memory; None (the flat kernel) when no patch fits."""
    assert tc.patch(3, 3, 64, 28, 28) == (4, 16)  # 28 x 32 pixels, against 32 x 32 on 8 x 8
    assert tc.patch(3, 3, 64, 224, 224) == (8, 8)  # no waste anywhere: the smallest halo
    assert tc.patch(3, 3, 32, 14, 14) == (8, 16)  # 32-channel tiles have 128 pixels: 16 x 16, against 16 x 32
    assert tc.patch(3, 3, 128, 7, 7) == (8, 8)  # 128-channel tiles have 64
    for bm in (32, 64, 128):
        for k in (1, 3, 5):
            p = tc.patch(k, k, bm, 56, 56)
            assert p is None or tc.halo_shared_bytes(k, k, bm, p) <= tc.SHARED_LIMIT
    assert tc.patch(15, 15, 128, 56, 56) is None


def test_a_missing_barrier_between_warps_is_caught(monkeypatch):
    """The emulated mma synchronises its own warp only, as mma.sync does: with the __syncthreads() between a
    step's fragment reads and the next step's staging deleted, and warp 0 made to fall a barrier behind
    (tc_host_skew: it waits until the other warps reach their next barrier, an order, not a delay), the other
    warps overwrite the tiles it is still reading, and the comparison fails (with the barrier, it passes:
    the same skew is harmless). Emulation only: the skew is a host function."""
    if dv.cp is not None:
        pytest.skip("emulation only: the negative control injects a host-side delay")
    loop = "#pragma unroll\n        for (int ks = 0; ks < BK; ks += 8) {"
    barrier = "        __syncthreads();\n        if (more) {"
    assert loop in tc._SOURCE and barrier in tc._SOURCE
    skewed = tc._SOURCE.replace(loop, "        tc_host_skew(warp);\n" + loop)
    errors = [rel_err(*_run_with(monkeypatch, "_SOURCE", code))
              for code in (skewed, skewed.replace(barrier, "        if (more) {"))]
    assert errors[0] < RTOL_F32 and errors[1] > 0.1, errors


def test_launch_refuses_what_it_cannot_do():
    """launch() checks what it is given on every path: a geometry supports() refuses (overlapping windows),
    offsets of another dtype, a weight not laid out by weight_layout, or not aligned for 16-byte loads."""
    rng = np.random.default_rng(0)
    src = dv.asdevice(rng.normal(size=(32, 2, 3, 3)).astype(np.float32))
    out = dv.asdevice(np.zeros((8, 2, 6, 6), np.float32))
    w = dv.asdevice(tc.weight_layout(rng.normal(size=(32, 8, 3, 3))))
    offs = dv.asdevice(np.zeros((2, 32, 3, 3), np.int32))
    args = (32, 8, 2, 3, 3, 6, 6, 6, 6, 0, 1, False, (3, 3), (1, 1))
    with pytest.raises(ValueError, match="supports"):
        tc.launch(src, offs, w, out, *args, (3, 3, 2, 2, 0, 0))
    with pytest.raises(ValueError, match="int64"):
        tc.launch(src, dv.asdevice(np.zeros((2, 32, 3, 3), np.int64)), w, out, *args, (2, 2, 2, 2, 0, 0))
    with pytest.raises(ValueError, match="weight_layout"):
        tc.launch(src, offs, dv.asdevice(np.zeros((128, 3, 3, 32), np.float32)), out, *args, (2, 2, 2, 2, 0, 0))
    shifted = dv.asdevice(np.zeros(w.size + 1, np.float32))[1:].reshape(w.shape)  # 4 bytes past an aligned start
    with pytest.raises(ValueError, match="aligned"):
        tc.launch(src, offs, shifted, out, *args, (2, 2, 2, 2, 0, 0))


def test_tf32_rounding():
    """round_tf32 keeps 10 mantissa bits, rounding to nearest (ties away from zero)."""
    x = np.random.default_rng(0).normal(size=10000).astype(np.float32) * np.float32(1e3)
    r = tc.round_tf32(x)
    assert (r.view(np.uint32) & 0x1FFF == 0).all()
    assert (np.abs(r.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0**-11).all()
    ties = np.array([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11], np.float32)
    assert tc.round_tf32(ties).tolist() == [1 + 2**-10, -(1 + 2**-10), 1 + 2**-9]


def test_supports_and_sizes():
    assert tc.supports(3, 3, 1, 1, 1, 1, None) and tc.supports(3, 3, 1, 1, 1, 1, (2, 2, 2, 2, 0, 0))
    assert not tc.supports(3, 3, 2, 2, 1, 1, None)  # strided: columns + GEMM
    assert not tc.supports(3, 3, 1, 1, 1, 1, (3, 3, 2, 2, 0, 0))  # overlapping windows
    assert not tc.supports(3, 3, 1, 1, 3, 1, None)  # padding beyond the kernel
    assert tc.fits(2**31 - 1, 10) and not tc.fits(10, 2**31)
    with pytest.raises(ValueError, match="32-bit"):
        tc.launch(np.zeros(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32),
                  np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (2**31,), (0,)),
                  1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, False, (1, 1), (0, 0), None)


def _net(rng):
    def conv(i, o, k=3, p=1):
        return Conv(rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k), rng.normal(size=o) * 0.1, 1, p)

    return Network([conv(2, 16), ReLU(), conv(16, 17), ReLU(), MaxPool(2), conv(17, 16), ReLU(), conv(16, 16), ReLU(),
                    MaxPool(2, 2, 1), conv(16, 7), ReLU(), conv(7, 4, 1, 0), ReLU()])


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
def test_fast_mode_on_the_tensor_cores(monkeypatch, halo):
    """The TensorCores variant in the fast mode: the forward convs with at least tc.MIN_CHANNELS source channels run on the
    tensor-core kernel as transposed convs of their flipped kernels, bias added (the input conv and the 7->4
    head do not); so do the back-projection's stride-1 transposed convs behind the 2x2 pools (one padded)
    and on a dense source, while the input layer's stays on the direct kernel. Every launch is counted. The
    forward's logits, and the maps made from the exact trace (same switches), agree with the float64
    reference to TF32 accuracy, and the dominant class wherever it is decided by more than that. In the
    exact mode the kernel is never used."""
    config = kc.CudaConfig(variants=(TensorCores(halo=halo),))
    patches = _halo_ran(monkeypatch)
    used = []
    real = tc.launch
    monkeypatch.setattr(tc, "launch", lambda *a, **k: used.append((a[4], a[5], a[18], len(a) > 19)) or real(*a, **k))
    rng = np.random.default_rng(8)
    net = _net(rng)
    x = rng.normal(size=(2, 2, 12, 11))
    classes = np.array([[0, 3, 1], [2, 1, 0]])
    want_trace = ref.forward(net, x)
    want = ref.clear_from_trace(net, want_trace, classes)
    trace = kc.forward(net, x, fast=False, config=config)
    exact = kc.clear_from_trace(net, trace, classes, fast=False, config=config)
    assert used == []
    fast_trace = kc.forward(net, x, config=config.replace(precision="tf32"))
    assert used == [(16, 17, None, True), (17, 16, None, True), (16, 16, None, True), (16, 7, None, True)]
    err = rel_err(dv.tohost(fast_trace.logits), want_trace.logits)
    assert RTOL_F32 < err < 2e-3, err  # really TF32, and only that far off
    del used[:]
    got = kc.clear_from_trace(net, trace, classes, fast=True, config=config)
    assert used == [(16, 16, (2, 2, 2, 2, 1, 1), False), (16, 17, None, False), (17, 16, (2, 2, 2, 2, 0, 0), False)]
    for out, tol in ((exact, RTOL_F32), (got, 2e-3)):
        responses = dv.tohost(out.responses)
        err = rel_err(responses, want.responses)
        assert err < tol, err
        mask = decisive(want.responses, margin=0.02)
        assert mask.mean() > 0.3  # enough pixels decided to test
        assert (dv.tohost(out.dominant_index)[mask] == want.dominant_index[mask]).all()
    assert rel_err(dv.tohost(got.responses), want.responses) > RTOL_F32  # the tensor cores' TF32, not float32
    assert all(patches) and len(patches) == 7 * halo


@pytest.mark.parametrize("halo", KERNELS, ids=KERNEL_IDS)
def test_tensor_cores_in_chunks(monkeypatch, halo):
    """The work split into chunks of one image and some of its classes (b0 > 0, kc < K): the tensor-core
    kernel reads the chunk's own images' switch offsets, and the maps are bit for bit those of one pass."""
    config = kc.CudaConfig(precision="tf32", variants=(TensorCores(halo=halo),))
    patches = _halo_ran(monkeypatch)
    rng = np.random.default_rng(9)
    net = _net(rng)
    x = rng.normal(size=(3, 2, 12, 11))
    classes = np.array([[0, 3, 1], [2, 1, 0], [3, 2, 1]])
    trace = kc.forward(net, x, fast=False)
    whole = kc.clear_from_trace(net, trace, classes, config=config)
    pieces = [(b, 1, k0, k) for b in range(3) for k0, k in ((0, 2), (2, 1))]
    monkeypatch.setattr(memory, "chunks", lambda *a: pieces)
    split = kc.clear_from_trace(net, trace, classes, config=config)
    assert_equal(dv.tohost(split.responses), dv.tohost(whole.responses), "responses")
    assert_equal(dv.tohost(split.dominant_index), dv.tohost(whole.dominant_index), "dominant class")
    assert all(patches) and bool(patches) == halo
