"""Compiled building blocks shared by the fusion kernels: sorting, summation and overlap, each exact.

* :func:`radix_argsort` with :func:`float_sort_keys` / :func:`int_sort_keys`: a stable, allocation-free argsort.
  Fusion rules sort by score with a documented tie rule (reverse of a stable ascending sort), so the sort must be
  stable and must not allocate per image.
* :func:`pairwise_sum`: numpy's pairwise summation, bit-identical to ``ndarray.sum()`` (the reference library
  rescales scores by numpy sums of weights, and the last bit decides ties).
* :func:`iou`: the reference library's IoU, same operations in the same order (an IoU exactly at a threshold
  must round the same way).
* :func:`cell_index`: the uniform-grid cell of a coordinate in ``[0, 1]`` (spatial index of the cluster search).
"""
from __future__ import annotations

import numba
import numpy as np

# Every compiled function of the package: cached on disk (first import compiles once), callable without the GIL
# (the table driver runs images on threads), numpy's division semantics (0/0 is NaN, as in the library).
NJIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")
# Compiled functions that allocate no array: no reference counting (numba's ``_nrt`` flag). numba increfs every
# array argument of a compiled call on entry and decrefs it on every exit -- two atomic operations per array per
# call, which its pruning pass leaves in functions with loops and several exits: about a fifth of soft-NMS's time at
# 40 sets x 100 boxes (perf), whose selection loop calls its helpers once per step. The arrays stay alive in the
# caller that holds them. numba compiles a function's callees with its flags and refuses an allocation in any of
# them at compile time. Used by the suppression kernel and the helpers it shares; WBF's and NMW's inner functions,
# called once per label group, showed no gain and stay counted (pairwise_sum allocates).
NJIT_NO_REFCOUNT = dict(NJIT_OPTIONS, _nrt=False)

RADIX_HIST_SIZE = 2048  # 8 digits of 8 bits: one 256-bin histogram per digit
_SIGN = -9223372036854775808  # int64 with only the sign bit set


