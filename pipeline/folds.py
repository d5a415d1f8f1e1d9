"""Stage 1: the fold split, the foundation of every CV score.

    python -m pipeline.folds --config configs/demo/base.yaml [--force]

Writes ``folds/<dataset>_k<K>_s<seed>.csv`` (image_id, fold) with scikit-learn's StratifiedGroupKFold, stratified
on source x box-count bin, grouped on the optional ``group`` column (patient, video, ...) so that a group never
crosses folds. Images without boxes are part of the split (they are scored). The same inputs give the same file;
replacing an existing, different split needs ``--force`` and reports how many images change fold.

    python -m pipeline.folds export --config configs/demo/base.yaml --to yolo|coco DIR

writes the same split in the layout another tool trains from (:mod:`pipeline.external`), so a model trained
there (Ultralytics, MMDetection, detectron2) joins the ensemble on exactly these folds.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import AnnotationTable, DataError, load_dataset
from pipeline.external import EXPORTERS, ExternalError
from pipeline.layout import FoldsError, folds_path, read_folds, write_folds_file
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)


def strata(table: AnnotationTable, box_count_bins: list[int]) -> pd.Series:
    """Per image: "<source>|<box-count bin>", the label StratifiedGroupKFold balances across folds."""
    counts = table.boxes.groupby("image_id").size().reindex(table.images.image_id, fill_value=0)
    bins = np.digitize(counts.to_numpy(), np.asarray(box_count_bins[1:]), right=False)
    return table.images.source.str.cat(pd.Series(bins, index=table.images.index).astype(str), sep="|")


def make_folds(table: AnnotationTable, k: int, seed: int, box_count_bins: list[int]) -> pd.DataFrame:
    """image_id -> fold for every image of ``table``; deterministic for the same table, k and seed."""
    images = table.images.sort_values("image_id").reset_index(drop=True)
    if len(images) < k:
        raise FoldsError(f"{len(images)} images cannot make {k} folds")
    labels = strata(AnnotationTable(images, table.boxes, table.classes), box_count_bins)
    # A stratum with fewer images than folds cannot be spread over them: pool the rare ones.
    labels = labels.where(labels.map(labels.value_counts()) >= k, "rare")
    groups = images.group.where(images.group != "", "img:" + images.image_id)
    if groups.nunique() < k:
        raise FoldsError(f"{groups.nunique()} groups cannot make {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(images), -1, dtype=np.int64)
    for f, (_, val_idx) in enumerate(splitter.split(images, labels, groups)):
        fold[val_idx] = f
    return pd.DataFrame({"image_id": images.image_id, "fold": fold})


def balance_table(table: AnnotationTable, folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: images, empty images, boxes, then images per source and boxes per class."""
    fold_of = folds.set_index("image_id").fold
    images = table.images.assign(fold=table.images.image_id.map(fold_of))
    boxes = table.boxes.assign(fold=table.boxes.image_id.map(fold_of))
    per_image = boxes.groupby("image_id").size()
    images["n_boxes"] = images.image_id.map(per_image).fillna(0).astype(int)
    out = images.groupby("fold").agg(images=("image_id", "size"), empty=("n_boxes", lambda s: int((s == 0).sum())))
    out["boxes"] = images.groupby("fold").n_boxes.sum()
    for source, count in images.groupby(["fold", "source"]).size().unstack(fill_value=0).items():
        out[f"src:{source or '-'}"] = count
    names = dict(enumerate(table.classes))
    per_class = boxes.groupby(["fold", "label"]).size().unstack(fill_value=0)
    for label, count in per_class.items():
        out[f"cls:{names[label]}"] = count
    return out.fillna(0).astype(int)


def describe_change(old: pd.DataFrame, new: pd.DataFrame) -> str:
    merged = old.merge(new, on="image_id", how="outer", suffixes=("_old", "_new"), indicator=True)
    added = int((merged._merge == "right_only").sum())
    removed = int((merged._merge == "left_only").sum())
    both = merged[merged._merge == "both"]
    moved = int((both.fold_old != both.fold_new).sum())
    return f"{moved} images change fold, {added} added, {removed} removed"


