"""An ``exp`` that LLVM vectorises, for gaussian soft-NMS's decay weights ``exp(-(iou * iou) / sigma)``.

numba calls glibc's scalar ``exp`` per element (through its helper library's PLT entry and glibc's compatibility
wrapper): about a fifth of gaussian soft-NMS's time at 40 sets x 100 boxes (perf). :func:`exp_vectorisable` is
arithmetic only -- a round-to-nearest by the 1.5 * 2**52 shift, fdlibm's two-part ln 2, a degree-13 Taylor polynomial
by Horner's rule and the power of two built in the exponent bits -- so a loop calling it runs on vector registers
(about 2 ns an element against 5.5 ns on this 2-core machine, before the fused multiply-adds). Every multiply-add
is one ``llvm.fmuladd`` (fused where the CPU has FMA: fewer instructions, rounded once); the loop's elements are
independent, so Horner's fewest operations serve as well as Estrin's shorter chains (benchmarks/README.md).

It is within 1 ulp of glibc's ``exp`` and differs from it in the last bit on ~10 % of arguments. The library computes
its weights with numpy's ``np.exp``, whose own SIMD ``exp`` differs from glibc's on ~5 % (AVX-512 machines; glibc's
elsewhere), and soft-NMS returns the undecayed scores: a decayed score only decides the selection order and the
threshold, so the last bit matters only between scores that tie to within an ulp, where the library's own answer
already depends on the machine. ``exp(0) = 1`` exactly (a box that does not overlap keeps its score).

:func:`pipeline.fusion.vector_hits.gaussian_decay8` repeats these operations on eight lanes in LLVM's IR (its test
checks the bits against this function).

Valid for ``-708 <= x <= 0`` (the power of two stays a normal number); callers check
:func:`covers_gaussian_weights` first and fall back to ``math.exp``.
"""
from __future__ import annotations

import math

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from pipeline.fusion.primitives import NJIT_OPTIONS

# numba's cache cannot see changes to other files compiled in here: see pipeline.fusion.wbf_kernel.
COMPILED_AGAINST = {"primitives.py": "5a867f87f2eb7faf"}

LOWEST_ARGUMENT = -708.0  # 2**k stays a normal double for k >= -1022: exp(-708) ~ 3.3e-308
INV_LN2 = 1.0 / math.log(2.0)
LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k * LN2_HI is exact for |k| < 2**20
LN2_LO = 1.90821492927058770002e-10
ROUND_SHIFT = 6755399441055744.0  # 1.5 * 2**52: (x + shift) - shift rounds x to the nearest integer
TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))


@intrinsic
def _bits_as_float(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits`` (LLVM's ``bitcast``: free, and vectorisable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c``, rounded once where the CPU has fused multiply-adds, else a multiply and an add (LLVM's
    ``llvm.fmuladd``: never the slow software ``fma`` on a CPU without them; vectorisable)."""
    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.DoubleType(), [ir.DoubleType()] * 3),
                                             "llvm.fmuladd.f64")
        return builder.call(fma, args)
    return types.float64(types.float64, types.float64, types.float64), codegen


@numba.njit(inline="always", **NJIT_OPTIONS)
def exp_vectorisable(x: float) -> float:
    """``exp(x)`` for ``LOWEST_ARGUMENT <= x <= 0`` within 1 ulp: ``2**k * exp(r)``, ``|r| <= ln(2) / 2``."""
    k = _fma(x, INV_LN2, ROUND_SHIFT) - ROUND_SHIFT
    r = _fma(-k, LN2_LO, _fma(-k, LN2_HI, x))
    p = TAYLOR[13]
    for c in TAYLOR[12:0:-1]:  # Horner's rule: the fewest operations (the loop runs many elements, not one chain)
        p = _fma(p, r, c)
    expm1_r = r * p
    scale = _bits_as_float((numba.int64(k) + 1023) << 52)
    return _fma(scale, expm1_r, scale)  # exp(r) - 1 kept apart from the 1: the sum rounds once


@numba.njit(**NJIT_OPTIONS)
def covers_gaussian_weights(sigma: float) -> bool:
    """Whether every gaussian weight argument ``-(iou * iou) / sigma`` (IoU in [0, 1]) is in the valid range."""
    return sigma > 0.0 and -1.0 / sigma >= LOWEST_ARGUMENT
