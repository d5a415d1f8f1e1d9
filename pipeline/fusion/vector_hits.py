"""Soft-NMS's overlap search, eight grid slots at a time: the IoUs of the selected box with the slots' boxes, and the
slots above the decay threshold written one after the other with their library positions; NMS's marks likewise.

The loop this replaces computed a run's IoUs in one vectorised loop (stored per slot), then compacted the hits in a
scalar loop (``cand[k] = s; k += iou[s] > above``: ``k`` is carried from slot to slot, so LLVM leaves it scalar),
then read each hit's IoU and position again. :func:`iou_hits8` does all three on vector registers: the IoUs as
:func:`pipeline.fusion.suppression_kernel._slot_iou` computes them (the same operations in the same order, so the
same bits), the hits packed to the front of the vector (``llvm.experimental.vector.compress``: AVX-512's
``vpcompressq`` between registers, the IoUs as their bits) and stored whole, their number a ``popcount`` of the lane
mask.

The packed lanes are stored whole from a register, not with a compressing store to memory
(``llvm.masked.compressstore``): Zen 4 runs a compress to memory as microcode, and gaussian soft-NMS took
1.6-1.8 times as long with it on this project's 2-core AMD EPYC machine (benchmarks/README.md). Where the CPU
has no AVX-512, LLVM expands the compress into lane-by-lane code with the same result. numba 0.68 ships LLVM 22
(the compress intrinsic needs LLVM 19).

:func:`suppress8` is hard NMS's test of eight slots (mark those above ``iou_thr``): the same IoUs in one register,
where LLVM vectorised the scalar loop four lanes at a time (its cost model prefers 256-bit vectors on these CPUs).

:func:`decay8` is soft-NMS's decay of eight candidates: their scores gathered from the library's positions,
multiplied by their weights, and scattered back (-inf where a score fell to ``thresh``), with LLVM's masked gather and
scatter (AVX-512's ``vgatherqpd`` / ``vscatterqpd``; lane by lane where the CPU has none). The scalar loop did one
dependent load and store a candidate, with a branch on the threshold. :func:`gaussian_decay8` computes the eight
gaussian weights on the way, with :func:`~pipeline.fusion.vector_exp.exp_vectorisable`'s operations written out
(the same bits), so that they are never stored and loaded again. Measured on an Intel machine only
(benchmarks/README.md); the project's AMD (Zen 4) machine has not run them yet.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from pipeline.fusion.vector_exp import INV_LN2, LN2_HI, LN2_LO, ROUND_SHIFT, TAYLOR

LANES = 8  # doubles in an AVX-512 register

_F64 = ir.DoubleType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_F64X8 = ir.VectorType(_F64, LANES)
_I64X8 = ir.VectorType(_I64, LANES)
_MASK = ir.VectorType(ir.IntType(1), LANES)


def _splat(builder: ir.IRBuilder, scalar: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``scalar`` in every lane."""
    one = builder.insert_element(ir.Constant(vector, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector, None), ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _vector_at(builder: ir.IRBuilder, data: ir.Value, index: ir.Value, vector: ir.VectorType) -> ir.Value:
    """Pointer to the ``vector`` that starts at ``data[index]``."""
    return builder.bitcast(cgutils.gep_inbounds(builder, data, index), vector.as_pointer())


def _declare(builder: ir.IRBuilder, name: str, returns: ir.Type, arguments: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, arguments), name)


def _pick(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, op: str) -> ir.Value:
    """``a if a <op> b else b`` lane by lane: the kernel's conditional expressions (not ``min`` / ``max``)."""
    return builder.select(builder.fcmp_ordered(op, a, b), a, b)


