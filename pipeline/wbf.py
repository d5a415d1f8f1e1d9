"""Weighted box fusion: a compiled, output-identical replacement for ``ensemble_boxes.weighted_boxes_fusion``.

Two entry points:

* :func:`weighted_boxes_fusion` -- drop-in for ``ensemble_boxes.weighted_boxes_fusion`` (ensemble-boxes 1.0.9):
  same arguments, normalised ``[0, 1]`` coordinates, returns ``(boxes, scores, labels)`` as float64 arrays with
  the same boxes, scores, labels, count and order as the library (see "Ties" for the one place the library's
  own output is not defined).
* :func:`fuse_predictions` -- fuses a whole prediction table (original-image pixels, see
  :mod:`pipeline.predictions`) in one compiled call per thread instead of one library call per image.

What the library does, and what is replicated here (ensemble-boxes 1.0.9, ``ensemble_boxes_wbf.py``):

1. Prefilter, per set ``t`` (one entry of ``boxes_list``) and box ``j`` in input order: a box whose *raw* score
   is ``< skip_box_thr`` is dropped (compared under numpy's promotion rules: float32 score arrays against a Python
   float threshold compare in float32); ``label = int(label)`` (truncation); ``x2 < x1`` / ``y2 < y1`` are swapped,
   then every coordinate is clipped to ``[0, 1]``; a box whose clipped area ``(x2-x1)*(y2-y1) == 0`` is dropped
   (the library warns once per box; here one ``UserWarning`` per call summarises the counts). A kept box carries
   the weighted score ``score * weights[t]``, the weight ``weights[t]`` and the set index ``t``.
2. Boxes are grouped by label; the groups are processed (and later concatenated) in the order in which each label
   first appears among the *kept* boxes. Inside a group boxes are sorted by weighted score, descending.
3. Clustering, per label, in that order: a box joins the existing cluster whose current *fused* box has the
   highest IoU with it (lowest cluster index on equal IoU) if that IoU is ``> iou_thr`` (strictly), else it starts
   a new cluster. The fused box of a cluster with one member is that member's box (float64). Once a second member
   joins, the library recomputes the fused box with ``get_weighted_box`` into a **float32** array: coordinates
   ``sum(ws_i * c_i)`` accumulated in float32 (each step ``float32(float64(acc) + ws_i * c_i)``), divided in
   float64 by the float64 sum of weighted scores and rounded to float32; score ``float32(sum(ws)/n)`` (or
   ``float32(max(ws))`` for ``conf_type='max'``); weight ``float32(sum(w))``. Later boxes are matched against these
   float32-rounded fused boxes, so the rounding is replicated bit for bit (the float32 partial sums are kept as
   state, which gives the same bits as the library's recomputation from scratch).
   A cluster whose members all have weighted score 0 gets NaN coordinates (0/0) in the library, and numpy's
   ``argmax`` then picks that NaN cluster for every later box of the label; this is replicated too.
4. Rescaling of each cluster's score ``s`` (``n`` members, ``W = weights.sum()``, ``S = len(weights)``, ``w`` the
   cluster's weight sum as stored in step 3):
   ``'avg'``: ``s * min(S, n) / W`` (``s * n / W`` if ``allows_overflow``); ``'max'``: ``s / weights.max()``;
   ``'box_and_model_avg'``: ``s * n / w``, then ``* sum(weights of the distinct sets in the cluster) / W``;
   ``'absent_model_aware_avg'``: ``s * n / (w + sum(weights of the sets absent from the cluster))``.
   ``allows_overflow`` only affects ``'avg'``. The partial weight sums use numpy's pairwise summation order, so
   they are bit-identical to the library's ``ndarray.sum()``.
5. All clusters of all labels are concatenated (label order of step 2, cluster creation order) and sorted by the
   rescaled score, descending. Boxes come back float64 (float32-rounded values for fused clusters), labels as
   float64.

Ties. The library sorts with ``ndarray.argsort()[::-1]`` (numpy's default, unstable sort), so the order of equal
scores is not defined and differs between numpy versions and CPUs. Here both sorts (step 2 and step 5) use one
documented rule: **reverse of a stable ascending sort** -- among equal scores the element that comes *later*
(step 2: later set, then later box within the set; step 5: later label group, then later-created cluster) comes
first. This is what numpy produces for arrays of at most 16 elements (insertion sort), so small inputs agree
exactly even with ties; on larger inputs with tied weighted scores the output may differ from the library's in
the order of the tied boxes and, through the clustering order, in the clusters. Inputs without tied weighted
scores give identical clusters. Because fused scores are rounded to float32, two *output* rows can still tie
(rare); their relative order is then the rule above, where the library's is undefined -- compare such rows as a set.

Deviations: non-finite coordinates/scores and a NaN ``iou_thr`` raise ``ValueError`` (the
library silently produces garbage); an unknown ``conf_type`` or mismatched list lengths raise ``ValueError``
(the library calls ``exit()``); a wrong number of weights warns (the library prints) and uses ones like the
library. Weights are converted to float64 (a float32 ``weights`` array makes the library compute weighted scores
in float32: differences ~1e-8). Labels above 2**24 are returned exactly (the library rounds fused labels through
float32). Weights are expected to be positive.

Speed. The matching search is the cost: each box would be compared with every open cluster of its label. An exact
spatial index prunes it: clusters are kept in a uniform grid over their fused-box centres (moved when a join moves
the fused box), and a box only examines clusters whose centre lies within ``k * width`` (x) and ``k * height``
(y) of its own centre, with ``k = 1 - t`` for ``t >= 0.5`` and ``k = (1 - t) / (2 t)`` below. Proof sketch: IoU > t
implies ``inter > t * area_B`` and ``inter_h <= h_B``, so the x-overlap ``ov > t * w_B``, likewise ``ov > t * w_A``;
with ``ov <= (w_A + w_B)/2 - |dx|`` this gives ``|dx| < (w_A + w_B)/2 - t * max(w_A, w_B)``, whose maximum over the
admissible ``w_A`` (``t w_B < w_A < w_B / t``) is ``k * w_B``. ``t`` is lowered by a relative 1e-9 and the radius
widened by 1e-9 relative + 1e-12 absolute, far beyond the rounding of the float IoU (~1e-15 relative), so no
cluster whose computed IoU could exceed ``iou_thr`` is ever skipped. For ``iou_thr < 0.1`` (bound too loose) and
whenever the grid query would visit more cells than there are clusters, every cluster is scanned as the library
does. The rest avoids per-call overhead: both sorts are an allocation-free stable LSD radix sort on the float bits,
the kernel's scratch is cached per thread (no allocation or page faults on repeated calls), and
:func:`fuse_predictions` groups, normalises and fuses the whole table in compiled code, splitting the images over
threads (the kernel releases the GIL).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import pandas as pd

from pipeline.predictions import PREDICTION_COLUMNS, empty_predictions, normalise_predictions

__all__ = ["CONF_TYPES", "weighted_boxes_fusion", "fuse_predictions"]

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
BACKENDS = ("numba", "ensemble_boxes")

_GRID_MIN_THR = 0.1  # below this IoU threshold the centre bound is too loose: scan all clusters
_GRID_MAX = 128  # cells per axis at most
_GRID_MIN_BOXES = 24  # label groups smaller than this are scanned directly

_NJIT = dict(cache=True, nogil=True, error_model="numpy")


# ----------------------------------------------------------------------------------------------------------------
# compiled kernel
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**_NJIT)
def _pairwise_block(a, lo, n):
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


@numba.njit(**_NJIT)
def _pairwise_sum(a, lo, n):
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


@numba.njit(inline="always", **_NJIT)
def _iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    # same operations in the same order as ensemble_boxes' bb_iou_array (A = cluster, B = new box)
    xa = max(ax1, bx1)
    ya = max(ay1, by1)
    xb = min(ax2, bx2)
    yb = min(ay2, by2)
    inter = max(xb - xa, 0.0) * max(yb - ya, 0.0)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    return inter / (area_a + area_b - inter)


@numba.njit(inline="always", **_NJIT)
def _cell_index(v, g):
    if v <= 0.0:
        return 0
    if v >= 1.0:
        return g - 1
    k = int(v * g)
    if k >= g:
        return g - 1
    return k


_SIGN = -9223372036854775808  # int64 with only the sign bit set


@numba.njit(**_NJIT)
def _float_keys(a, n, out):
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


@numba.njit(**_NJIT)
def _int_keys(a, n, out):
    """``out[:n]``: int64 whose unsigned bit order is the signed order of the int64 ``a[:n]``."""
    for i in range(n):
        out[i] = a[i] ^ np.int64(_SIGN)


@numba.njit(**_NJIT)
def _radix_argsort(keys, n, idx, ka, kb, ib, hist):
    """Stable ascending argsort of ``keys[:n]`` (unsigned bit order, see ``_float_keys``) into ``idx[:n]``.

    LSD radix sort, 8-bit digits, passes whose digit is constant are skipped; ``ka, kb, ib`` are scratch of
    length >= n and ``hist`` of length 2048. Stable, so equal keys keep their index order. No allocation.
    """
    for j in range(2048):
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


@numba.njit(**_NJIT)
def _fuse_range(offs, img_lo, img_hi, boxes, bscore, blabel, bset, weights, wsum, wmax,
                iou_thr, skip_thr, conf_code, allows_overflow,
                obox, oscore, olabel, ocount, stats, box8, acc, fw, iw):
    """Fuse images ``img_lo..img_hi-1``; image ``i``'s boxes are rows ``offs[i]:offs[i+1]`` in (set, input) order.

    ``boxes``: (n, 4) float64 ``x1, y1, x2, y2`` normalised; ``bset``: set index per row. Outputs of image ``i`` go
    to rows ``offs[i] : offs[i] + ocount[i]``. ``stats`` (int64[3]) accumulates the number of swapped pairs,
    clipped coordinates and zero-area boxes. ``box8, acc, fw, iw``: scratch sized by :func:`_scratch_sizes` for the
    largest image of the range (owned by the caller so that repeated calls do not allocate).
    """
    n_sets = weights.shape[0]
    cap = acc.shape[0]
    # ---- scratch views ---------------------------------------------------------------------------------------
    kbox = box8[:cap]  # kept boxes
    fbox = box8[cap:2 * cap]  # fused box per cluster
    kws = fw[0:cap]
    cconf = fw[cap:2 * cap]
    cw = fw[2 * cap:3 * cap]
    cmax = fw[3 * cap:4 * cap]
    cs1 = fw[4 * cap:5 * cap]
    cw2 = fw[5 * cap:6 * cap]
    fs = fw[6 * cap:7 * cap]
    wbuf = fw[7 * cap:7 * cap + n_sets]
    kset = iw[0:cap]
    klab = iw[cap:2 * cap]
    krank = iw[2 * cap:3 * cap]
    seq = iw[3 * cap:4 * cap]
    gfirst = iw[4 * cap:5 * cap]
    gid = iw[5 * cap:6 * cap]
    cnt = iw[6 * cap:7 * cap]
    clab = iw[7 * cap:8 * cap]
    mhead = iw[8 * cap:9 * cap]
    mtail = iw[9 * cap:10 * cap]
    mnext = iw[10 * cap:11 * cap]
    ccell = iw[11 * cap:12 * cap]
    cnxt = iw[12 * cap:13 * cap]
    cprv = iw[13 * cap:14 * cap]
    ord_s = iw[14 * cap:15 * cap]
    ord_l = iw[15 * cap:16 * cap]
    skey = iw[16 * cap:17 * cap]
    ska = iw[17 * cap:18 * cap]
    skb = iw[18 * cap:19 * cap]
    sib = iw[19 * cap:20 * cap]
    p0 = 20 * cap
    hist = iw[p0:p0 + 2048]
    p0 += 2048
    bstart = iw[p0:p0 + cap + 1]
    p0 += cap + 1
    head = iw[p0:p0 + _GRID_MAX * _GRID_MAX]
    p0 += _GRID_MAX * _GRID_MAX
    mark = iw[p0:p0 + n_sets]
    uniq = iw[p0 + n_sets:p0 + 2 * n_sets]
    for t in range(n_sets):
        mark[t] = 0
    stamp = 0

    # exact pruning radius factor (see module docstring)
    t_b = min(iou_thr * (1.0 - 1e-9) - 1e-12, 0.999)
    use_grid_thr = iou_thr >= _GRID_MIN_THR
    if t_b >= 0.5:
        kfac = 1.0 - t_b
    elif t_b > 0.0:
        kfac = (1.0 - t_b) / (2.0 * t_b)
    else:
        kfac = 1e300
    kfac *= 1.0 + 1e-9

    for img in range(img_lo, img_hi):
        s = offs[img]
        e = offs[img + 1]
        # ---- 1. prefilter --------------------------------------------------------------------------------------
        m = 0
        for i in range(s, e):
            sc = bscore[i]
            if sc < skip_thr[bset[i]]:
                continue
            x1 = boxes[i, 0]
            y1 = boxes[i, 1]
            x2 = boxes[i, 2]
            y2 = boxes[i, 3]
            if x2 < x1:
                x1, x2 = x2, x1
                stats[0] += 1
            if y2 < y1:
                y1, y2 = y2, y1
                stats[0] += 1
            if x1 < 0.0:
                x1 = 0.0
                stats[1] += 1
            if x1 > 1.0:
                x1 = 1.0
                stats[1] += 1
            if x2 < 0.0:
                x2 = 0.0
                stats[1] += 1
            if x2 > 1.0:
                x2 = 1.0
                stats[1] += 1
            if y1 < 0.0:
                y1 = 0.0
                stats[1] += 1
            if y1 > 1.0:
                y1 = 1.0
                stats[1] += 1
            if y2 < 0.0:
                y2 = 0.0
                stats[1] += 1
            if y2 > 1.0:
                y2 = 1.0
                stats[1] += 1
            if (x2 - x1) * (y2 - y1) == 0.0:
                stats[2] += 1
                continue
            t = bset[i]
            kbox[m, 0] = x1
            kbox[m, 1] = y1
            kbox[m, 2] = x2
            kbox[m, 3] = y2
            kws[m] = sc * weights[t]
            kset[m] = t
            klab[m] = blabel[i]
            m += 1
        if m == 0:
            ocount[img] = 0
            continue

        # ---- 2. label groups in first-appearance order, boxes by weighted score descending -------------------
        _float_keys(kws, m, skey)
        _radix_argsort(skey, m, ord_s, ska, skb, sib, hist)  # stable ascending; walked backwards = the tie rule
        same = True
        for i in range(1, m):
            if klab[i] != klab[0]:
                same = False
                break
        if same:
            n_groups = 1
            for i in range(m):
                seq[i] = ord_s[m - 1 - i]
            bstart[0] = 0
            bstart[1] = m
        else:
            _int_keys(klab, m, skey)
            _radix_argsort(skey, m, ord_l, ska, skb, sib, hist)
            n_groups = 0
            prev = 0
            for r in range(m):
                i = ord_l[r]
                if r == 0 or klab[i] != prev:
                    gfirst[n_groups] = i  # stable sort: first row of a label group is its first appearance
                    n_groups += 1
                    prev = klab[i]
                gid[i] = n_groups - 1
            # groups ordered by first appearance (distinct positions, any sort will do)
            _int_keys(gfirst, n_groups, skey)
            _radix_argsort(skey, n_groups, ord_l, ska, skb, sib, hist)
            for g in range(n_groups):
                krank[ord_l[g]] = g
            for g in range(n_groups + 1):
                bstart[g] = 0
            for i in range(m):
                bstart[krank[gid[i]] + 1] += 1
            for g in range(n_groups):
                bstart[g + 1] += bstart[g]
            for g in range(n_groups):  # gfirst reused as the per-group write cursor
                gfirst[g] = bstart[g]
            for r in range(m):
                i = ord_s[m - 1 - r]
                g = krank[gid[i]]
                seq[gfirst[g]] = i
                gfirst[g] += 1

        # ---- 3. clustering, label group by label group ---------------------------------------------------------
        nc = 0
        for g in range(n_groups):
            gs = bstart[g]
            ge = bstart[g + 1]
            cb = nc
            nan_c = -1
            ng = ge - gs
            use_grid = use_grid_thr and ng >= _GRID_MIN_BOXES
            G = 1
            if use_grid:
                msize = 0.0
                for r in range(gs, ge):
                    i = seq[r]
                    msize += (kbox[i, 2] - kbox[i, 0]) + (kbox[i, 3] - kbox[i, 1])
                msize = msize / (2.0 * ng)
                gcap = min(_GRID_MAX, int(2.0 * math.sqrt(ng)) + 1)
                target = 1.0 / (kfac * msize + 1e-12)
                if target < gcap:
                    G = max(int(target), 1)
                else:
                    G = gcap
                for k in range(G * G):
                    head[k] = -1
            for r in range(gs, ge):
                i = seq[r]
                x1 = kbox[i, 0]
                y1 = kbox[i, 1]
                x2 = kbox[i, 2]
                y2 = kbox[i, 3]
                ws = kws[i]
                best_c = -1
                if nan_c >= 0:
                    best_c = nan_c  # numpy's argmax returns the first NaN; NaN <= thr is False: always a match
                else:
                    best_iou = -np.inf
                    n_open = nc - cb
                    scan_all = True
                    if use_grid and n_open > 0:
                        rx = (x2 - x1) * kfac + 1e-12
                        ry = (y2 - y1) * kfac + 1e-12
                        cx = (x1 + x2) * 0.5
                        cy = (y1 + y2) * 0.5
                        gx0 = _cell_index(cx - rx, G)
                        gx1 = _cell_index(cx + rx, G)
                        gy0 = _cell_index(cy - ry, G)
                        gy1 = _cell_index(cy + ry, G)
                        if (gx1 - gx0 + 1) * (gy1 - gy0 + 1) < n_open:
                            scan_all = False
                            for gy in range(gy0, gy1 + 1):
                                for gx in range(gx0, gx1 + 1):
                                    c = head[gy * G + gx]
                                    while c != -1:
                                        v = _iou(fbox[c, 0], fbox[c, 1], fbox[c, 2], fbox[c, 3], x1, y1, x2, y2)
                                        if v > best_iou or (v == best_iou and c < best_c):
                                            best_iou = v
                                            best_c = c
                                        c = cnxt[c]
                    if scan_all:
                        for c in range(cb, nc):
                            v = _iou(fbox[c, 0], fbox[c, 1], fbox[c, 2], fbox[c, 3], x1, y1, x2, y2)
                            if v > best_iou:
                                best_iou = v
                                best_c = c
                    if best_c != -1 and not (best_iou > iou_thr):
                        best_c = -1
                if best_c == -1:
                    # new cluster: the library appends the box itself (float64, unrounded)
                    c = nc
                    nc += 1
                    fbox[c, 0] = x1
                    fbox[c, 1] = y1
                    fbox[c, 2] = x2
                    fbox[c, 3] = y2
                    acc[c, 0] = np.float32(ws * x1)
                    acc[c, 1] = np.float32(ws * y1)
                    acc[c, 2] = np.float32(ws * x2)
                    acc[c, 3] = np.float32(ws * y2)
                    cconf[c] = ws
                    cw[c] = weights[kset[i]]
                    cmax[c] = ws
                    cnt[c] = 1
                    cs1[c] = ws
                    cw2[c] = weights[kset[i]]
                    clab[c] = klab[i]
                    mhead[c] = i
                    mtail[c] = i
                    mnext[i] = -1
                    if use_grid:
                        k = _cell_index((y1 + y2) * 0.5, G) * G + _cell_index((x1 + x2) * 0.5, G)
                        ccell[c] = k
                        cprv[c] = -1
                        h = head[k]
                        cnxt[c] = h
                        if h != -1:
                            cprv[h] = c
                        head[k] = c
                else:
                    # join: get_weighted_box's float32 arithmetic, continued from the stored partial sums
                    c = best_c
                    a0 = np.float32(np.float64(acc[c, 0]) + ws * x1)
                    a1 = np.float32(np.float64(acc[c, 1]) + ws * y1)
                    a2 = np.float32(np.float64(acc[c, 2]) + ws * x2)
                    a3 = np.float32(np.float64(acc[c, 3]) + ws * y2)
                    acc[c, 0] = a0
                    acc[c, 1] = a1
                    acc[c, 2] = a2
                    acc[c, 3] = a3
                    conf = cconf[c] + ws
                    cconf[c] = conf
                    cw[c] = cw[c] + weights[kset[i]]
                    if ws > cmax[c]:
                        cmax[c] = ws
                    n_c = cnt[c] + 1
                    cnt[c] = n_c
                    f0 = np.float64(np.float32(np.float64(a0) / conf))
                    f1 = np.float64(np.float32(np.float64(a1) / conf))
                    f2 = np.float64(np.float32(np.float64(a2) / conf))
                    f3 = np.float64(np.float32(np.float64(a3) / conf))
                    fbox[c, 0] = f0
                    fbox[c, 1] = f1
                    fbox[c, 2] = f2
                    fbox[c, 3] = f3
                    if conf_code == 1:
                        cs1[c] = np.float64(np.float32(cmax[c]))
                    else:
                        cs1[c] = np.float64(np.float32(conf / n_c))
                    cw2[c] = np.float64(np.float32(cw[c]))
                    mnext[mtail[c]] = i
                    mnext[i] = -1
                    mtail[c] = i
                    is_nan = f0 != f0 or f1 != f1 or f2 != f2 or f3 != f3
                    if use_grid:
                        if is_nan:
                            newk = -1  # NaN clusters live outside the grid (found through nan_c)
                        else:
                            newk = _cell_index((f1 + f3) * 0.5, G) * G + _cell_index((f0 + f2) * 0.5, G)
                        if newk != ccell[c]:
                            if ccell[c] != -1:  # unlink
                                p = cprv[c]
                                q = cnxt[c]
                                if p != -1:
                                    cnxt[p] = q
                                else:
                                    head[ccell[c]] = q
                                if q != -1:
                                    cprv[q] = p
                            ccell[c] = newk
                            if newk != -1:
                                cprv[c] = -1
                                h = head[newk]
                                cnxt[c] = h
                                if h != -1:
                                    cprv[h] = c
                                head[newk] = c
                    if is_nan:
                        if nan_c == -1 or c < nan_c:
                            nan_c = c
                    elif c == nan_c:
                        nan_c = -1

            # ---- 4. rescale this label's clusters ----------------------------------------------------------
            for c in range(cb, nc):
                n_c = cnt[c]
                s1 = cs1[c]
                if conf_code == 2:  # box_and_model_avg
                    sc = s1 * n_c / cw2[c]
                    stamp += 1
                    nu = 0
                    j = mhead[c]
                    while j != -1:
                        t = kset[j]
                        if mark[t] != stamp:
                            mark[t] = stamp
                            p = nu  # insertion into the sorted list of distinct sets
                            while p > 0 and uniq[p - 1] > t:
                                uniq[p] = uniq[p - 1]
                                p -= 1
                            uniq[p] = t
                            nu += 1
                        j = mnext[j]
                    for p in range(nu):
                        wbuf[p] = weights[uniq[p]]
                    sc = sc * _pairwise_sum(wbuf, 0, nu) / wsum
                elif conf_code == 3:  # absent_model_aware_avg
                    stamp += 1
                    j = mhead[c]
                    while j != -1:
                        mark[kset[j]] = stamp
                        j = mnext[j]
                    na = 0
                    for t in range(n_sets):
                        if mark[t] != stamp:
                            wbuf[na] = weights[t]
                            na += 1
                    sc = s1 * n_c / (cw2[c] + _pairwise_sum(wbuf, 0, na))
                elif conf_code == 1:  # max
                    sc = s1 / wmax
                elif allows_overflow:
                    sc = s1 * n_c / wsum
                else:
                    sc = s1 * min(n_sets, n_c) / wsum
                fs[c] = sc

        # ---- 5. final sort over all labels, same tie rule --------------------------------------------------------
        _float_keys(fs, nc, skey)
        _radix_argsort(skey, nc, ord_s, ska, skb, sib, hist)
        o = s
        for r in range(nc):
            c = ord_s[nc - 1 - r]
            obox[o, 0] = fbox[c, 0]
            obox[o, 1] = fbox[c, 1]
            obox[o, 2] = fbox[c, 2]
            obox[o, 3] = fbox[c, 3]
            oscore[o] = fs[c]
            olabel[o] = clab[c]
            o += 1
        ocount[img] = nc


@numba.njit(**_NJIT)
def _group_order(img_codes, set_codes, n_img, n_sets):
    """Rows ordered by (image, set, row) with two stable counting sorts; returns (order, image offsets)."""
    n = img_codes.shape[0]
    cnt = np.zeros(max(n_sets, n_img) + 1, np.int64)
    tmp = np.empty(n, np.int64)
    for i in range(n):
        cnt[set_codes[i] + 1] += 1
    for k in range(n_sets):
        cnt[k + 1] += cnt[k]
    for i in range(n):
        k = set_codes[i]
        tmp[cnt[k]] = i
        cnt[k] += 1
    offs = np.zeros(n_img + 1, np.int64)
    for i in range(n):
        offs[img_codes[i] + 1] += 1
    for k in range(n_img):
        offs[k + 1] += offs[k]
    pos = offs[:n_img].copy()
    order = np.empty(n, np.int64)
    for r in range(n):
        i = tmp[r]
        k = img_codes[i]
        order[pos[k]] = i
        pos[k] += 1
    return order, offs


@numba.njit(**_NJIT)
def _gather(order, offs, x1, y1, x2, y2, score, label, set_codes, width, height):
    """Rows in ``order``, coordinates divided by their image's (width, height); also whether all are finite."""
    n = order.shape[0]
    bx = np.empty((n, 4))
    sc = np.empty(n)
    lb = np.empty(n, np.int64)
    st = np.empty(n, np.int64)
    finite = True
    for img in range(offs.shape[0] - 1):
        w = width[img]
        h = height[img]
        for r in range(offs[img], offs[img + 1]):
            i = order[r]
            bx[r, 0] = x1[i] / w
            bx[r, 1] = y1[i] / h
            bx[r, 2] = x2[i] / w
            bx[r, 3] = y2[i] / h
            sc[r] = score[i]
            lb[r] = label[i]
            st[r] = set_codes[i]
            if not (np.isfinite(bx[r, 0]) and np.isfinite(bx[r, 1]) and np.isfinite(bx[r, 2])
                    and np.isfinite(bx[r, 3]) and np.isfinite(sc[r])):
                finite = False
    return bx, sc, lb, st, finite


