"""An ensemble's fusion with the parameters it tuned on OOF, as ``result.json`` records them: one function for the
ensemble stage, pseudo-labelling and offline inference, so all three fuse exactly alike.

``params`` is flat: ``method`` (a key of :data:`~pipeline.fusion.rules.FUSION_METHODS`; ``"wbf"`` when absent, as
in files written before rules could be chosen), the rule's own parameters (``iou_thr``, ``conf_type``...),
``weights`` (``{member: weight}``, or None), ``score_thr`` and, from 2026-12-01, ``fold_fusion`` (``{member: WBF
parameters}``: how test's fold models of each member x view are fused before the rule, :func:`fuse_folds_first`;
absent in older files, which fused every fold model as a set of the rule).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.fusion.packing import PackedTable, pack_table, with_weights, without_sets
from pipeline.fusion.rules import get_rule
from pipeline.fusion.runner import DenseRows
from pipeline.fusion.table import fuse_packed, fuse_packed_levels, fuse_predictions, fused_table
from pipeline.layout import empty_predictions

__all__ = ["TunedRows", "derive_rows", "fuse_folds_first", "fuse_tuned", "fuse_tuned_rows", "fuse_tuned_rows_levels",
           "rule_params"]

_NOT_RULE = ("method", "weights", "score_thr", "fold_fusion")


def rule_params(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(method, the rule's parameters)`` from flat ``params``; an unknown key raises ``TypeError`` (a file made
    for another rule is refused, not half-followed)."""
    method = params.get("method") or "wbf"
    own = {k: v for k, v in params.items() if k not in _NOT_RULE}
    return method, get_rule(method).resolve(own)


def fuse_tuned(preds: pd.DataFrame, sizes: Mapping[str, tuple[int, int]] | pd.DataFrame, params: Mapping[str, Any],
               sets: Sequence[tuple], group_col: str | Sequence[str], *, name: str,
               backend: str = "numba") -> pd.DataFrame:
    """``preds`` fused with tuned ``params``. ``sets`` are tuples whose first element is the member.

    * A member of weight 0 is left out entirely (its boxes would otherwise still count in WBF's cluster sizes).
    * NMS and soft-NMS given weights return ``score * w / sum(w)`` over every set, a constant that grows with the
      number of sets (OOF fuses member x view sets, test member x fold x view): it is multiplied back by
      ``sum(w) / max(w)``, which keeps every rank and makes a box of a full-weight member keep its own score, so
      the score threshold tuned on OOF means the same on test (soft-NMS's own ``thresh`` is divided by the same
      constant, so the boxes it keeps do not depend on the number of sets either).
    * Then boxes under ``score_thr`` are dropped.

    With ``fold_fusion`` (``{member: WBF parameters}``) and sets ``(member, fold, view)`` (test), each member x
    view's fold models are fused first (:func:`fuse_folds_first`), and the rule fuses member x view sets.
    """
    preds, sets, group_col = fuse_folds_first(preds, sizes, params, sets, group_col, backend)
    fused = fuse_tuned_rows(preds, sizes, params, sets, group_col, backend=backend)
    if fused is None:
        return empty_predictions()
    method, _ = rule_params(params)
    return fused_table(fused.packed, fused.rows, name, method)


def fuse_folds_first(preds: pd.DataFrame, sizes: Mapping[str, tuple[int, int]] | pd.DataFrame,
                     params: Mapping[str, Any], sets: Sequence[tuple], group_col: str | Sequence[str],
                     backend: str = "numba") -> tuple[pd.DataFrame, list[tuple], str | Sequence[str]]:
    """``(preds, sets, group_col)`` for the tuned rule. Test's sets ``(member, fold, view)``, when ``params`` has
    ``fold_fusion``: each member x view's fold models fused by WBF with ``fold_fusion[member]`` into one set
    ``(member, view)`` (a single fold model's rows as they are), so that the rule fuses the sets it was tuned on --
    OOF holds one fold model's predictions per image and member x view. Members of weight 0 are left out. Any other
    sets pass through."""
    plan = params.get("fold_fusion")
    if not plan or isinstance(group_col, str) or tuple(group_col) != ("model", "fold", "tta"):
        return preds, list(sets), group_col
    weights = params.get("weights") or {}
    folds_of: dict[tuple, list] = {}
    for member, fold, view in sets:
        if weights.get(member, 1.0) != 0:
            folds_of.setdefault((member, view), []).append(fold)
    positions = preds.groupby(["model", "tta"], sort=False, observed=True).indices if len(preds) else {}
    parts = []
    for (member, view), folds in folds_of.items():
        rows = preds.iloc[positions.get((member, view), [])]
        if len(folds) == 1:
            parts.append(rows[rows.fold == folds[0]])
        elif len(rows):
            parts.append(fuse_predictions(rows, sizes, group_col="fold", sets=folds, model_name=member,
                                          backend=backend, **plan[member]).assign(tta=view))
    fused = pd.concat(parts, ignore_index=True) if parts else empty_predictions()
    return fused, list(folds_of), ("model", "tta")