def _slot_ious(builder: ir.IRBuilder, slots: list[ir.Value], box: list[ir.Value]) -> ir.Value:
    """IoU of ``box`` (four scalars) with each lane's box (``slots``: x1, y1, x2, y2 vectors), as ``_slot_iou``:
    ``inter / ((area_b + area) - inter)``."""
    x1, y1, x2, y2 = slots
    bx1, by1, bx2, by2 = (_splat(builder, v, _F64X8) for v in box)
    w = builder.fsub(_pick(builder, bx2, x2, "<"), _pick(builder, bx1, x1, ">"))
    h = builder.fsub(_pick(builder, by2, y2, "<"), _pick(builder, by1, y1, ">"))
    zero = ir.Constant(_F64X8, [0.0] * LANES)
    inter = builder.fmul(_pick(builder, w, zero, ">"), _pick(builder, h, zero, ">"))
    area_b = builder.fmul(builder.fsub(box[2], box[0]), builder.fsub(box[3], box[1]))
    area = builder.fmul(builder.fsub(x2, x1), builder.fsub(y2, y1))
    return builder.fdiv(inter, builder.fsub(builder.fadd(_splat(builder, area_b, _F64X8), area), inter))


def _append(builder: ir.IRBuilder, vector: ir.Value, hit: ir.Value, out: ir.Value, k: ir.Value) -> None:
    """The lanes of ``vector`` where ``hit``, in lane order, from ``out[k]`` (all eight lanes are stored). Packed as
    64-bit integers (a double's bits as they are): LLVM 22 aborts expanding a compress of doubles for a CPU without
    AVX-512 when it knows nothing more of it (``NUMBA_CPU_NAME=generic``, numba's portable caches)."""
    bits = builder.bitcast(vector, _I64X8)
    compress = _declare(builder, f"llvm.experimental.vector.compress.v{LANES}i64", _I64X8, [_I64X8, _MASK, _I64X8])
    packed = builder.call(compress, [bits, hit, ir.Constant(_I64X8, None)])
    builder.store(packed, _vector_at(builder, out, k, _I64X8), align=8)


@intrinsic
def iou_hits8(typingctx, sx1, sy1, sx2, sy2, position, s, end, bx1, by1, bx2, by2, above, out_position, out_iou, k):
    """Slots ``s .. s + 7`` of a grid (``sx1`` .. ``sy2``: the slots' box coordinates; ``position``: a value per
    slot): of those before ``end`` whose IoU with box B (``bx1`` .. ``by2``) is above ``above``, ``position`` and
    the IoU are written from ``out_position[k]`` and ``out_iou[k]``, in slot order; returns ``k`` plus their
    number. The IoU is ``_slot_iou``'s, bit for bit.

    Reads slots ``s .. s + 7`` of every slot array, also past ``end`` (those values are ignored), and writes eight
    lanes of both outputs from ``k`` (those past the hits hold anything). 1-D contiguous arrays, float64 but for
    ``position`` and ``out_position`` (int64)."""
    wanted = ((sx1, types.float64), (sy1, types.float64), (sx2, types.float64), (sy2, types.float64),
              (out_iou, types.float64), (position, types.int64), (out_position, types.int64))
    for arr, dtype in wanted:
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
            return None
    sig = types.int64(sx1, sy1, sx2, sy2, position, types.int64, types.int64, types.float64, types.float64,
                      types.float64, types.float64, types.float64, out_position, out_iou, types.int64)

    def codegen(context, builder, signature, args):
        data = {i: context.make_array(signature.args[i])(context, builder, args[i]).data
                for i in (0, 1, 2, 3, 4, 12, 13)}  # the arrays' data pointers
        s_v, end_v, above_v, k_v = args[5], args[6], args[11], args[14]
        slots = [builder.load(_vector_at(builder, data[i], s_v, _F64X8), align=8) for i in range(4)]
        iou = _slot_ious(builder, slots, list(args[7:11]))
        lane = builder.add(_splat(builder, s_v, _I64X8), ir.Constant(_I64X8, list(range(LANES))))
        in_run = builder.icmp_signed("<", lane, _splat(builder, end_v, _I64X8))
        hit = builder.and_(builder.fcmp_ordered(">", iou, _splat(builder, above_v, _F64X8)), in_run)
        _append(builder, iou, hit, data[13], k_v)
        _append(builder, builder.load(_vector_at(builder, data[4], s_v, _I64X8), align=8), hit, data[12], k_v)
        popcount = _declare(builder, f"llvm.ctpop.i{LANES}", ir.IntType(LANES), [ir.IntType(LANES)])
        n_hits = builder.call(popcount, [builder.bitcast(hit, ir.IntType(LANES))])
        return builder.add(k_v, builder.zext(n_hits, _I64))

    return sig, codegen