# ----------------------------------------------------------------------------------------------------------------
# Python drivers
# ----------------------------------------------------------------------------------------------------------------
_TLS = threading.local()


def _scratch(cap: int, n_sets: int, reuse: bool = True):
    """Kernel scratch for images of up to ``cap`` boxes: (box8, acc, fw, iw).

    Cached per thread and grown geometrically, so repeated single-image calls neither allocate nor page-fault.
    """
    cap = max(int(cap), 1)
    cached = getattr(_TLS, "scratch", None) if reuse else None
    if cached is not None and cached[0] >= cap and cached[1] >= n_sets:
        return cached[2]
    if reuse and cached is not None:
        cap = max(cap, int(cached[0] * 1.5))
        n_sets = max(n_sets, cached[1])
    bufs = (np.empty((2 * cap, 4)), np.empty((cap, 4), np.float32), np.empty(7 * cap + n_sets),
            np.empty(21 * cap + 1 + 2048 + _GRID_MAX * _GRID_MAX + 2 * n_sets, np.int64))
    if reuse:
        _TLS.scratch = (cap, n_sets, bufs)
    return bufs


def _n_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _conf_code(conf_type: str) -> int:
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}; must be one of {CONF_TYPES}")
    return CONF_TYPES.index(conf_type)


def _check_thr(iou_thr: float, skip_box_thr: float) -> tuple[float, float]:
    iou_thr = float(iou_thr)
    skip_box_thr = float(skip_box_thr)
    if math.isnan(iou_thr) or math.isnan(skip_box_thr):
        raise ValueError("iou_thr and skip_box_thr must not be NaN")
    return iou_thr, skip_box_thr


