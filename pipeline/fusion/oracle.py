"""The ``ensemble_boxes`` backend: the reference library itself, image by image, on packed tables.

This is the compatibility path (``fuse_predictions(..., backend="ensemble_boxes")``, config
``ensemble.wbf_backend: ensemble_boxes``) and the oracle the compiled backend is tested against. It is kept out of
the hot path: :mod:`pipeline.fusion.table` imports this module, and with it the library, only when the backend is
asked for. Library warnings and prints (clipping, zero areas) are silenced: the compiled backend reports them in
summary.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from ensemble_boxes import nms as library_nms
from ensemble_boxes import non_maximum_weighted as library_nmw
from ensemble_boxes import soft_nms as library_soft_nms
from ensemble_boxes import weighted_boxes_fusion as library_wbf

from pipeline.fusion.packing import FusedRows, PackedTable
from pipeline.fusion.suppression import DECAYS

__all__ = ["fuse_with_ensemble_boxes"]

Call = Callable[[list, list, list, list | None], tuple]


def _library_call(method: str, params: Mapping[str, Any]) -> Call:
    """``f(boxes_list, scores_list, labels_list, weights)`` calling the library's function for ``method``."""
    p = dict(params)
    if method == "wbf":
        return lambda b, s, lab, w: library_wbf(b, s, lab, weights=w, **p)
    if method == "nms":
        return lambda b, s, lab, w: library_nms(b, s, lab, weights=w, **p)
    if method == "soft_nms":
        code = DECAYS[p.pop("decay")]
        return lambda b, s, lab, w: library_soft_nms(b, s, lab, method=code, weights=w, **p)
    if method == "nmw":
        return lambda b, s, lab, w: library_nmw(b, s, lab, weights=w, **p)
    raise ValueError(f"no library function for method {method!r}")


def _has_positive_area(boxes: np.ndarray) -> bool:
    """Whether a box keeps a positive area after clipping (the library's NMS raises when none does)."""
    b = np.clip(boxes, 0.0, 1.0)
    return bool((np.abs(b[:, 2] - b[:, 0]) * np.abs(b[:, 3] - b[:, 1]) > 0).any())


def fuse_with_ensemble_boxes(packed: PackedTable, method: str, params: Mapping[str, Any],
                             weighted: bool) -> FusedRows:
    """The library's function for ``method`` on every image of ``packed`` that has rows, with one entry of
    ``boxes_list`` per set (empty ones too: they count in the rescaling). ``weighted``: pass the set weights
    (else ``weights=None``, which only NMS and soft-NMS treat differently from ones)."""
    call = _library_call(method, params)
    n_sets = len(packed.weights)
    weights = packed.weights.tolist() if weighted or method in ("wbf", "nmw") else None
    out = []
    for k in range(len(packed.image_ids)):
        rows = packed.image_rows(k)
        if len(rows) == 0:
            continue
        boxes = packed.normalised_boxes(k)
        if method in ("nms", "soft_nms") and not _has_positive_area(boxes):
            continue  # the library's nms_method raises on an image without a box of positive area
        cuts = np.searchsorted(packed.image_sets(k), np.arange(n_sets + 1))  # rows are sorted by set
        bl = [boxes[cuts[t]:cuts[t + 1]] for t in range(n_sets)]
        sl = [packed.score[rows[cuts[t]:cuts[t + 1]]] for t in range(n_sets)]
        ll = [packed.label[rows[cuts[t]:cuts[t + 1]]] for t in range(n_sets)]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            b, sc, lb = call(bl, sl, ll, weights)
        out.append((k, b, sc, lb))
    if not out:
        return FusedRows(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    return FusedRows(
        image=np.concatenate([np.full(len(o[2]), o[0], np.int64) for o in out]),
        boxes=np.concatenate([np.asarray(o[1], np.float64).reshape(-1, 4) for o in out]),
        score=np.concatenate([np.asarray(o[2], np.float64) for o in out]),
        label=np.concatenate([np.asarray(o[3]) for o in out]).astype(np.int64),
    )