@intrinsic
def suppress8(typingctx, sx1, sy1, sx2, sy2, s, bx1, by1, bx2, by2, thr, dead):
    """Hard NMS's test of grid slots ``s .. s + 7`` (``sx1`` .. ``sy2``, float64): ``dead[slot] |= IoU > thr``, the
    IoU with box B (``bx1`` .. ``by2``) as ``_slot_iou`` computes it, all eight lanes in one AVX-512 register (LLVM
    vectorises the scalar loop four lanes at a time on this project's CPUs). ``dead``: uint8, one byte a slot."""
    wanted = ((sx1, types.float64), (sy1, types.float64), (sx2, types.float64), (sy2, types.float64),
              (dead, types.uint8))
    for arr, dtype in wanted:
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
            return None
    sig = types.void(sx1, sy1, sx2, sy2, types.int64, types.float64, types.float64, types.float64, types.float64,
                     types.float64, dead)

    def codegen(context, builder, signature, args):
        data = {i: context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 1, 2, 3, 10)}
        s_v = args[4]
        slots = [builder.load(_vector_at(builder, data[i], s_v, _F64X8), align=8) for i in range(4)]
        iou = _slot_ious(builder, slots, list(args[5:9]))
        hit = builder.fcmp_ordered(">", iou, _splat(builder, args[9], _F64X8))
        bytes8 = ir.VectorType(ir.IntType(8), LANES)
        at = _vector_at(builder, data[10], s_v, bytes8)
        builder.store(builder.or_(builder.load(at, align=1), builder.zext(hit, bytes8)), at, align=1)
        return context.get_dummy_value()

    return sig, codegen



