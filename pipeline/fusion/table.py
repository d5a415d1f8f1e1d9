"""Fusion of a whole prediction table: pixels in, pixels out, one compiled call for all images.

:func:`fuse_predictions` describes the table as segments of its own columns
(:func:`pipeline.fusion.packing.pack_table`: no copy of the rows), hands it to the chosen rule's backend, and
maps the fused rows back to a prediction table. Rules: :data:`pipeline.fusion.rules.FUSION_METHODS`. Backends:

* ``"numba"`` -- the rule's compiled kernel, every image on all CPUs;
* ``"ensemble_boxes"`` -- :mod:`pipeline.fusion.oracle`, the reference library image by image (slow; the
  compatibility path and test oracle, imported only when asked for).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.cpus import available_cpus
from pipeline.fusion.packing import PackedTable, pack_table
from pipeline.fusion.runner import DenseRows, dense_rows
from pipeline.fusion.rules import FusionRule, get_rule
from pipeline.layout import PREDICTION_COLUMNS, empty_predictions, normalise_predictions

__all__ = ["BACKENDS", "fuse_packed", "fuse_packed_levels", "fuse_predictions", "fused_table"]

BACKENDS = ("numba", "ensemble_boxes")


def fuse_predictions(preds: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | pd.DataFrame, *,
                     method: str = "wbf", group_col: str | Sequence[str] = "model",
                     weights: Mapping[Any, float] | None = None, sets: Sequence[Any] | None = None,
                     model_name: str | None = None, backend: str = "numba", threads: int | None = None,
                     leave_out: Collection[Any] = (), **params: Any) -> pd.DataFrame:
    """Fusion of a whole prediction table with one rule, image by image, in pixels in and pixels out.

    ``method``: a key of :data:`~pipeline.fusion.rules.FUSION_METHODS` -- ``"wbf"`` (default), ``"nms"``,
    ``"soft_nms"``, ``"nmw"``. ``**params``: the rule's parameters (any subset of its ``defaults``; e.g. WBF's
    ``iou_thr``, ``skip_box_thr``, ``conf_type``, ``allows_overflow``; soft-NMS's ``iou_thr``, ``sigma``,
    ``thresh``, ``decay``); an unknown one raises ``TypeError``. Each image is fused exactly as the reference
    library's function (``FusionRule.library``) fuses the image's normalised boxes.

    ``preds``: a prediction table (:mod:`pipeline.layout`; coordinates in ORIGINAL-IMAGE PIXELS).
    ``image_sizes``: ``{image_id: (width, height)}`` or a table with columns ``image_id, width, height``; every
    image in ``preds`` must be there. Coordinates are divided by (width, height) here -- callers never
    normalise -- fused on the normalised boxes, and multiplied back.

    Sets. Each distinct value of ``group_col`` (a column name, or several, e.g. ``("model", "fold", "tta")``, whose
    values are then tuples) is one *set*: one entry of the library's ``boxes_list``, for every image. **Every image
    is fused with the full list of sets**, also sets that have no box on that image (the library is called with an
    empty entry for them), because WBF rescales scores by the sets' weights: ``'avg'`` by ``weights.sum()`` and
    ``min(len(weights), n)``, ``'max'`` by ``weights.max()``, ``'box_and_model_avg'`` by ``weights.sum()``,
    ``'absent_model_aware_avg'`` by the weights of the absent sets (NMS and soft-NMS divide by ``weights.sum()``,
    NMW by ``weights.max()``). The list of sets is ``sets`` when given (its order is the order of ``boxes_list``;
    every key in the table must be in it), else all distinct values of ``group_col`` found in ``preds``, sorted.
    Pass ``sets`` explicitly whenever ``preds`` may lack a member entirely (e.g. a subset of images on which a model
    predicted nothing): a missing set silently changes the fused scores.

    ``weights``: ``{set key: weight}``; with several group columns a key may also be the first column's value
    (e.g. the model name) to give all of that model's folds/views one weight. Default: the library's
    ``weights=None`` -- every set 1 for WBF and NMW; NMS and soft-NMS then leave scores as they are, while with
    weights they become ``score * weight / sum(weights)``, as in the library.
    Within an image, boxes of a set keep their row order in ``preds`` (which only matters for tied scores).

    Output: a prediction table with ``model=model_name`` (default: ``method``), ``fold=-1``, ``tta=method``; images
    sorted by ``image_id``; within an image the rule's order -- by score descending for WBF and NMW, grouped by
    label ascending and then in selection order for NMS and soft-NMS (the library's order). Images without kept
    boxes have no rows. ``backend="ensemble_boxes"`` calls the library image by image (slow; same output).
    ``threads``: worker threads for the numba backend (default: the CPUs available to this process).
    ``leave_out``: sets (or, with several group columns, first values such as a member name) whose rows are left
    out, as if ``preds`` had none, and which leave ``sets`` too -- the same output as filtering ``preds`` first,
    without copying its rows (the OOF tuner drops members this way).
    """
    _resolved_rule(method, backend, params)  # bad arguments fail before any work, also on an empty table
    packed = pack_table(preds, image_sizes, group_col, weights, sets, leave_out)
    if packed is None:
        return empty_predictions()
    rows = fuse_packed(packed, method, weights is not None, backend, threads, **params)
    return fused_table(packed, rows, method if model_name is None else model_name, method)


def fuse_packed(packed: PackedTable, method: str, weighted: bool, backend: str = "numba", threads: int | None = None,
                reuse_slots: bool = False, by_score: bool = False, **params: Any) -> DenseRows:
    """The fused rows of a packed table (:func:`~pipeline.fusion.packing.pack_table`), in pixels: what
    :func:`fuse_predictions` returns before it becomes a table. ``weighted``: weights were given (NMS and soft-NMS
    then divide scores by their sum, as the library does). The OOF tuner calls this directly, to score the rows
    without a table and to reuse one packing for many weights (:func:`~pipeline.fusion.packing.with_weights`), and
    with ``reuse_slots``: the kernel writes into this thread's cached output slots, one row per input row, which
    the dense rows are copied from, into a buffer no rows use any more (:class:`~pipeline.fusion.runner.RowsPool`;
    :func:`~pipeline.fusion.runner.release_thread_output` lets both go).
    ``by_score``: each image's rows by descending score, stable (the rule's own order when it sorts by score; the
    order a scorer packs rows in, so the tuner's scorings take them as they come)."""
    rule, resolved = _resolved_rule(method, backend, params)
    if backend == "numba":
        n_threads = available_cpus() if threads is None else int(threads)
        return dense_rows(packed, rule.fuse(packed, resolved, weighted, n_threads, reuse_slots), n_threads,
                          by_score and not rule.sorted_by_score, reuse_slots)
    from pipeline.fusion.oracle import fuse_with_ensemble_boxes  # the library is imported only when asked for

    fused = fuse_with_ensemble_boxes(packed, method, resolved, weighted)
    ww = packed.width[fused.image]
    hh = packed.height[fused.image]
    rows = DenseRows(fused.image, np.stack([fused.boxes[:, 0] * ww, fused.boxes[:, 1] * hh,
                                            fused.boxes[:, 2] * ww, fused.boxes[:, 3] * hh, fused.score]),
                     fused.label)
    if by_score and not rule.sorted_by_score:
        order = np.lexsort((-rows.values[4], rows.image))  # stable: equal scores keep the library's order
        rows = DenseRows(rows.image[order], rows.values[:, order], rows.label[order])
    return rows


def fuse_packed_levels(packed: PackedTable, method: str, values: Sequence[float], threads: int | None = None,
                       reuse_slots: bool = False, by_score: bool = False, **params: Any) -> list[DenseRows]:
    """:func:`fuse_packed` (numba backend) with the rule's ``level_param`` at each of ``values`` (non-decreasing),
    in one pass of its kernel (``FusionRule.fuse_levels``); every set weight of ``packed`` must be 1. The same rows
    as one :func:`fuse_packed` call per value; ``ValueError`` for a rule without levels."""
    rule, resolved = _resolved_rule(method, "numba", params)
    if rule.fuse_levels is None:
        raise ValueError(f"fusion method {method!r} has no parameter fused at several values at once")
    n_threads = available_cpus() if threads is None else int(threads)
    outputs = rule.fuse_levels(packed, resolved, values, n_threads, reuse_slots)
    return [dense_rows(packed, out, n_threads, by_score and not rule.sorted_by_score, reuse_slots) for out in outputs]


def _resolved_rule(method: str, backend: str, params: dict[str, Any]) -> tuple[FusionRule, dict[str, Any]]:
    """The rule and its full parameters; ``ValueError`` for an unknown backend or rule, ``TypeError`` for an
    unknown parameter, the rule's own errors for bad values."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; must be one of {BACKENDS}")
    rule = get_rule(method)
    resolved = rule.resolve(params)
    rule.check(resolved)
    return rule, resolved


def _constant_strings(value: str, n: int) -> pd.api.extensions.ExtensionArray:
    """``n`` copies of ``value`` as pandas' str array, built by arrow (no per-row Python object; 11-17 ms for 4.4 M
    rows where numpy's offsets and a repeated bytes object took 26 ms)."""
    return pd.array(pa.repeat(pa.scalar(value, pa.large_string()), n), dtype="str")


def fused_table(packed: PackedTable, rows: DenseRows, model_name: str, tta: str) -> pd.DataFrame:
    """Dense fused rows in pixels as a normalised prediction table (``model=model_name``, ``fold=-1``,
    ``tta=tta``); the float columns are ``rows.values`` itself (one block, not copied)."""
    n = len(rows.image)
    if n == 0:
        return empty_predictions()
    df = pd.DataFrame(rows.values.T, columns=["x1", "y1", "x2", "y2", "score"], copy=False)
    df.insert(0, "image_id", packed.image_ids.take(rows.image))
    df["label"] = rows.label
    model = _constant_strings(model_name, n)
    df["model"] = model
    df["fold"] = np.full(n, -1, np.int64)
    df["tta"] = model if tta == model_name else _constant_strings(tta, n)  # arrow arrays are immutable: shared
    return normalise_predictions(df[PREDICTION_COLUMNS])
