"""Box fusion: prediction tables of several models, folds and TTA views -> one fused prediction table.

Public API::

    from pipeline.fusion import (BACKENDS, CONF_TYPES, FUSION_METHODS, FusionRule, fuse_predictions, nms,
                                 nms_method, non_maximum_weighted, soft_nms, weighted_boxes_fusion)

* :func:`fuse_predictions` -- a whole prediction table (original-image pixels), image by image, in one compiled
  call, with the rule ``method`` (``"wbf"``, ``"nms"``, ``"soft_nms"``, ``"nmw"``); ``backend`` is one of
  :data:`BACKENDS`.
* :func:`~pipeline.fusion.tuned.fuse_tuned` -- an ensemble's fusion with its tuned parameters as ``result.json``
  records them (weight-0 members left out, the rule, the score threshold): the ensemble, pseudo-labelling and
  offline inference all fuse through it; :func:`~pipeline.fusion.tuned.fuse_tuned_rows` is the same fusion as rows,
  the table packed once per subset of members (what the OOF tuner scores, without building tables).
* :data:`FUSION_METHODS` -- the registry of rules (:class:`FusionRule`: parameters with the library's defaults,
  default tuning grid, compiled backend), for a tuner that loops over rules without knowing them.
* Drop-ins for ensemble-boxes 1.0.9 (same arguments, same boxes, scores, labels and order):
  :func:`weighted_boxes_fusion` (``conf_type`` one of :data:`CONF_TYPES`), :func:`nms`, :func:`soft_nms`,
  :func:`nms_method`, :func:`non_maximum_weighted`.

Layout -- the table driver is shared, a fusion rule is one module plus its compiled kernel:

* :mod:`~pipeline.fusion.table` -- the table driver: pack, call the rule's backend, unpack to a prediction table;
* :mod:`~pipeline.fusion.rules` -- the registry :data:`FUSION_METHODS`;
* :mod:`~pipeline.fusion.packing` -- a table described as segments of its own columns
  (:class:`~pipeline.fusion.packing.PackedTable`), and the dense output columns;
* :mod:`~pipeline.fusion.runner` -- a kernel over a packed table's images: output slots, threads, input repairs;
* :mod:`~pipeline.fusion.rows` -- reading one image's rows as the library's rules do (normalise, skip, swap, clip,
  drop zero areas, weight scores), compiled, shared by every kernel;
* :mod:`~pipeline.fusion.wbf` -- the weighted-box-fusion rule: what is replicated of the library, the exactness
  and tie rules, the drop-in, and its whole-table entry; :mod:`~pipeline.fusion.wbf_kernel` -- its compiled
  stages; :mod:`~pipeline.fusion.wbf_scratch` -- their work arrays, laid out once;
* :mod:`~pipeline.fusion.suppression` -- NMS and soft-NMS (one library module, ``nms_method``, two rules) and
  :mod:`~pipeline.fusion.suppression_kernel`; :mod:`~pipeline.fusion.nmw` -- non-maximum weighted and
  :mod:`~pipeline.fusion.nmw_kernel`;
* :mod:`~pipeline.fusion.primitives` -- compiled building blocks any rule can use (stable radix argsort, numpy's
  pairwise sum, the library's IoU, grid cells); :mod:`~pipeline.fusion.grid` -- the exact spatial index of the
  NMS, soft-NMS and NMW kernels;
* :mod:`~pipeline.fusion.lists` -- the library's list inputs as the drop-ins read them;
* :mod:`~pipeline.fusion.oracle` -- the ``ensemble_boxes`` backend (compatibility path and test oracle), imported
  only when that backend is asked for, never on the hot path.

A new rule adds its module (a ``fuse_packed`` taking a :class:`~pipeline.fusion.packing.PackedTable`, a kernel
reading images with :func:`~pipeline.fusion.rows.read_image`), an entry in :data:`FUSION_METHODS` and a branch in
the oracle.
"""
from __future__ import annotations

from pipeline.fusion.nmw import non_maximum_weighted
from pipeline.fusion.rules import FUSION_METHODS, FusionRule
from pipeline.fusion.suppression import nms, nms_method, soft_nms
from pipeline.fusion.table import BACKENDS, fuse_predictions
from pipeline.fusion.tuned import fuse_tuned, rule_params
from pipeline.fusion.wbf import CONF_TYPES, weighted_boxes_fusion

__all__ = ["BACKENDS", "CONF_TYPES", "FUSION_METHODS", "FusionRule", "fuse_predictions", "fuse_tuned", "nms",
           "nms_method", "non_maximum_weighted", "rule_params", "soft_nms", "weighted_boxes_fusion"]