def _exp_lanes(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """:func:`~pipeline.fusion.vector_exp.exp_vectorisable` of eight lanes, operation for operation (the same bits:
    ``tests/test_fusion_vector_hits.py``)."""
    fmuladd = _declare(builder, f"llvm.fmuladd.v{LANES}f64", _F64X8, [_F64X8] * 3)

    def lanes(value: float) -> ir.Value:
        return ir.Constant(_F64X8, [value] * LANES)

    k = builder.fsub(builder.call(fmuladd, [x, lanes(INV_LN2), lanes(ROUND_SHIFT)]), lanes(ROUND_SHIFT))
    minus_k = builder.fneg(k)
    r = builder.call(fmuladd, [minus_k, lanes(LN2_LO), builder.call(fmuladd, [minus_k, lanes(LN2_HI), x])])
    p = lanes(TAYLOR[13])
    for c in TAYLOR[12:0:-1]:
        p = builder.call(fmuladd, [p, r, lanes(c)])
    scale = builder.bitcast(builder.shl(builder.add(builder.fptosi(k, _I64X8), ir.Constant(_I64X8, [1023] * LANES)),
                                        ir.Constant(_I64X8, [52] * LANES)), _F64X8)
    return builder.call(fmuladd, [scale, builder.fmul(r, p), scale])


def _decay_lanes(builder: ir.IRBuilder, score: ir.Value, position: ir.Value, t: ir.Value, end: ir.Value,
                 weight: ir.Value, thresh: ir.Value, float32_scores: ir.Value) -> ir.Value:
    """``score[position[t + c]] *= weight[c]`` for the lanes ``t + c < end`` (masked gather and scatter), -inf where
    the product is not above ``thresh``; the died lanes' bit mask, as an int64."""
    lane = builder.add(_splat(builder, t, _I64X8), ir.Constant(_I64X8, list(range(LANES))))
    valid = builder.icmp_signed("<", lane, _splat(builder, end, _I64X8))
    index = builder.load(_vector_at(builder, position, t, _I64X8), align=8)
    pointers_type = ir.VectorType(ir.PointerType(_F64), LANES)
    offsets = builder.shl(index, ir.Constant(_I64X8, [3] * LANES))
    pointers = builder.inttoptr(builder.add(_splat(builder, builder.ptrtoint(score, _I64), _I64X8), offsets),
                                pointers_type)
    gather = _declare(builder, f"llvm.masked.gather.v{LANES}f64.v{LANES}p0", _F64X8,
                      [pointers_type, _I32, _MASK, _F64X8])
    product = builder.fmul(weight, builder.call(gather, [pointers, ir.Constant(_I32, 8), valid,
                                                         ir.Constant(_F64X8, None)]))
    rounded = builder.fpext(builder.fptrunc(product, ir.VectorType(ir.FloatType(), LANES)), _F64X8)
    product = builder.select(float32_scores, rounded, product)  # as numpy stores it in a float32 array
    alive = builder.fcmp_ordered(">", product, _splat(builder, thresh, _F64X8))
    scatter = _declare(builder, f"llvm.masked.scatter.v{LANES}f64.v{LANES}p0", ir.VoidType(),
                       [_F64X8, pointers_type, _I32, _MASK])
    minus_inf = ir.Constant(_F64X8, [float("-inf")] * LANES)
    builder.call(scatter, [builder.select(alive, product, minus_inf), pointers, ir.Constant(_I32, 8), valid])
    return builder.zext(builder.bitcast(builder.and_(valid, builder.not_(alive)), ir.IntType(LANES)), _I64)


def _decay_signature(score, position, values):
    """The signature shared by :func:`decay8` and :func:`gaussian_decay8` (None for other argument types)."""
    for arr, dtype in ((score, types.float64), (values, types.float64), (position, types.int64)):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
            return None
    return types.int64(score, position, values, types.int64, types.int64, types.float64, types.boolean)


@intrinsic
def decay8(typingctx, score, position, weight, t, end, thresh, float32_scores):
    """Soft-NMS's decays of candidates ``t .. t + 7`` (those before ``end``): ``score[position[c]] *=
    weight[c]`` (rounded to float32 first when ``float32_scores``), or -inf where the product is not above
    ``thresh`` -- one gather, one multiply and one scatter of eight lanes. Returns the bit mask of the lanes whose
    box died (bit ``c - t``). ``position`` holds distinct indices (one box once a step)."""
    sig = _decay_signature(score, position, weight)

    def codegen(context, builder, signature, args):
        data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in range(3)]
        weights = builder.load(_vector_at(builder, data[2], args[3], _F64X8), align=8)
        return _decay_lanes(builder, data[0], data[1], args[3], args[4], weights, args[5], args[6])

    return (sig, codegen) if sig is not None else None


@intrinsic
def gaussian_decay8(typingctx, score, position, iou, t, end, sigma, thresh, float32_scores):
    """:func:`decay8` with each weight computed from the candidate's IoU in the same registers: ``exp(-(iou *
    iou) / sigma)`` as :func:`~pipeline.fusion.vector_exp.exp_vectorisable` gives it (callers check
    ``covers_gaussian_weights(sigma)`` first). Returns the died lanes' bit mask."""
    base = _decay_signature(score, position, iou)
    sig = None if base is None else types.int64(*base.args[:5], types.float64, *base.args[5:])

    def codegen(context, builder, signature, args):
        data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in range(3)]
        v = builder.load(_vector_at(builder, data[2], args[3], _F64X8), align=8)
        x = builder.fdiv(builder.fneg(builder.fmul(v, v)), _splat(builder, args[5], _F64X8))  # -(iou * iou) / sigma
        return _decay_lanes(builder, data[0], data[1], args[3], args[4], _exp_lanes(builder, x), args[6], args[7])

    return (sig, codegen) if sig is not None else None
