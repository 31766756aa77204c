"""Eight-float vectors for the CPU kernels: a Numba type held in one SIMD register, and four operations.

Why: Numba leaves LLVM's SLP vectoriser off (numba#8705), so a kernel written with scalar locals stays
scalar, and its loop vectoriser keeps accumulators in memory: a multiply-add loop over a weight row then
loads and stores its output row for every few terms. On the 2-core EPYC of the benchmarks that ran at
~6 G multiply-adds/s per core. Summing a pixel's terms into four of these vectors instead (32 output
channels held in registers across all terms, one store at the end) ran at ~19 G/s per core on the same
data (``bench/README.md``, "Where the time goes").

What: ``F32x8`` is LLVM's ``<8 x float>``; ``vzero()``, ``vload(a, i)`` (a[i:i+8]), ``vstore(a, i, v)``
``vfma(acc, x, s)`` (acc + x · s, s a vector or a float32 scalar applied to every lane, with
'contract' so LLVM emits one FMA where the CPU has one) and ``vsum(v)`` (the eight lanes' sum, a float32). ``a`` must be a one-dimensional C-contiguous float32 array; the caller guarantees
0 ≤ i and i + 8 ≤ len(a) — these operations do no bounds checks. LLVM lowers the vector type on every
target (two SSE registers without AVX), so the results never depend on the CPU, only the speed does.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic, models, register_model

__all__ = ["F32x8", "vfma", "vload", "vstore", "vsum", "vzero"]

_VT = ir.VectorType(ir.FloatType(), 8)
_FLAGS = ("contract",)


class F32x8(types.Type):
    def __init__(self):
        super().__init__(name="F32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VT)


def _flat_f32(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1 and arr.layout == "C"


def _pointer(context, builder, arrtype, arr, idx):
    data = context.make_array(arrtype)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [idx]), _VT.as_pointer())


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VT, [0.0] * 8)
    return f32x8(), codegen


@intrinsic
def vload(typingctx, arr, idx):
    if not (_flat_f32(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
    return f32x8(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    if not (_flat_f32(arr) and isinstance(idx, types.Integer) and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return types.none(arr, idx, v), codegen


@intrinsic
def vfma(typingctx, acc, x, s):
    if not (acc == f32x8 and x == f32x8 and s in (types.float32, f32x8)):
        return None

    def codegen(context, builder, sig, args):
        acc_, x_, s_ = args
        if sig.args[2] != f32x8:  # a scalar: splat it over the eight lanes
            lane0 = builder.insert_element(ir.Constant(_VT, ir.Undefined), s_, ir.Constant(ir.IntType(32), 0))
            s_ = builder.shuffle_vector(lane0, ir.Constant(_VT, ir.Undefined),
                                        ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        return builder.fadd(acc_, builder.fmul(x_, s_, flags=_FLAGS), flags=_FLAGS)
    return f32x8(acc, x, s), codegen


@intrinsic
def vsum(typingctx, v):
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        lanes = [builder.extract_element(args[0], ir.Constant(ir.IntType(32), j)) for j in range(8)]
        while len(lanes) > 1:  # pairwise: ((l0 + l1) + (l2 + l3)) + ...
            lanes = [builder.fadd(lanes[j], lanes[j + 1]) for j in range(0, len(lanes), 2)]
        return lanes[0]
    return types.float32(v), codegen
