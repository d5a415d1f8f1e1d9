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
dependent load and store a candidate, with a branch on the threshold. Measured on an Intel machine only
(benchmarks/README.md); the project's AMD (Zen 4) machine has not run it yet.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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


@intrinsic
def decay8(typingctx, score, position, weight, t, end, thresh, float32_scores):
    """Soft-NMS's decays of candidates ``t .. t + 7`` (those before ``end``): ``score[position[c]] *=
    weight[c]`` (rounded to float32 first when ``float32_scores``), or -inf where the product is not above
    ``thresh`` -- one gather, one multiply and one scatter of eight lanes. Returns the bit mask of the lanes whose
    box died (bit ``c - t``). ``position`` holds distinct indices (one box once a step)."""
    wanted = ((score, types.float64), (weight, types.float64), (position, types.int64))
    for arr, dtype in wanted:
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
            return None
    sig = types.int64(score, position, weight, types.int64, types.int64, types.float64, types.boolean)

    def codegen(context, builder, signature, args):
        data = {i: context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 1, 2)}
        t_v, end_v, thresh_v, f32_v = args[3], args[4], args[5], args[6]
        lane = builder.add(_splat(builder, t_v, _I64X8), ir.Constant(_I64X8, list(range(LANES))))
        valid = builder.icmp_signed("<", lane, _splat(builder, end_v, _I64X8))
        index = builder.load(_vector_at(builder, data[1], t_v, _I64X8), align=8)
        w = builder.load(_vector_at(builder, data[2], t_v, _F64X8), align=8)
        base = _splat(builder, builder.ptrtoint(data[0], _I64), _I64X8)
        ptr_type = ir.VectorType(ir.PointerType(_F64), LANES)
        pointers = builder.inttoptr(builder.add(base, builder.shl(index, _splat(builder, ir.Constant(_I64, 3), _I64X8))),
                                    ptr_type)
        gather = _declare(builder, f"llvm.masked.gather.v{LANES}f64.v{LANES}p0", _F64X8,
                          [ptr_type, _I32, _MASK, _F64X8])
        old = builder.call(gather, [pointers, ir.Constant(_I32, 8), valid, ir.Constant(_F64X8, None)])
        product = builder.fmul(w, old)
        rounded = builder.fpext(builder.fptrunc(product, ir.VectorType(ir.FloatType(), LANES)), _F64X8)
        product = builder.select(f32_v, rounded, product)
        alive = builder.fcmp_ordered(">", product, _splat(builder, thresh_v, _F64X8))
        minus_inf = ir.Constant(_F64X8, [float("-inf")] * LANES)
        scatter = _declare(builder, f"llvm.masked.scatter.v{LANES}f64.v{LANES}p0", ir.VoidType(),
                           [_F64X8, ptr_type, _I32, _MASK])
        builder.call(scatter, [builder.select(alive, product, minus_inf), pointers, ir.Constant(_I32, 8), valid])
        died = builder.and_(valid, builder.not_(alive))
        return builder.zext(builder.bitcast(died, ir.IntType(LANES)), _I64)

    return sig, codegen