def _warn_stats(stats: np.ndarray) -> None:
    swapped, clipped, zero = (int(v) for v in stats)
    if swapped:
        warnings.warn(f"WBF: {swapped} box coordinate pair(s) with x2 < x1 or y2 < y1 were swapped.", stacklevel=3)
    if clipped:
        warnings.warn(f"WBF: {clipped} box coordinate(s) outside [0, 1] were clipped. Check that you normalise "
                      "boxes to the [0, 1] range.", stacklevel=3)
    if zero:
        warnings.warn(f"WBF: {zero} zero-area box(es) skipped.", stacklevel=3)


def _run_kernel(offs, boxes, score, label, set_idx, weights, iou_thr, skip_thr, conf_code, allows_overflow,
                threads: int = 1):
    """Run the kernel over all images; returns (boxes (n, 4), score, label, count per image).

    ``skip_thr``: a scalar or one threshold per set (see :func:`_effective_skip_thr`).

    Image ``i``'s output rows are ``offs[i] : offs[i] + count[i]``.
    """
    n_img = len(offs) - 1
    n = len(score)
    obox = np.empty((n, 4))
    osc = np.empty(n)
    olab = np.empty(n, np.int64)
    ocount = np.zeros(n_img, np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    n_sets = len(weights)
    wsum = float(weights.sum()) if n_sets else 0.0  # numpy's own sum: bit-identical to the library's
    wmax = float(weights.max()) if n_sets else 0.0
    skip_thr = np.broadcast_to(np.asarray(skip_thr, np.float64), (n_sets,)).copy()  # per-set thresholds
    args = (boxes, score, label, set_idx, weights, wsum, wmax, float(iou_thr), skip_thr,
            int(conf_code), bool(allows_overflow), obox, osc, olab, ocount)
    sizes = np.diff(offs)
    if threads <= 1 or n_img < 4 * threads:
        stats = np.zeros(3, np.int64)
        _fuse_range(offs, 0, n_img, *args, stats, *_scratch(sizes.max(initial=1), n_sets))
    else:
        # chunks of roughly equal box counts, several per thread for balance
        n_chunks = min(n_img, 8 * threads)
        cuts = np.searchsorted(offs, np.linspace(0, n, n_chunks + 1)[1:-1]).tolist()
        bounds = sorted(set([0] + [min(max(c, 1), n_img - 1) for c in cuts] + [n_img]))
        ranges = list(zip(bounds[:-1], bounds[1:]))
        all_stats = np.zeros((len(ranges), 3), np.int64)

        def work(k):
            lo, hi = ranges[k]
            scratch = _scratch(sizes[lo:hi].max(initial=1), n_sets, reuse=False)
            _fuse_range(offs, lo, hi, *args, all_stats[k], *scratch)

        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(work, range(len(ranges))))
        stats = all_stats.sum(axis=0)
    _warn_stats(stats)
    return obox, osc, olab, ocount