def write_folds(folds: pd.DataFrame, path: Path, force: bool) -> str:
    """Write ``folds`` to ``path``; refuse to replace a different split unless ``force``. Returns what happened."""
    if path.exists():
        old = read_folds(path)
        if old.sort_values("image_id").reset_index(drop=True).equals(folds):
            return f"{path} is up to date (same split)"
        change = describe_change(old, folds)
        if not force:
            raise FoldsError(f"{path} holds a different split ({change}); pass --force to replace it")
        write_folds_file(folds, path)
        return f"replaced {path}: {change}"
    write_folds_file(folds, path)
    return f"wrote {path}"


def run(cfg: ExperimentConfig, force: bool = False) -> tuple[Path, pd.DataFrame]:
    table = load_dataset(cfg.data, "train")
    folds = make_folds(table, cfg.folds.k, cfg.folds.seed, cfg.folds.box_count_bins)
    path = folds_path(cfg)
    message = write_folds(folds, path, force)
    balance = balance_table(table, folds)
    print(message)
    print(f"{len(folds)} images, {table.images.group.ne('').sum()} with a group, k={cfg.folds.k}, seed={cfg.folds.seed}")
    print(balance.to_string())
    if cfg.tracking.enabled:
        log_folds(cfg, path, balance, n_images=len(folds))
    return path, balance


def log_folds(cfg: ExperimentConfig, path: Path, balance: pd.DataFrame, n_images: int) -> str | None:
    """MLflow: k, seed, the folds file and the per-fold balance table as an artifact. Returns the run id."""
    k, seed = cfg.folds.k, cfg.folds.seed
    with stage_run(cfg, "folds", name=f"folds-k{k}-s{seed}", fallback_dir=cfg.folds.dir) as tracker:
        tracker.log_params({"folds.k": k, "folds.seed": seed, "folds.file": str(path), "data.name": cfg.data.name})
        tracker.set_tags({"pipeline.folds_file": str(path)})
        tracker.log_metrics({"n_images": n_images})
        tracker.log_dict(balance, "fold_balance.csv")
        return tracker.run_id


def export(cfg: ExperimentConfig, to: str, out: Path) -> list[Path]:
    """The folds file's split written in another tool's layout (``pipeline.external``), test split included."""
    train = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    test = load_dataset(cfg.data, "test")
    missing = set(folds.image_id) - set(train.images.image_id)
    if missing:
        raise FoldsError(f"{folds_path(cfg)} names images the dataset lacks, e.g. {sorted(missing)[:3]}")
    written = EXPORTERS[to](train, folds, out, test)
    kind = {"yolo": "dataset YAML", "coco": "COCO JSON"}[to]  # the files a tool is pointed at (YOLO: + lists, links)
    print(f"exported {folds.fold.nunique()} folds of {len(folds)} images in the {to} layout to {out} "
          f"({len(written)} {kind} files)")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exporting = bool(argv) and argv[0] == "export"
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.folds" + (" export" if exporting else ""),
        usage=None if exporting else "%(prog)s [-h] [--config CONFIG] [--set KEY=VALUE] [--force]\n"
                                     "       %(prog)s export --to {coco,yolo} [--config CONFIG] [--set KEY=VALUE] OUT",
        description="Export the folds for a model trained in another tool." if exporting
        else "Write the k-fold split of the training images (`export` writes it in a YOLO or COCO layout).")
    add_config_args(parser, demo="base.yaml")
    if exporting:
        parser.add_argument("--to", choices=sorted(EXPORTERS), required=True)
        parser.add_argument("out", type=Path, help="output folder")
    else:
        parser.add_argument("--force", action="store_true", help="replace an existing, different split")
    args = parser.parse_args(argv[1:] if exporting else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if exporting:
            export(cfg, args.to, args.out)
        else:
            run(cfg, force=args.force)
    except (ConfigError, DataError, FoldsError, ExternalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