class TunedRows(NamedTuple):
    """:func:`fuse_tuned`'s output before it becomes a table: ``rows.image`` indexes ``packed.image_ids``."""

    packed: PackedTable
    rows: DenseRows


def fuse_tuned_rows(preds: pd.DataFrame, sizes: Mapping[str, tuple[int, int]] | pd.DataFrame,
                    params: Mapping[str, Any], sets: Sequence[tuple], group_col: str | Sequence[str], *,
                    backend: str = "numba", packings: dict[frozenset, PackedTable | None] | None = None,
                    by_score: bool = False) -> TunedRows | None:
    """:func:`fuse_tuned` as rows (None: nothing to fuse). ``packings``: a cache of ``preds`` packed, one entry per
    set of left-out members, for a caller fusing the same table many times (the OOF tuner): the rows and segments
    are packed once per subset of members and only the set weights change; the kernel's output slots are then
    this thread's cached ones (:func:`~pipeline.fusion.table.fuse_packed`'s ``reuse_slots``). ``by_score``: each
    image's rows by descending score (:func:`~pipeline.fusion.table.fuse_packed`), for a caller that scores them."""
    method, rule = rule_params(params)
    get_rule(method).check(rule)  # bad values fail before any work, also on an empty table
    weights = dict(params.get("weights") or {}) or None
    dropped = frozenset(m for m, w in (weights or {}).items() if w == 0)
    scale = _score_scale(method, weights, sets, dropped)
    # a threshold the rule compares with the divided scores (soft-NMS's thresh) is divided alike
    rule = {k: (v / scale if k in get_rule(method).score_params else v) for k, v in rule.items()}
    packed = _packed(preds, sizes, group_col, weights, sets, dropped, packings)
    if packed is None:
        return None
    rows = fuse_packed(packed, method, weights is not None, backend, reuse_slots=packings is not None,
                       by_score=by_score, **rule)
    if scale != 1.0 and len(rows.image):
        rows.values[4] *= scale
    return TunedRows(packed, _above_score_thr(rows, params))


def fuse_tuned_rows_levels(preds: pd.DataFrame, sizes: Mapping[str, tuple[int, int]] | pd.DataFrame,
                           every: Sequence[Mapping[str, Any]], sets: Sequence[tuple], group_col: str | Sequence[str],
                           *, packings: dict[frozenset, PackedTable | None] | None = None,
                           by_score: bool = False) -> list[TunedRows | None]:
    """:func:`fuse_tuned_rows` (numba backend) for each of ``every``: params that differ only in the rule's
    ``level_param`` (WBF's ``skip_box_thr``) and ``score_thr``. When every kept member has weight 1 (or there are
    no weights), one pass of the rule's kernel fuses them all (:func:`~pipeline.fusion.table.fuse_packed_levels`:
    the same rows); otherwise, or for a rule without levels, one fusion each."""
    method, first = rule_params(every[0])
    rule = get_rule(method)
    weights = dict(every[0].get("weights") or {})
    name = rule.level_param
    same = name is not None and all(
        rule_params(p)[0] == method and dict(p.get("weights") or {}) == weights
        and {k: v for k, v in rule_params(p)[1].items() if k != name} == {k: v for k, v in first.items() if k != name}
        for p in every)
    # one pass only where fuse_tuned_rows would neither scale the scores nor divide a parameter (weights 1)
    if (not same or len(every) < 2 or any(w not in (0.0, 1.0) for w in weights.values())
            or rule.divides_by_weight_sum or rule.score_params):
        return [fuse_tuned_rows(preds, sizes, p, sets, group_col, packings=packings, by_score=by_score) for p in every]
    rule.check(first)
    dropped = frozenset(m for m, w in weights.items() if w == 0)
    packed = _packed(preds, sizes, group_col, weights or None, sets, dropped, packings)
    if packed is None:
        return [None] * len(every)
    values = [float(rule_params(p)[1][name]) for p in every]
    levels = sorted(set(values))
    rows = fuse_packed_levels(packed, method, levels, reuse_slots=packings is not None, by_score=by_score,
                              **{k: v for k, v in first.items() if k != name})
    by_value = dict(zip(levels, rows))
    return [TunedRows(packed, _above_score_thr(by_value[v], p)) for v, p in zip(values, every)]