def _effective_skip_thr(score_dtype: np.dtype, thr) -> float:
    """The float64 threshold that reproduces the library's ``score < skip_box_thr`` for one set's scores.

    The library compares each element of ``scores_list[t]`` with the threshold under numpy's promotion rules: a
    float32 score array against a Python float compares in float32 (NEP 50: the Python float is "weak"), so the
    threshold is effectively ``float32(thr)``; a float64 array, a list of Python floats or a float64 threshold
    compare in float64.
    """
    if score_dtype.kind != "f" or score_dtype.itemsize >= 8:
        return float(thr)
    ct = np.result_type(score_dtype, thr)
    return float(ct.type(thr)) if ct.kind == "f" and ct.itemsize < 8 else float(thr)


def weighted_boxes_fusion(boxes_list, scores_list, labels_list, weights=None, iou_thr=0.55, skip_box_thr=0.0,
                          conf_type="avg", allows_overflow=False):
    """Drop-in for ``ensemble_boxes.weighted_boxes_fusion`` (1.0.9): same arguments, same outputs.

    ``boxes_list[t]`` is set ``t``'s ``(n_t, 4)`` boxes ``x1, y1, x2, y2`` in normalised ``[0, 1]`` coordinates,
    ``scores_list[t]`` / ``labels_list[t]`` its ``n_t`` scores and labels. Returns ``(boxes (m, 4), scores (m,),
    labels (m,))``, float64, sorted by score descending (ties: see the module docstring).
    """
    conf_code = _conf_code(conf_type)
    skip_thr_in = skip_box_thr
    iou_thr, skip_box_thr = _check_thr(iou_thr, skip_box_thr)
    n_sets = len(boxes_list)
    if weights is None:
        w = np.ones(n_sets)
    elif len(weights) != n_sets:
        warnings.warn(f"incorrect number of weights {len(weights)}. Must be: {n_sets}. Set weights equal to 1.",
                      stacklevel=2)
        w = np.ones(n_sets)
    else:
        w = np.asarray(weights, dtype=np.float64)
    if len(scores_list) != n_sets or len(labels_list) != n_sets:
        raise ValueError("boxes_list, scores_list and labels_list must have the same length")

    if isinstance(boxes_list, np.ndarray) and boxes_list.ndim == 3:
        b = boxes_list.reshape(-1, 4)
        lens = np.full(n_sets, boxes_list.shape[1], np.int64)
    else:
        parts = [np.asarray(bb, dtype=np.float64).reshape(-1, 4) for bb in boxes_list]
        lens = np.array([len(p) for p in parts], np.int64)
        b = np.concatenate(parts) if parts else np.zeros((0, 4))
    if isinstance(scores_list, np.ndarray) and scores_list.ndim == 2:
        sc = scores_list.reshape(-1)
        slen = np.full(n_sets, scores_list.shape[1] if n_sets else 0, np.int64)
        thr_set = np.full(n_sets, _effective_skip_thr(scores_list.dtype, skip_thr_in))
    else:
        sparts = [np.asarray(s).reshape(-1) for s in scores_list]
        thr_set = np.array([_effective_skip_thr(p.dtype, skip_thr_in) for p in sparts], np.float64)
        slen = np.array([len(p) for p in sparts], np.int64)
        sc = np.concatenate([p.astype(np.float64) for p in sparts]) if sparts else np.zeros(0)
    if isinstance(labels_list, np.ndarray) and labels_list.ndim == 2:
        lab = labels_list.reshape(-1)
        llen = np.full(n_sets, labels_list.shape[1] if n_sets else 0, np.int64)
    else:
        lparts = [np.asarray(v).reshape(-1) for v in labels_list]
        llen = np.array([len(p) for p in lparts], np.int64)
        lab = np.concatenate(lparts) if lparts else np.zeros(0, np.int64)
    if not (np.array_equal(lens, slen) and np.array_equal(lens, llen)):
        raise ValueError(f"per-set lengths differ: boxes {lens.tolist()}, scores {slen.tolist()}, "
                         f"labels {llen.tolist()}")
    n = int(lens.sum())
    if n == 0:
        return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,))
    b = np.ascontiguousarray(b, dtype=np.float64)
    sc = np.ascontiguousarray(sc, dtype=np.float64)
    if not (np.isfinite(b).all() and np.isfinite(sc).all()):
        raise ValueError("boxes and scores must be finite")
    lab = np.ascontiguousarray(lab.astype(np.int64))  # int() truncation, like the library
    set_idx = np.repeat(np.arange(n_sets, dtype=np.int64), lens)
    offs = np.array([0, n], np.int64)
    obox, osc, olab, ocount = _run_kernel(offs, b, sc, lab, set_idx, w, iou_thr, thr_set, conf_code,
                                          allows_overflow)
    m = int(ocount[0])
    boxes = obox[:m]
    return boxes, osc[:m], olab[:m].astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# whole prediction table