@numba.njit(**NJIT_OPTIONS)
def _pairwise_block(a: np.ndarray, lo: int, n: int) -> float:
    """numpy's pairwise summation of a block of at most 128 elements ``a[lo:lo+n]``."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(**NJIT_OPTIONS)
def pairwise_sum(a: np.ndarray, lo: int, n: int) -> float:
    """numpy's pairwise summation of ``a[lo:lo+n]`` (float64, contiguous): bit-identical to ``ndarray.sum()``.

    numpy splits ``n > 128`` into ``n2 = n // 2 - (n // 2) % 8`` and the rest and adds the two halves; the recursion
    is unrolled with an explicit stack here (numba's cache cannot reload self-recursive functions safely).
    """
    if n <= 128:
        return _pairwise_block(a, lo, n)
    st_lo = np.empty(192, np.int64)
    st_n = np.empty(192, np.int64)
    st_stage = np.empty(192, np.int64)
    vals = np.empty(96)
    sp = 0
    vp = 0
    st_lo[0] = lo
    st_n[0] = n
    st_stage[0] = 0
    sp = 1
    while sp > 0:
        sp -= 1
        l0 = st_lo[sp]
        n0 = st_n[sp]
        if n0 <= 128:
            vals[vp] = _pairwise_block(a, l0, n0)
            vp += 1
        elif st_stage[sp] == 1:
            right = vals[vp - 1]
            left = vals[vp - 2]
            vp -= 2
            vals[vp] = left + right
            vp += 1
        else:
            n2 = n0 // 2
            n2 -= n2 % 8
            st_stage[sp] = 1
            sp += 1
            st_lo[sp] = l0 + n2
            st_n[sp] = n0 - n2
            st_stage[sp] = 0
            sp += 1
            st_lo[sp] = l0
            st_n[sp] = n2
            st_stage[sp] = 0
            sp += 1
    return vals[0]


@numba.njit(inline="always", **NJIT_OPTIONS)
def iou(ax1: float, ay1: float, ax2: float, ay2: float, bx1: float, by1: float, bx2: float, by2: float) -> float:
    """IoU of boxes A and B, the same operations in the same order as ensemble_boxes' ``bb_iou_array`` (A = the
    cluster's fused box, B = the new box)."""
    xa = max(ax1, bx1)
    ya = max(ay1, by1)
    xb = min(ax2, bx2)
    yb = min(ay2, by2)
    inter = max(xb - xa, 0.0) * max(yb - ya, 0.0)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    return inter / (area_a + area_b - inter)


@numba.njit(inline="always", **NJIT_OPTIONS)
def overlap_union(ax1: float, ay1: float, ax2: float, ay2: float, bx1: float, by1: float, bx2: float, by2: float,
                  area_b: float) -> tuple[float, float]:
    """The intersection and the union whose quotient is :func:`iou`'s result (the same operations in the same
    order; ``area_b`` is ``(bx2 - bx1) * (by2 - by1)``), for a search that divides only when it must
    (:func:`may_exceed`)."""
    xa = max(ax1, bx1)
    ya = max(ay1, by1)
    xb = min(ax2, bx2)
    yb = min(ay2, by2)
    inter = max(xb - xa, 0.0) * max(yb - ya, 0.0)
    return inter, (ax2 - ax1) * (ay2 - ay1) + area_b - inter


@numba.njit(inline="always", **NJIT_OPTIONS)
def may_exceed(inter: float, union: float, thr_low: float) -> bool:
    """False only when ``inter / union`` (rounded) is certainly ``<= iou_thr``, given ``thr_low = iou_thr * (1 -
    1e-9)``: ``inter <= thr_low * union`` puts the exact quotient 1e-9 below the threshold, which the two roundings
    (~1e-16 each) cannot cross. A match search (best IoU, kept only if ``> iou_thr``) can pass such a candidate
    over without the division: it cannot be the answer, whatever the others score. NaN (0 / 0, NaN boxes) is never
    a best IoU: passed over as well."""
    return inter > thr_low * union


@numba.njit(inline="always", **NJIT_OPTIONS)
def cell_index(v: float, g: int) -> int:
    """Cell ``0..g-1`` of coordinate ``v`` on a ``g``-cell axis over ``[0, 1]`` (values outside go to the edges)."""
    if v <= 0.0:
        return 0
    if v >= 1.0:
        return g - 1
    k = int(v * g)
    if k >= g:
        return g - 1
    return k


@numba.njit(**NJIT_NO_REFCOUNT)
def float_sort_keys(a: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[:n]``: int64 whose *unsigned* bit order is the numeric order of the float64 ``a[:n]`` (-0.0 == 0.0)."""
    bits = a.view(np.int64)
    for i in range(n):
        if a[i] == 0.0:
            b = np.int64(_SIGN)
        else:
            b = bits[i]
            if b < 0:
                b = ~b
            else:
                b = b | np.int64(_SIGN)
        out[i] = b


@numba.njit(**NJIT_NO_REFCOUNT)
def int_sort_keys(a: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[:n]``: int64 whose unsigned bit order is the signed order of the int64 ``a[:n]``."""
    for i in range(n):
        out[i] = a[i] ^ np.int64(_SIGN)


@numba.njit(**NJIT_NO_REFCOUNT)
def radix_argsort(keys: np.ndarray, n: int, idx: np.ndarray, ka: np.ndarray, kb: np.ndarray, ib: np.ndarray,
                  hist: np.ndarray) -> None:
    """Stable ascending argsort of ``keys[:n]`` (unsigned bit order, see :func:`float_sort_keys`) into ``idx[:n]``.

    LSD radix sort, 8-bit digits, passes whose digit is constant are skipped; ``ka, kb, ib`` are scratch of
    length >= n and ``hist`` of length ``RADIX_HIST_SIZE``. Stable, so equal keys keep their index order. No
    allocation.
    """
    for j in range(RADIX_HIST_SIZE):
        hist[j] = 0
    for i in range(n):
        k = keys[i]
        ka[i] = k
        idx[i] = i
        for d in range(8):
            hist[d * 256 + ((k >> (8 * d)) & 255)] += 1
    src_k = ka
    dst_k = kb
    src_i = idx
    dst_i = ib
    flip = False
    for d in range(8):
        sh = 8 * d
        base = d * 256
        if n == 0 or hist[base + ((src_k[0] >> sh) & 255)] == n:
            continue
        tot = 0
        for q in range(256):
            c = hist[base + q]
            hist[base + q] = tot
            tot += c
        for i in range(n):
            k = src_k[i]
            q = base + ((k >> sh) & 255)
            p = hist[q]
            hist[q] = p + 1
            dst_k[p] = k
            dst_i[p] = src_i[i]
        src_k, dst_k = dst_k, src_k
        src_i, dst_i = dst_i, src_i
        flip = not flip
    if flip:
        for i in range(n):
            idx[i] = src_i[i]


SHORT_RUN = 32  # radix_argsort_top: longest run of equal top halves finished by insertion sort


@numba.njit(**NJIT_NO_REFCOUNT)
def radix_argsort_top(keys: np.ndarray, n: int, idx: np.ndarray, ka: np.ndarray, kb: np.ndarray, ib: np.ndarray,
                      hist: np.ndarray) -> None:
    """The same stable ascending argsort as :func:`radix_argsort`, in fewer passes when keys differ in their top
    32 bits (e.g. float scores that are not within ~1e-6 of each other): radix passes over the top 4 bytes only,
    then each run of equal top halves (at most ``SHORT_RUN`` long) is finished by a stable insertion sort on the
    full keys. A longer run falls back to :func:`radix_argsort`. Same arguments."""
    for j in range(RADIX_HIST_SIZE):
        hist[j] = 0
    for i in range(n):
        k = keys[i]
        ka[i] = k
        idx[i] = i
        for d in range(4, 8):
            hist[d * 256 + ((k >> (8 * d)) & 255)] += 1
    src_k = ka
    dst_k = kb
    src_i = idx
    dst_i = ib
    flip = False
    for d in range(4, 8):
        sh = 8 * d
        base = d * 256
        if n == 0 or hist[base + ((src_k[0] >> sh) & 255)] == n:
            continue
        tot = 0
        for q in range(256):
            c = hist[base + q]
            hist[base + q] = tot
            tot += c
        for i in range(n):
            k = src_k[i]
            q = base + ((k >> sh) & 255)
            p = hist[q]
            hist[q] = p + 1
            dst_k[p] = k
            dst_i[p] = src_i[i]
        src_k, dst_k = dst_k, src_k
        src_i, dst_i = dst_i, src_i
        flip = not flip
    if flip:
        for i in range(n):
            idx[i] = src_i[i]
            ka[i] = src_k[i]
    start = 0
    for i in range(1, n + 1):
        if i < n and (ka[i] >> 32) == (ka[start] >> 32):
            continue
        if i - start > SHORT_RUN:
            radix_argsort(keys, n, idx, ka, kb, ib, hist)
            return
        for a in range(start + 1, i):  # stable insertion sort of the run by the full (unsigned) key
            k = ka[a]
            v = idx[a]
            b = a - 1
            while b >= start and (ka[b] ^ _SIGN) > (k ^ _SIGN):
                ka[b + 1] = ka[b]
                idx[b + 1] = idx[b]
                b -= 1
            ka[b + 1] = k
            idx[b + 1] = v
        start = i
