"""pipeline.fusion.rows.read_image: an image's segments read, normalised, repaired and counted as the module
docstring says -- segments that need nothing (read in one branch-free loop) and segments that do (row by row) --
against a row-by-row Python reference."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.fusion.rows import N_STATS, STAT_CLIPPED, STAT_NON_FINITE, STAT_SWAPPED, STAT_ZERO_AREA, read_image


def _reference(rows, w, h, thr, factor, divisor):
    """The documented rules, one row at a time: ``(kept rows (x1, y1, x2, y2, score, set, label), stats)``."""
    kept, stats = [], np.zeros(N_STATS, np.int64)
    for x1, y1, x2, y2, sc, t, lab in rows:
        x1, y1, x2, y2 = x1 / w, y1 / h, x2 / w, y2 / h
        if not np.isfinite([x1, y1, x2, y2, sc]).all():
            stats[STAT_NON_FINITE] += 1
            continue
        if sc < thr[t]:
            continue
        if x2 < x1:
            x1, x2 = x2, x1
            stats[STAT_SWAPPED] += 1
        if y2 < y1:
            y1, y2 = y2, y1
            stats[STAT_SWAPPED] += 1
        clipped = [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]
        stats[STAT_CLIPPED] += sum(c != v for c, v in zip(clipped, (x1, y1, x2, y2)))
        x1, y1, x2, y2 = clipped
        if (x2 - x1) * (y2 - y1) == 0.0:
            stats[STAT_ZERO_AREA] += 1
            continue
        kept.append((x1, y1, x2, y2, (sc * factor[t]) / divisor, t, lab))
    return kept, stats


def _segment(rng: np.random.Generator, n: int, w: float, h: float, flaw: str) -> np.ndarray:
    """``n`` rows in pixels (x1, y1, x2, y2, score): clean boxes inside the image, then one ``flaw``."""
    xy = rng.uniform(0.0, 0.7, (n, 2)) * (w, h)
    wh = rng.uniform(0.01, 0.3, (n, 2)) * (w, h)
    rows = np.c_[xy, xy + wh, rng.uniform(0.0, 1.0, n)]
    k = int(rng.integers(0, n))
    if flaw == "swapped":
        rows[k, [0, 2]] = rows[k, [2, 0]]
    elif flaw == "outside":
        rows[k, 2] = 1.5 * w
    elif flaw == "negative":
        rows[k, 1] = -3.0
    elif flaw == "zero area":
        rows[k, 3] = rows[k, 1]
    elif flaw == "nan":
        rows[k, int(rng.integers(0, 5))] = np.nan
    elif flaw == "inf score":
        rows[k, 4] = np.inf
    elif flaw == "low score":
        rows[k, 4] = -0.5
    elif flaw == "edges":  # exactly on the image's border, -0.0 included: nothing to repair
        rows[k, :4] = (-0.0, 0.0, w, h)
    return rows


@pytest.mark.parametrize("divisor", [1.0, 3.0])
def test_read_image_equals_the_row_by_row_rules_on_clean_and_flawed_segments(divisor) -> None:
    rng = np.random.default_rng(21)
    flaws = ["none", "swapped", "outside", "negative", "zero area", "nan", "inf score", "low score", "edges"]
    for trial in range(60):
        w, h = float(rng.choice([1.0, 640.0, 1023.0])), float(rng.choice([1.0, 480.0]))
        n_sets = 4
        thr = np.where(rng.random(n_sets) < 0.3, 0.2, -np.inf) if trial % 2 else np.zeros(n_sets)
        factor = rng.uniform(0.5, 2.0, n_sets)
        parts, seg_set = [], []
        for t in range(n_sets):
            for _ in range(int(rng.integers(1, 3))):
                parts.append(_segment(rng, int(rng.integers(1, 30)), w, h, str(rng.choice(flaws))))
                seg_set.append(t)
        seg_len = np.array([len(p) for p in parts], np.int64)
        seg_start = np.r_[0, np.cumsum(seg_len)[:-1]].astype(np.int64)
        table = np.concatenate(parts)
        label = rng.integers(0, 3, len(table)).astype(np.int64)
        n = len(table)
        kept, kept_score = np.full((n, 4), np.nan), np.full(n, np.nan)
        kept_set, kept_label, stats = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(N_STATS, np.int64)
        m = read_image(0, np.array([0, len(parts)], np.int64), seg_start, seg_len, np.array(seg_set, np.int64),
                       *(np.ascontiguousarray(table[:, c]) for c in range(5)), label, np.array([w]), np.array([h]),
                       thr, factor, divisor, kept, kept_score, kept_set, kept_label, stats)
        rows = [(*table[i], t, label[i]) for s, t in enumerate(seg_set)
                for i in range(seg_start[s], seg_start[s] + seg_len[s])]
        expected, expected_stats = _reference([(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows], w, h, thr,
                                              factor, divisor)
        assert m == len(expected), trial
        got = [(*kept[i], kept_score[i], kept_set[i], kept_label[i]) for i in range(m)]
        for g, e in zip(got, expected):  # bit for bit, -0.0 and 0.0 told apart
            assert [np.float64(v).tobytes() for v in g[:5]] == [np.float64(v).tobytes() for v in e[:5]], trial
            assert g[5:] == e[5:], trial
        np.testing.assert_array_equal(stats, expected_stats, err_msg=str(trial))
