"""The fusion rules, one registry: what each is called, which parameters it takes and how they are tuned.

:data:`FUSION_METHODS` maps a method name (``fuse_predictions(method=...)``, config ``ensemble.method``) to its
:class:`FusionRule`. A tuner loops over rules without knowing them::

    for name, rule in FUSION_METHODS.items():
        for params in rule.candidates():            # the rule's default grid, as keyword dicts
            fused = fuse_predictions(preds, sizes, method=name, weights=w, **params)

* ``defaults``: every parameter the rule takes, with the reference library's default; a call may give any subset
  (:meth:`FusionRule.resolve` fills in the rest and rejects unknown names).
* ``grids``: the tuning grid, as cross products whose union is searched (soft-NMS: the gaussian decay ignores
  ``iou_thr`` and the linear one ``sigma``, so each has its own product); :meth:`FusionRule.candidates` expands
  it, defaults filled in, duplicates removed, in a fixed order.
* ``check``: raises ``ValueError`` for invalid parameter values (both backends call it first);
* ``fuse``: the compiled whole-table backend, ``fuse(packed, params, weighted, threads)``; ``weighted`` says
  whether the caller gave weights (NMS and soft-NMS divide scores by the weight sum only then, as the library).
* ``library``: the ``ensemble_boxes`` function replicated (the test oracle, ``backend="ensemble_boxes"``).
* ``label``: the short name tables print (``WBF``, ``NMS``...);
* ``divides_by_weight_sum``: whether, given weights, the rule's scores become ``score * w / sum(w)`` (NMS and
  soft-NMS, as the library): a constant per call that depends on how many sets are fused, which
  :func:`pipeline.fusion.tuned.fuse_tuned` undoes so a score threshold tuned on OOF carries over to test;
  ``score_params``: the rule's parameters compared with those divided scores (soft-NMS's ``thresh``), which
  ``fuse_tuned`` divides alike.
* ``selection_thresholds``: the rule's parameters that only drop output rows, those whose score at selection
  (``KernelOutput.selection``) is at or below them, and change nothing else (soft-NMS's ``thresh``: the library
  runs its whole selection loop and filters at the end, so the rows kept at a higher value are, in order, the rows
  kept at a lower one whose selection score is above it). The OOF tuner fuses once at the grid's lowest value and
  derives the other values' rows (:func:`pipeline.fusion.tuned.derive_rows`).
* ``level_param`` and ``fuse_levels``: a parameter whose values the compiled backend fuses in one pass when every
  set weight is 1, ``fuse_levels(packed, params, values, threads, reuse)`` returning one output per value (WBF's
  ``skip_box_thr``, NMW's too: a higher threshold keeps a prefix of each label group's boxes, whose clusters are
  the run's clusters at that point, :mod:`pipeline.fusion.levels`). The OOF tuner fuses a grid's values of it so
  (:func:`pipeline.fusion.tuned.fuse_tuned_rows_levels`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.fusion.nmw import fuse_packed as nmw_fuse_packed
from pipeline.fusion.nmw import fuse_packed_levels as nmw_fuse_packed_levels
from pipeline.fusion.packing import PackedTable
from pipeline.fusion.runner import KernelOutput
from pipeline.fusion.suppression import DECAYS, check_nms_params
from pipeline.fusion.suppression import fuse_packed as nms_fuse_packed
from pipeline.fusion.wbf import CONF_TYPES, check_thresholds, conf_code
from pipeline.fusion.wbf import fuse_packed as wbf_fuse_packed
from pipeline.fusion.wbf import fuse_packed_levels as wbf_fuse_packed_levels

__all__ = ["FUSION_METHODS", "FusionRule", "get_rule"]

# fuse(packed, params, weighted, threads, reuse): reuse -- write into this thread's cached output slots
# (pipeline.fusion.runner.run_kernel)
Fuse = Callable[[PackedTable, Mapping[str, Any], bool, int, bool], KernelOutput]
# fuse_levels(packed, params, values of the level parameter, threads, reuse): one output per value
FuseLevels = Callable[[PackedTable, Mapping[str, Any], Sequence[float], int, bool], list[KernelOutput]]


@dataclass(frozen=True)
class FusionRule:
    """One fusion rule: its name, parameters with defaults, tuning grid and compiled whole-table backend."""

    name: str
    title: str
    label: str
    library: str  # the ensemble_boxes 1.0.9 function it replicates
    defaults: Mapping[str, Any]
    grids: tuple[Mapping[str, tuple[Any, ...]], ...]
    check: Callable[[Mapping[str, Any]], None]  # ValueError for invalid parameter values
    fuse: Fuse
    sorted_by_score: bool  # whether an image's output is sorted by score (NMS and soft-NMS: grouped by label)
    divides_by_weight_sum: bool = False
    score_params: tuple[str, ...] = ()
    selection_thresholds: tuple[str, ...] = ()
    level_param: str | None = None
    fuse_levels: FuseLevels | None = None
    # whether a box's fused score averages over the sets (with these parameters): then extra sets that repeat a
    # model -- test's fold models -- leave the scale alone; a rule keeping one box's own score (NMS, soft-NMS, NMW,
    # WBF's conf_type max) gets more and higher-scored copies from them (pipeline.ensemble's fold_fusion auto)
    averages_sets: Callable[[Mapping[str, Any]], bool] = lambda params: False

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated with ``params``; ``TypeError`` naming the rule's parameters for an unknown one."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise TypeError(f"fusion method {self.name!r} takes no parameter {unknown}; "
                            f"its parameters: {sorted(self.defaults)}")
        return {**self.defaults, **params}

    def candidates(self) -> list[dict[str, Any]]:
        """Every point of the tuning grid, defaults filled in, duplicates removed, in grid order."""
        seen: dict[tuple, dict[str, Any]] = {}
        for grid in self.grids:
            for combo in itertools.product(*grid.values()):
                params = self.resolve(dict(zip(grid, combo)))
                seen.setdefault(tuple(sorted(params.items())), params)
        return list(seen.values())


def _check_wbf(p: Mapping[str, Any]) -> None:
    check_thresholds(p["iou_thr"], p["skip_box_thr"])
    conf_code(p["conf_type"])


def _fuse_wbf(packed: PackedTable, p: Mapping[str, Any], weighted: bool, threads: int,
              reuse: bool) -> KernelOutput:
    iou_thr, skip_box_thr = check_thresholds(p["iou_thr"], p["skip_box_thr"])
    return wbf_fuse_packed(packed, iou_thr, skip_box_thr, conf_code(p["conf_type"]), bool(p["allows_overflow"]),
                           threads=threads, reuse=reuse)


def _fuse_wbf_levels(packed: PackedTable, p: Mapping[str, Any], values: Sequence[float], threads: int,
                     reuse: bool) -> list[KernelOutput]:
    iou_thr, _ = check_thresholds(p["iou_thr"], p["skip_box_thr"])
    return wbf_fuse_packed_levels(packed, iou_thr, [check_thresholds(iou_thr, v)[1] for v in values],
                                  conf_code(p["conf_type"]), bool(p["allows_overflow"]), threads=threads, reuse=reuse)


def _check_nms(p: Mapping[str, Any]) -> None:
    check_nms_params(3, p["iou_thr"], 0.5, 0.001)


def _fuse_nms(packed: PackedTable, p: Mapping[str, Any], weighted: bool, threads: int,
              reuse: bool) -> KernelOutput:
    return nms_fuse_packed(packed, 3, p["iou_thr"], 0.5, 0.001, weighted, threads=threads, reuse=reuse)


def _soft_nms_code(p: Mapping[str, Any]) -> int:
    if p["decay"] not in DECAYS:
        raise ValueError(f"unknown soft-NMS decay {p['decay']!r}; must be one of {sorted(DECAYS)}")
    return DECAYS[p["decay"]]


def _check_soft_nms(p: Mapping[str, Any]) -> None:
    check_nms_params(_soft_nms_code(p), p["iou_thr"], p["sigma"], p["thresh"])


def _fuse_soft_nms(packed: PackedTable, p: Mapping[str, Any], weighted: bool, threads: int,
                   reuse: bool) -> KernelOutput:
    return nms_fuse_packed(packed, _soft_nms_code(p), p["iou_thr"], p["sigma"], p["thresh"], weighted,
                           threads=threads, reuse=reuse)


def _check_nmw(p: Mapping[str, Any]) -> None:
    check_thresholds(p["iou_thr"], p["skip_box_thr"])


def _fuse_nmw(packed: PackedTable, p: Mapping[str, Any], weighted: bool, threads: int,
              reuse: bool) -> KernelOutput:
    iou_thr, skip_box_thr = check_thresholds(p["iou_thr"], p["skip_box_thr"])
    return nmw_fuse_packed(packed, iou_thr, skip_box_thr, threads=threads, reuse=reuse)


def _fuse_nmw_levels(packed: PackedTable, p: Mapping[str, Any], values: Sequence[float], threads: int,
                     reuse: bool) -> list[KernelOutput]:
    iou_thr, _ = check_thresholds(p["iou_thr"], p["skip_box_thr"])
    return nmw_fuse_packed_levels(packed, iou_thr, [check_thresholds(iou_thr, v)[1] for v in values],
                                  threads=threads, reuse=reuse)


IOU_GRID = (0.4, 0.5, 0.55, 0.6, 0.7)
SKIP_GRID = (0.0, 0.01, 0.05)

FUSION_METHODS: dict[str, FusionRule] = {
    "wbf": FusionRule(
        "wbf", "weighted boxes fusion", "WBF", "weighted_boxes_fusion",
        defaults={"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg", "allows_overflow": False},
        grids=({"iou_thr": IOU_GRID, "skip_box_thr": SKIP_GRID, "conf_type": CONF_TYPES},),
        check=_check_wbf, fuse=_fuse_wbf, sorted_by_score=True, level_param="skip_box_thr",
        fuse_levels=_fuse_wbf_levels, averages_sets=lambda params: params["conf_type"] != "max"),
    "nms": FusionRule(
        "nms", "non-maximum suppression", "NMS", "nms",
        defaults={"iou_thr": 0.5},
        grids=({"iou_thr": (0.3, 0.4, 0.5, 0.55, 0.6, 0.7)},),
        check=_check_nms, fuse=_fuse_nms, sorted_by_score=False, divides_by_weight_sum=True),
    "soft_nms": FusionRule(
        "soft_nms", "soft-NMS", "soft-NMS", "soft_nms",
        defaults={"iou_thr": 0.5, "sigma": 0.5, "thresh": 0.001, "decay": "gaussian"},
        grids=({"decay": ("gaussian",), "sigma": (0.05, 0.1, 0.25, 0.5, 1.0), "thresh": (0.001, 0.01)},
               {"decay": ("linear",), "iou_thr": (0.3, 0.4, 0.5, 0.6, 0.7), "thresh": (0.001, 0.01)}),
        check=_check_soft_nms, fuse=_fuse_soft_nms, sorted_by_score=False, divides_by_weight_sum=True,
        score_params=("thresh",), selection_thresholds=("thresh",)),
    "nmw": FusionRule(
        "nmw", "non-maximum weighted", "NMW", "non_maximum_weighted",
        defaults={"iou_thr": 0.55, "skip_box_thr": 0.0},
        grids=({"iou_thr": IOU_GRID, "skip_box_thr": SKIP_GRID},),
        check=_check_nmw, fuse=_fuse_nmw, sorted_by_score=True, level_param="skip_box_thr",
        fuse_levels=_fuse_nmw_levels),
}


def get_rule(method: str) -> FusionRule:
    """The registered rule called ``method``; ``ValueError`` listing the methods otherwise."""
    try:
        return FUSION_METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fusion method {method!r}; must be one of {sorted(FUSION_METHODS)}") from None
