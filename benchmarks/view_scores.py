"""Each TTA view's score, alone and fused, on the out-of-fold images of some folds: what ``pipeline.predict --split
oof`` prints, for a prediction file already written and a subset of its folds (comparing a run trained on fold 0
only with fold 0 of a full run, without predicting again). Not a speed benchmark.

    .venv/bin/python benchmarks/view_scores.py --config configs/bccd/effdet.yaml --folds 0 [--predictions PATH]

``--predictions`` defaults to the run's ``predictions/oof.parquet``; the views are those the file holds, ``none``
first. The score is the config's metric on the folds' images (``pipeline.metrics.Scorer``), the fused row the
views fused as the predict stage fuses them (``predict.tta_iou_thr`` etc.).
"""
from __future__ import annotations

import argparse
import warnings

from pipeline.config import load_config
from pipeline.data import load_dataset
from pipeline.layout import folds_path, predictions_path, read_folds, read_predictions
from pipeline.predict import report_oof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--folds", default=None, help="comma-separated fold numbers (default: every fold in the file)")
    ap.add_argument("--predictions", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cfg = load_config(args.config)
    preds = read_predictions(args.predictions or predictions_path(cfg, "oof"))
    folds = read_folds(folds_path(cfg))
    wanted = [int(f) for f in args.folds.split(",")] if args.folds else sorted(preds.fold.unique())
    folds = folds[folds.fold.isin(wanted)]
    preds = preds[preds.fold.isin(wanted)]
    views = sorted(preds.tta.unique(), key=lambda v: (v != "none", v))
    print(f"{cfg.run}: folds {wanted}, {len(folds)} images, views {views}")
    report_oof(cfg, load_dataset(cfg.data, "train"), folds, preds, views)


if __name__ == "__main__":
    main()