def _packed(preds: pd.DataFrame, sizes: Mapping[str, tuple[int, int]] | pd.DataFrame, group_col: str | Sequence[str],
            weights: dict | None, sets: Sequence[tuple], dropped: frozenset,
            packings: dict[frozenset, PackedTable | None] | None) -> PackedTable | None:
    """``preds`` packed without the members in ``dropped``, with ``weights``: from ``packings`` (one packing per
    set of left-out members, filled in here, each taken from the packing of every member) when given."""
    if packings is None:
        return pack_table(preds, sizes, group_col, weights, sets, dropped)
    multi = not isinstance(group_col, str) and len(group_col) > 1
    if dropped not in packings:
        if frozenset() not in packings:
            packings[frozenset()] = pack_table(preds, sizes, group_col, weights, sets)
        full = packings[frozenset()]
        packings[dropped] = full if not dropped or full is None else without_sets(full, dropped, weights, multi)
    return None if packings[dropped] is None else with_weights(packings[dropped], weights, multi)


def _score_scale(method: str, weights: dict | None, sets: Sequence[tuple], dropped: frozenset) -> float:
    """What :func:`fuse_tuned` multiplies a rule's weight-divided scores by: ``sum(w) / max(w)`` over the kept
    sets (1 for a rule that does not divide, or without weights)."""
    if not weights or not get_rule(method).divides_by_weight_sum:
        return 1.0
    kept_sets = [s for s in sets if s[0] not in dropped]
    per_set = np.array([weights[s] if s in weights else weights[s[0]] for s in kept_sets], dtype=np.float64)
    return float(per_set.sum() / per_set.max())


def _above_score_thr(rows: DenseRows, params: Mapping[str, Any]) -> DenseRows:
    score_thr = float(params.get("score_thr") or 0.0)
    if score_thr > 0:
        keep = rows.values[4] >= score_thr
        if not keep.all():
            return rows.take(keep)
    return rows


def derive_rows(base: TunedRows, base_params: Mapping[str, Any], params: Mapping[str, Any],
                sets: Sequence[tuple]) -> TunedRows:
    """:func:`fuse_tuned_rows` with ``params``, from its rows with ``base_params`` (same ``sets``), without fusing
    again: ``params`` may differ from ``base_params`` only in the rule's selection thresholds
    (:attr:`~pipeline.fusion.rules.FusionRule.selection_thresholds`, soft-NMS's ``thresh``), each at least as high,
    and in a score threshold at least as high. The rows kept are the base rows whose score at selection is above
    each threshold, divided as the fusion divides it (bit for bit what fusing with ``params`` returns);
    ``ValueError`` for any other difference."""
    method, rule = rule_params(params)
    base_method, base_rule = rule_params(base_params)
    names = get_rule(method).selection_thresholds
    other = {k: v for k, v in rule.items() if k not in names}
    if (method != base_method or other != {k: v for k, v in base_rule.items() if k not in names}
            or dict(params.get("weights") or {}) != dict(base_params.get("weights") or {})
            or any(rule[k] < base_rule[k] for k in names)
            or float(params.get("score_thr") or 0.0) < float(base_params.get("score_thr") or 0.0)):
        raise ValueError(f"{dict(params)} cannot be derived from a fusion with {dict(base_params)}")
    rows = base.rows
    raised = [k for k in names if rule[k] != base_rule[k]]
    if raised and len(rows.image):
        if rows.selection is None:
            raise ValueError(f"{method}: these fused rows carry no selection scores")
        weights = dict(params.get("weights") or {}) or None
        scale = _score_scale(method, weights, sets, frozenset(m for m, w in (weights or {}).items() if w == 0))
        keep = np.ones(len(rows.image), bool)
        for k in raised:
            keep &= rows.selection > (rule[k] / scale if k in get_rule(method).score_params else rule[k])
        if not keep.all():
            rows = rows.take(keep)
    return TunedRows(base.packed, _above_score_thr(rows, params))
