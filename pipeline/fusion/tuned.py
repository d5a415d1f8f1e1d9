"""An ensemble's fusion with the parameters it tuned on OOF, as ``result.json`` records them: one function for the
ensemble stage, pseudo-labelling and offline inference, so all three fuse exactly alike.

``params`` is flat: ``method`` (a key of :data:`~pipeline.fusion.rules.FUSION_METHODS`; ``"wbf"`` when absent, as
in files written before rules could be chosen), the rule's own parameters (``iou_thr``, ``conf_type``...),
``weights`` (``{member: weight}``, or None) and ``score_thr``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.fusion.rules import get_rule
from pipeline.fusion.table import fuse_predictions

__all__ = ["fuse_tuned", "rule_params"]

_NOT_RULE = ("method", "weights", "score_thr")


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
    """
    method, rule = rule_params(params)
    weights = dict(params.get("weights") or {}) or None
    dropped = {m for m, w in (weights or {}).items() if w == 0}
    kept_sets = [s for s in sets if s[0] not in dropped]
    scale = 1.0
    if weights and get_rule(method).divides_by_weight_sum:
        per_set = np.array([weights[s] if s in weights else weights[s[0]] for s in kept_sets], dtype=np.float64)
        scale = float(per_set.sum() / per_set.max())
        # a threshold the rule compares with the divided scores (soft-NMS's thresh) is divided alike
        rule = {k: (v / scale if k in get_rule(method).score_params else v) for k, v in rule.items()}
    fused = fuse_predictions(preds, sizes, method=method, group_col=group_col, sets=sets, weights=weights,
                             model_name=name, backend=backend, leave_out=dropped, **rule)
    if scale != 1.0 and len(fused):
        fused = fused.assign(score=(fused.score * scale).astype(fused.score.dtype))
    score_thr = float(params.get("score_thr") or 0.0)
    return fused[fused.score >= score_thr] if score_thr > 0 else fused
