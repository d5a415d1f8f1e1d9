"""Reading one image's boxes out of a packed table, as every fusion rule of the reference library starts.

:func:`read_image` walks image ``k``'s segments (:class:`~pipeline.fusion.packing.PackedTable`), divides the
coordinates by the image's width and height, and applies the input handling the library's rules share:

* a box whose raw score is ``< skip_thr[set]`` is dropped (WBF and NMW; NMS passes ``-inf``);
* ``x2 < x1`` / ``y2 < y1`` are swapped and every coordinate is clipped to ``[0, 1]`` (the NMS module clips first
  and then sorts each pair; both orders give the same box);
* a box whose clipped area ``(x2 - x1) * (y2 - y1)`` is 0 is dropped;
* the kept box's score becomes ``(score * factor[set]) / divisor``: WBF ``score * weight`` (divisor 1), NMW
  ``score * (weight / max weight)``, NMS ``score * weight / sum of weights`` or the raw score (factor and
  divisor 1) -- dividing by 1.0 is exact, so one formula reproduces each library expression bit for bit.

Rows with a non-finite coordinate or score are counted in ``stats[3]`` and skipped (the callers raise).
"""
from __future__ import annotations

import numba
import numpy as np

from pipeline.fusion.primitives import NJIT_NO_REFCOUNT, NJIT_OPTIONS

# Digests of the package files compiled into this module's cached functions; see wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {"primitives.py": "5a867f87f2eb7faf"}

STAT_SWAPPED, STAT_CLIPPED, STAT_ZERO_AREA, STAT_NON_FINITE = 0, 1, 2, 3
N_STATS = 4


@numba.njit(inline="always", **NJIT_OPTIONS)
def _clip_unit(v: float) -> tuple[float, int]:
    """``v`` clipped to [0, 1], and 1 if that changed it."""
    if v < 0.0:
        return 0.0, 1
    if v > 1.0:
        return 1.0, 1
    return v, 0


@numba.njit(**NJIT_NO_REFCOUNT)
def read_image(img: int, seg_offs: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray, seg_set: np.ndarray,
               x1c: np.ndarray, y1c: np.ndarray, x2c: np.ndarray, y2c: np.ndarray, score: np.ndarray,
               label: np.ndarray, width: np.ndarray, height: np.ndarray, skip_thr: np.ndarray,
               factor: np.ndarray, divisor: float, kept: np.ndarray, kept_score: np.ndarray, kept_set: np.ndarray,
               kept_label: np.ndarray, stats: np.ndarray) -> int:
    """Image ``img``'s kept boxes into ``kept`` (m, 4), ``kept_score``, ``kept_set``, ``kept_label`` in packed
    order (set, then table order); returns ``m``. ``stats`` (int64[N_STATS]) accumulates the repairs."""
    w = width[img]
    h = height[img]
    unit = w == 1.0 and h == 1.0  # the drop-ins' images: x / 1.0 == x, skip the divisions
    plain = divisor == 1.0
    m = 0
    for s in range(seg_offs[img], seg_offs[img + 1]):
        t = seg_set[s]
        thr = skip_thr[t]
        f = factor[t]
        if thr <= 0.0 and _read_plain_segment(seg_start[s], seg_len[s], m, t, x1c, y1c, x2c, y2c, score, label, w,
                                              h, thr, f, divisor, kept, kept_score, kept_set, kept_label):
            m += seg_len[s]
            continue
        for i in range(seg_start[s], seg_start[s] + seg_len[s]):
            sc = score[i]
            if unit:
                x1 = x1c[i]
                y1 = y1c[i]
                x2 = x2c[i]
                y2 = y2c[i]
            else:
                x1 = x1c[i] / w
                y1 = y1c[i] / h
                x2 = x2c[i] / w
                y2 = y2c[i] / h
            if not (np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)
                    and np.isfinite(sc)):
                stats[STAT_NON_FINITE] += 1
                continue
            if sc < thr:
                continue
            if x2 < x1:
                x1, x2 = x2, x1
                stats[STAT_SWAPPED] += 1
            if y2 < y1:
                y1, y2 = y2, y1
                stats[STAT_SWAPPED] += 1
            x1, clip_x1 = _clip_unit(x1)
            y1, clip_y1 = _clip_unit(y1)
            x2, clip_x2 = _clip_unit(x2)
            y2, clip_y2 = _clip_unit(y2)
            n_clipped = clip_x1 + clip_y1 + clip_x2 + clip_y2
            if n_clipped:
                stats[STAT_CLIPPED] += n_clipped
            if (x2 - x1) * (y2 - y1) == 0.0:
                stats[STAT_ZERO_AREA] += 1
                continue
            kept[m, 0] = x1
            kept[m, 1] = y1
            kept[m, 2] = x2
            kept[m, 3] = y2
            kept_score[m] = sc * f if plain else (sc * f) / divisor
            kept_set[m] = t
            kept_label[m] = label[i]
            m += 1
    return m


@numba.njit(inline="always", **NJIT_OPTIONS)
def _read_plain_segment(start: int, n: int, m: int, t: int, x1c: np.ndarray, y1c: np.ndarray, x2c: np.ndarray,
                        y2c: np.ndarray, score: np.ndarray, label: np.ndarray, w: float, h: float, thr: float,
                        f: float, divisor: float, kept: np.ndarray, kept_score: np.ndarray, kept_set: np.ndarray,
                        kept_label: np.ndarray) -> bool:
    """Rows ``start .. start + n - 1`` (one segment, set ``t``) into ``kept[m:]`` etc. as :func:`read_image` writes
    them, in one branch-free loop (it vectorises: the divisions by the image size eight at a time), and whether
    they needed nothing else: every value finite, each box ordered and inside [0, 1] with a positive area, every
    score at least ``thr``. When not, the caller reads the segment again row by row, repairing and counting (it
    tries this loop only when ``thr <= 0``: a skip threshold above 0 fails most segments, and reading them twice
    cost WBF 5-12 %)."""
    plain = True
    for r in range(n):
        i = start + r
        x1 = x1c[i] / w
        y1 = y1c[i] / h
        x2 = x2c[i] / w
        y2 = y2c[i] / h
        sc = score[i]
        kept[m + r, 0] = x1
        kept[m + r, 1] = y1
        kept[m + r, 2] = x2
        kept[m + r, 3] = y2
        kept_score[m + r] = (sc * f) / divisor  # x / 1.0 == x: the plain product when the divisor is 1
        kept_set[m + r] = t
        kept_label[m + r] = label[i]
        plain &= ((x1 >= 0.0) & (x1 <= x2) & (x2 <= 1.0) & (y1 >= 0.0) & (y1 <= y2) & (y2 <= 1.0)
                  & ((x2 - x1) * (y2 - y1) != 0.0) & (sc >= thr) & (abs(sc) < np.inf))  # NaN fails every test
    return plain