# ----------------------------------------------------------------------------------------------------------------
def _image_size_arrays(image_sizes, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(image_sizes, pd.DataFrame):
        missing_cols = {"image_id", "width", "height"} - set(image_sizes.columns)
        if missing_cols:
            raise ValueError(f"image_sizes table lacks columns {sorted(missing_cols)}")
        sizes = image_sizes.assign(image_id=image_sizes["image_id"].astype(str)).drop_duplicates("image_id")
        sizes = sizes.set_index("image_id")
        idx = sizes.index.get_indexer(image_ids)
        if (idx < 0).any():
            raise ValueError(f"image_sizes lacks {int((idx < 0).sum())} image(s), "
                             f"e.g. {image_ids[idx < 0][:3].tolist()}")
        w = sizes["width"].to_numpy(np.float64)[idx]
        h = sizes["height"].to_numpy(np.float64)[idx]
    else:
        w = np.empty(len(image_ids))
        h = np.empty(len(image_ids))
        missing = []
        for k, iid in enumerate(image_ids):
            try:
                ww, hh = image_sizes[iid]
            except KeyError:
                missing.append(iid)
                continue
            w[k] = ww
            h[k] = hh
        if missing:
            raise ValueError(f"image_sizes lacks {len(missing)} image(s), e.g. {missing[:3]}")
    if not ((w > 0).all() and (h > 0).all()):
        raise ValueError("image widths and heights must be positive")
    return w, h


def _set_codes(preds: pd.DataFrame, cols: list[str], sets) -> tuple[np.ndarray, list]:
    """Row -> set index, and the ordered list of set keys (scalars for one column, tuples for several)."""
    codes = np.zeros(len(preds), np.int64)
    uniques = []
    for c in cols:  # mixed-radix code over the per-column factorisations (sorted: lexicographic set order)
        cc, uu = pd.factorize(preds[c], sort=True)
        if (cc < 0).any():
            raise ValueError(f"group column {c!r} has missing values")
        codes = codes * max(len(uu), 1) + cc
        uniques.append(uu.tolist())
    codes, combos = pd.factorize(codes, sort=True)
    combos = np.asarray(combos, np.int64)
    found = []
    for combo in combos.tolist():
        parts = []
        for uu in reversed(uniques):
            combo, r = divmod(combo, len(uu))
            parts.append(uu[r])
        found.append(parts[0] if len(cols) == 1 else tuple(reversed(parts)))
    if sets is None:
        return codes.astype(np.int64), found
    keys = [k for k in sets] if len(cols) == 1 else [tuple(k) for k in sets]
    position = {}
    for i, k in enumerate(keys):
        if k in position:
            raise ValueError(f"sets contains {k!r} twice")
        position[k] = i
    bad = [k for k in found if k not in position]
    if bad:
        raise ValueError(f"the table has set keys that are not in `sets`: {bad[:3]}")
    remap = np.array([position[k] for k in found], np.int64)
    return remap[codes], keys


def _set_weights(keys: list, weights: Mapping | None, multi: bool) -> np.ndarray:
    if weights is None:
        return np.ones(len(keys))
    out = np.empty(len(keys))
    for k, key in enumerate(keys):
        if key in weights:
            out[k] = weights[key]
        elif multi and key[0] in weights:
            out[k] = weights[key[0]]
        else:
            raise KeyError(f"no weight for set {key!r}")
    return out


def fuse_predictions(preds: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | pd.DataFrame, *,
                     group_col: str | Sequence[str] = "model", weights: Mapping[Any, float] | None = None,
                     sets: Sequence[Any] | None = None, iou_thr: float = 0.55, skip_box_thr: float = 0.0,
                     conf_type: str = "avg", allows_overflow: bool = False, model_name: str = "wbf",
                     backend: str = "numba", threads: int | None = None) -> pd.DataFrame:
    """Weighted box fusion of a whole prediction table, image by image, in pixels in and pixels out.

    ``preds``: a prediction table (:mod:`pipeline.predictions`; coordinates in ORIGINAL-IMAGE PIXELS).
    ``image_sizes``: ``{image_id: (width, height)}`` or a table with columns ``image_id, width, height``; every
    image in ``preds`` must be there. Coordinates are divided by (width, height) here -- callers never
    normalise -- fused exactly as :func:`weighted_boxes_fusion` / the library would on the normalised boxes, and
    multiplied back.

    Sets. Each distinct value of ``group_col`` (a column name, or several, e.g. ``("model", "fold", "tta")``, whose
    values are then tuples) is one *set*: one entry of the library's ``boxes_list``, for every image. **Every image
    is fused with the full list of sets**, also sets that have no box on that image (the library is called with an
    empty entry for them), because the scores are rescaled by the sets' weights: ``'avg'`` by ``weights.sum()``
    and ``min(len(weights), n)``, ``'max'`` by ``weights.max()``, ``'box_and_model_avg'`` by ``weights.sum()``,
    ``'absent_model_aware_avg'`` by the weights of the absent sets. The list of sets is ``sets`` when given (its
    order is the order of ``boxes_list``; every key in the table must be in it), else all distinct values of
    ``group_col`` found in ``preds``, sorted. Pass ``sets`` explicitly whenever ``preds`` may lack a member
    entirely (e.g. a subset of images on which a model predicted nothing): a missing set silently raises the
    fused scores.

    ``weights``: ``{set key: weight}``; with several group columns a key may also be the first column's value
    (e.g. the model name) to give all of that model's folds/views one weight. Default: 1 for every set.
    Within an image, boxes of a set keep their row order in ``preds`` (which only matters for tied scores).

    Output: a prediction table with ``model=model_name``, ``fold=-1``, ``tta="wbf"``; images sorted by
    ``image_id``, within an image by score descending. Images without kept boxes have no rows.
    ``backend="ensemble_boxes"`` calls the library image by image (slow; same output). ``threads``: worker
    threads for the numba backend (default: the CPUs available to this process).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; must be one of {BACKENDS}")
    conf_code = _conf_code(conf_type)
    iou_thr, skip_box_thr = _check_thr(iou_thr, skip_box_thr)
    cols = [group_col] if isinstance(group_col, str) else list(group_col)
    missing = [c for c in ["image_id", "x1", "y1", "x2", "y2", "score", "label", *cols] if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    set_codes, keys = _set_codes(preds, cols, sets)
    w = _set_weights(keys, weights, multi=len(cols) > 1)
    if len(preds) == 0 or len(keys) == 0:
        return empty_predictions()

    img_codes, uniq_ids = pd.factorize(preds["image_id"], sort=True)
    if (img_codes < 0).any():
        raise ValueError("image_id has missing values")
    image_ids = pd.Index(uniq_ids).astype(str)
    width, height = _image_size_arrays(image_sizes, np.asarray(image_ids, dtype=object))
    n_sets = len(keys)
    n_img = len(image_ids)
    order, offs = _group_order(img_codes.astype(np.int64), set_codes, n_img, n_sets)
    cols_xyxys = [np.ascontiguousarray(preds[c].to_numpy(np.float64)) for c in ("x1", "y1", "x2", "y2", "score")]
    label_in = np.ascontiguousarray(preds["label"].to_numpy().astype(np.int64))
    bx, score, label, set_idx, finite = _gather(order, offs, *cols_xyxys, label_in, set_codes, width, height)
    if not finite:
        raise ValueError("boxes and scores must be finite")

    if backend == "numba":
        obox, osc, olab, ocount = _run_kernel(
            offs, bx, score, label, set_idx, w, iou_thr, skip_box_thr, conf_code, allows_overflow,
            threads=_n_threads() if threads is None else int(threads))
        total = int(ocount.sum())
        starts = np.cumsum(ocount) - ocount
        rows = np.repeat(offs[:-1] - starts, ocount) + np.arange(total)
        img_out = np.repeat(np.arange(len(image_ids)), ocount)
        obox = obox[rows]
        ox1, oy1, ox2, oy2 = obox[:, 0], obox[:, 1], obox[:, 2], obox[:, 3]
        osc = osc[rows]
        olab = olab[rows]
    else:
        from ensemble_boxes import weighted_boxes_fusion as eb_wbf

        out = []
        for k in range(len(image_ids)):
            s, e = offs[k], offs[k + 1]
            if s == e:
                continue
            sset = set_idx[s:e]
            cuts = np.searchsorted(sset, np.arange(n_sets + 1)) + s
            bl = [bx[cuts[t]:cuts[t + 1]] for t in range(n_sets)]
            sl = [score[cuts[t]:cuts[t + 1]] for t in range(n_sets)]
            ll = [label[cuts[t]:cuts[t + 1]] for t in range(n_sets)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b, sc, lb = eb_wbf(bl, sl, ll, weights=w.tolist(), iou_thr=iou_thr, skip_box_thr=skip_box_thr,
                                   conf_type=conf_type, allows_overflow=allows_overflow)
            out.append((k, b, sc, lb))
        if out:
            img_out = np.concatenate([np.full(len(o[2]), o[0], np.int64) for o in out])
            b = np.concatenate([np.asarray(o[1], np.float64).reshape(-1, 4) for o in out])
            ox1, oy1, ox2, oy2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
            osc = np.concatenate([np.asarray(o[2], np.float64) for o in out])
            olab = np.concatenate([np.asarray(o[3]) for o in out]).astype(np.int64)
        else:
            img_out = np.zeros(0, np.int64)
            ox1 = oy1 = ox2 = oy2 = osc = np.zeros(0)
            olab = np.zeros(0, np.int64)

    if len(img_out) == 0:
        return empty_predictions()
    ww = width[img_out]
    hh = height[img_out]
    df = pd.DataFrame({
        "image_id": image_ids.take(img_out),
        "x1": ox1 * ww,
        "y1": oy1 * hh,
        "x2": ox2 * ww,
        "y2": oy2 * hh,
        "score": osc,
        "label": olab,
        "model": pd.array([model_name], dtype="str").take(np.zeros(len(img_out), np.int64)),
        "fold": np.full(len(img_out), -1, np.int64),
        "tta": pd.array(["wbf"], dtype="str").take(np.zeros(len(img_out), np.int64)),
    }, columns=PREDICTION_COLUMNS)
    return normalise_predictions(df)
