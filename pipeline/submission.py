"""Stage 5: the ensemble's fused test predictions as a validated submission file, registered in the ledger.

    python -m pipeline.submission --config configs/demo/ensemble.yaml

Reads ``runs/<experiment>/ensembles/<name>/test_fused.parquet`` and its ``result.json`` (written by
``pipeline.ensemble``) and the test split's image list, then writes ``submissions/<UTC time>_<ensemble>.<suffix>``
in ``submission.format`` (validated before it appears: every id of the sample exactly once, finite numbers,
boxes inside the image, confidences in [0, 1]), its ``.meta.json`` sidecar (members, CV, metric, content hash,
the pseudo-label round the members trained on) and its row in ``submissions/ledger.csv``, plus an MLflow
"submission" run when tracking is on.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.formats import SubmissionError, content_hash, keep_top_boxes, submission_path, write_submission
from pipeline.layout import ENSEMBLE_RESULT, ensemble_dir, fused_path, read_predictions
from pipeline.ledger import LedgerError, register_submission, write_sidecar
from pipeline.metrics import get_metric

log = logging.getLogger(__name__)

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
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubmissionStageError(f"{path}: not readable JSON ({exc}); run the ensemble stage again") from None
    if not isinstance(result, dict):
        raise SubmissionStageError(f"{path}: expected a JSON object; run the ensemble stage again")
    return result


def member_round(value: Any, where: str) -> int | None:
    """The pseudo-label round one member trained on, from its ``train.pseudo`` as the ensemble recorded it: None or
    0 (none), a round number, or a round folder's path (its ``meta.json`` says the round; else a ``round<N>`` folder
    name). None when a path's round cannot be told; SubmissionStageError for a value of another type."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str) or not value.strip():
        raise SubmissionStageError(f"{where}: expected a round number, a round folder or null, got {value!r}")
    if value.strip().isdigit():
        return int(value.strip())
    from pipeline.pseudo_labels import PseudoLabelError, read_pseudo_meta  # lazy: only for a path

    folder = Path(value)
    folder = folder.parent if folder.suffix in (".json", ".parquet") else folder  # as train.pseudo accepts
    try:
        return int(read_pseudo_meta(folder)["round"])
    except (PseudoLabelError, OSError, TypeError, ValueError) as exc:
        named = re.fullmatch(r"round(\d+)", folder.name)
        log.warning("%s: %s%s", where, exc, f"; taking round {named[1]} from the folder's name" if named else "")
        return int(named[1]) if named else None


def pseudo_rounds(result: dict, where: str) -> dict[str, Any]:
    """``pseudo_round`` (text: the highest round any member trained on, "0" when none, "?" when a member's round
    cannot be told), ``pseudo_members`` (``member=round`` per member) and ``pseudo_rounds`` (as recorded), for the
    sidecar and the ledger. A result.json written before the ensemble recorded rounds cannot tell: empty cells."""
    if "pseudo_rounds" not in result:
        log.info("%s has no 'pseudo_rounds' (an older pipeline.ensemble): the ledger row's round is left empty", where)
        return {"pseudo_round": "", "pseudo_members": [], "pseudo_rounds": None}
    recorded = result.get("pseudo_rounds", {}) or {}
    if not isinstance(recorded, dict):
        raise SubmissionStageError(f"{where}: 'pseudo_rounds' must map member names to rounds, got {recorded!r}")
    rounds = {str(name): member_round(value, f"{where}: pseudo_rounds[{name!r}]") for name, value in recorded.items()}
    for name in result.get("members") or []:
        if str(name) not in rounds:
            log.warning("%s: member %r has no entry in 'pseudo_rounds': its round is unknown", where, name)
            rounds[str(name)] = None
    known = [r for r in rounds.values() if r is not None]
    highest = "?" if len(known) < len(rounds) else str(max(known, default=0))
    return {"pseudo_round": highest, "pseudo_members": [f"{m}={'?' if r is None else r}" for m, r in rounds.items()],
            "pseudo_rounds": recorded}


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
            "ensemble": cfg.ensemble.name, "members": result["members"], "cv": result["oof"],
            "cv_nested": result.get("nested_oof"), "metric": cfg.metric,
            "format": cfg.submission.format, "content_hash": content_hash(path), "config": str(cfg.source),
            "mlflow_run_id": result.get("mlflow_run_id")}
    meta |= pseudo_rounds(result, str(ensemble_dir(cfg) / ENSEMBLE_RESULT))
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
