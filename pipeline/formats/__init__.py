"""Submission files: a registry of the formats Kaggle detection competitions use, with one writer, reader and
validator for all of them.

    from pipeline.formats import write_submission, submission_path, content_hash
    path = submission_path(cfg.submission.dir, "my-ens", format="gwd")
    write_submission(fused_test, image_ids, path, "gwd", classes, sample_submission=sample, image_sizes=sizes)

Formats (``submission.format`` in the config; one module each, documented there):

- ``gwd``: CSV ``image_id,PredictionString`` with ``conf x y w h`` groups (:mod:`pipeline.formats.gwd`);
- ``label_conf_xyxy``: CSV ``image_id,PredictionString`` with ``label conf x1 y1 x2 y2`` groups
  (:mod:`pipeline.formats.label_conf_xyxy`);
- ``coco_json``: a COCO results list (:mod:`pipeline.formats.coco_json`).

Adding a format: a new module here that defines a :class:`SubmissionFormat` (for a PredictionString CSV, a
:class:`~pipeline.formats.prediction_string.PredictionStringFormat` with its group's encoding and parsing) and ends
with ``register_format(...)``, plus its import line below. Nothing else changes: the config's choices come from
:func:`format_names`. This package never imports :mod:`pipeline.config`, so the config can import it.
"""
from __future__ import annotations

from pipeline.formats.base import (
    BOX_TOLERANCE,
    FORMATS,
    SCORE_DECIMALS,
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    ParsedRow,
    Sample,
    SubmissionError,
    SubmissionFormat,
    format_names,
    get_format,
    register_format,
)

# The registered formats, in the order format_names() lists them. A new format: one more import line here.
from pipeline.formats import gwd, label_conf_xyxy, coco_json  # noqa: F401  isort: skip
from pipeline.formats.files import (
    content_hash,
    keep_top_boxes,
    read_submission,
    submission_path,
    validate_submission,
    write_submission,
)

__all__ = [
    "BOX_TOLERANCE",
    "FORMATS",
    "SCORE_DECIMALS",
    "EncodeOptions",
    "LabelStyle",
    "ParsedBox",
    "ParsedRow",
    "Sample",
    "SubmissionError",
    "SubmissionFormat",
    "content_hash",
    "keep_top_boxes",
    "format_names",
    "get_format",
    "read_submission",
    "register_format",
    "submission_path",
    "validate_submission",
    "write_submission",
]
