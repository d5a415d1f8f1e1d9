"""Stage 5: the ensemble's fused test predictions as a validated submission file, registered in the ledger.

    python -m pipeline.submission --config configs/demo/ensemble.yaml

Reads ``runs/<experiment>/ensembles/<name>/test_fused.parquet`` and its ``result.json`` (written by
``pipeline.ensemble``) and the test split's image list, then writes ``submissions/<UTC time>_<ensemble>.<suffix>``
in ``submission.format`` (validated before it appears: every id of the sample exactly once, finite numbers,
boxes inside the image, confidences in [0, 1]), its ``.meta.json`` sidecar (members, CV, metric, content hash)
and its row in ``submissions/ledger.csv``, plus an MLflow "submission" run when tracking is on.
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.formats import SubmissionError, content_hash, keep_top_boxes, submission_path, write_submission
from pipeline.layout import ENSEMBLE_RESULT, ensemble_dir, fused_path, read_predictions
from pipeline.ledger import LedgerError, register_submission, write_sidecar
from pipeline.metrics import get_metric


class SubmissionStageError(RuntimeError):
    pass


def read_ensemble_result(cfg: ExperimentConfig) -> dict:
    """What the ensemble stage recorded: members, CV, whether the test split has labels, its MLflow run."""
    path = ensemble_dir(cfg) / ENSEMBLE_RESULT
    fused = fused_path(cfg, "test")
    for needed in (path, fused):
        if not needed.is_file():
            raise SubmissionStageError(f"{needed} not found: run python -m pipeline.ensemble --config {cfg.source} "
                                       "first (with every member's test predictions)")
    return json.loads(path.read_text(encoding="utf-8"))


def boxes_per_image(cfg: ExperimentConfig) -> int | None:
    value = cfg.submission.max_boxes_per_image
    return get_metric(cfg.metric).boxes_read if value == "metric" else value


def run(cfg: ExperimentConfig) -> dict:
    """Write, validate and register the submission; returns ``submission`` (its path) and ``test_labelled``."""
    result = read_ensemble_result(cfg)
    fused_test = keep_top_boxes(read_predictions(fused_path(cfg, "test")), boxes_per_image(cfg))
    test_table = load_dataset(cfg.data, "test")
    sample = cfg.data.root / cfg.data.sample_submission if cfg.data.sample_submission else None
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in test_table.images.itertuples()}
    path = submission_path(cfg.submission.dir, cfg.ensemble.name, format=cfg.submission.format)
    write_submission(fused_test, test_table.images.image_id.tolist(), path, cfg.submission.format,
                     test_table.classes, sample_submission=sample if sample and sample.exists() else None,
                     image_sizes=sizes, coord_decimals=cfg.submission.coord_decimals)
    print(f"wrote {path} (validated; {path.stat().st_size / 1e6:.2f} MB, {len(fused_test)} boxes, "
          f"{len(fused_test) / max(1, len(test_table.images)):.1f} per image)")
    meta = {"file": str(path), "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
            "ensemble": cfg.ensemble.name, "members": result["members"], "cv": result["oof"], "metric": cfg.metric,
            "format": cfg.submission.format, "content_hash": content_hash(path), "config": str(cfg.source),
            "mlflow_run_id": result.get("mlflow_run_id")}
    write_sidecar(meta)
    register_submission(meta, cfg.tracking, experiment=cfg.experiment, ledger_dir=cfg.submission.dir)
    return {"submission": str(path), "test_labelled": bool(result["test_labelled"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the ensemble's fused test predictions as a submission.")
    add_config_args(parser, demo="ensemble.yaml")
    args = parser.parse_args(argv)
    try:
        run(config_from_args(args))
    except (ConfigError, DataError, SubmissionError, SubmissionStageError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
