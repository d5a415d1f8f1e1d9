"""Stage: the ensemble's submission from an inference bundle, offline (a Kaggle code competition's notebook).

    python -m pipeline.infer --bundle DIR --images TEST_DIR --out submission.csv [--sample-submission F]

Reads ``DIR/manifest.json`` (written by :mod:`pipeline.bundle`), checks every config and weight file against its
sha256, loads each member x fold model once, then streams the test images in chunks: every member x fold x TTA
view predicts the chunk (:func:`pipeline.engine.predict_with_views`: batched, on the GPU when there is one), the
chunk is fused with the bundled WBF parameters exactly as :mod:`pipeline.ensemble` fuses test predictions (one set
per member, fold and view, each with its member's weight, then the tuned score threshold), and only the fused rows
are kept, cut to ``submission.max_boxes_per_image`` per image as :mod:`pipeline.submission` cuts them. WBF fuses
and the cut keeps image by image, so chunks change the memory, not the result: one chunk's raw predictions at a
time (``--chunk-size``, rounded up to a multiple of the members' batch sizes so batches are the ones the pipeline's
own prediction ran). The file is written and validated by :func:`pipeline.formats.write_submission`, as
:mod:`pipeline.submission` writes it.

Image ids are the file names' stems (Kaggle's convention). With ``--sample-submission`` the file has exactly the
sample's ids: each must have an image; images the sample does not list are skipped and counted.

No MLflow and no network: the bundle's wheels and what a Kaggle GPU image ships (torch, torchvision, numpy, ...;
``pipeline.bundle.KAGGLE_IMAGE``) are all it imports; ``pipeline.bundle`` checks that list against a real import
of this module before it packs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.data import DataError
from pipeline.data.images import probe_image
from pipeline.data.readers._common import ImageIndex, require_dir
from pipeline.dataset import Record
from pipeline.engine import Precision, load_model_checkpoint, predict_with_views, resolve_precision
from pipeline.formats import SubmissionError, content_hash, get_format, keep_top_boxes, write_submission
from pipeline.fusion import fuse_tuned
from pipeline.layout import empty_predictions, normalise_predictions
from pipeline.models import Detector
from pipeline.tta import check_views

# The bundle's table of contents, as pipeline.bundle writes it (stages share files, not code).
MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
DEFAULT_CHUNK = 128  # images per chunk: raw predictions of members x folds x views x chunk images in memory


class InferError(RuntimeError):
    pass


@dataclass
class Member:
    name: str
    cfg: ExperimentConfig
    views: list[str]
    models: dict[int, Detector]  # fold -> model, in the bundle's fold order
    precision: Precision


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise InferError(f"{path} not found: --bundle must be a folder written by python -m pipeline.bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InferError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise InferError(f"{path}: bundle format {manifest.get('bundle_format')!r}, this pipeline reads "
                         f"{BUNDLE_FORMAT}: rebuild the bundle with this version")
    return manifest


def verify_files(bundle: Path, manifest: dict) -> None:
    """Every config and weight file is the one the manifest lists (the wheels were pip's to check)."""
    for rel, entry in manifest["files"].items():
        if not rel.startswith(("configs/", "weights/")):
            continue
        path = bundle / rel
        if not path.is_file():
            raise InferError(f"{path}: listed in {MANIFEST} but missing from the bundle")
        if content_hash(path) != entry["sha256"]:
            raise InferError(f"{path}: its sha256 differs from {MANIFEST}'s: the file changed after the bundle was "
                             "written (an interrupted upload?); rebuild or re-upload the bundle")


def list_test_images(images: Path, sample_ids: list[str] | None, sample: Path | None) -> list[tuple[str, Path]]:
    """(image id, file) of every image to predict, in file-name order (as the dataset readers list them)."""
    index = ImageIndex(require_dir(images, "test image"))
    index.check_unique_stems()
    found = {stem: paths[0] for stem, paths in index.by_stem.items()}
    if sample_ids is None:
        if not found:
            raise InferError(f"{images}: no image files")
        return list(found.items())
    missing = [i for i in sample_ids if i not in found]
    if missing:
        raise InferError(f"{sample}: {len(missing)} image id(s) have no image in {images}, e.g. {missing[:5]} "
                         f"(expected e.g. {images / missing[0]}.jpg)")
    wanted = set(sample_ids)
    skipped = len(found) - len(wanted)
    if skipped:
        print(f"skipped {skipped} image(s) of {images} that {sample} does not list", file=sys.stderr)
    return [(i, p) for i, p in found.items() if i in wanted]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferError(f"--device {name}: no CUDA device is visible (torch {torch.__version__})")
    return torch.device(name)


def load_members(bundle: Path, manifest: dict, device: torch.device, batch_size: int | None,
                 num_workers: int | None) -> list[Member]:
    """Every member's resolved config and fold models, on ``device``, in the manifest's order."""
    members, n_classes = [], len(manifest["classes"])
    for entry in manifest["members"]:
        cfg = load_config(bundle / entry["config"])
        train = {"progress": False} | ({} if num_workers is None else {"num_workers": num_workers})
        predict = {} if batch_size is None else {"batch_size": batch_size}
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train),
                                     "predict": cfg.predict.model_copy(update=predict)})
        models = {}
        for fold in entry["folds"]:
            model = load_model_checkpoint(bundle / fold["weights"], cfg.model, n_classes, device)
            check_views(model, entry["views"], cfg.model.image_size)
            models[int(fold["fold"])] = model
        members.append(Member(entry["name"], cfg, list(entry["views"]), models, resolve_precision(cfg.train, device)))
    return members


def chunk_length(chunk_size: int, members: list[Member]) -> int:
    """``chunk_size`` rounded up to a multiple of every member's batch size: the batches, and so the numbers, are
    those of one pass over all images."""
    step = math.lcm(*(m.cfg.predict.batch_size for m in members))
    return max(step, -(-chunk_size // step) * step)


def predict_chunk(members: list[Member], records: list[Record]) -> pd.DataFrame:
    """Raw predictions of ``records`` by every member x fold x view, concatenated in that order."""
    frames = [predict_with_views(model, records, m.cfg, m.views, fold, m.precision)
              for m in members for fold, model in m.models.items()]
    return pd.concat(frames, ignore_index=True) if frames else empty_predictions()


def fuse_chunk(preds: pd.DataFrame, sizes: dict[str, tuple[int, int]], manifest: dict) -> pd.DataFrame:
    """The ensemble's test fusion (pipeline.ensemble.test_fusion): sets (member, fold, view) in member, fold,
    view order, fused by :func:`pipeline.fusion.fuse_tuned` with the tuned rule, weights and score threshold."""
    params = {k: v for k, v in manifest["fusion"].items() if k != "backend"}
    sets = [(m["name"], int(f["fold"]), v) for m in manifest["members"] for f in m["folds"] for v in m["views"]]
    return fuse_tuned(preds, sizes, params, sets, ("model", "fold", "tta"), name=manifest["ensemble"],
                      backend=manifest["fusion"]["backend"])


def empty_record(image_id: str, path: Path, size: tuple[int, int]) -> Record:
    return Record(image_id, str(path), int(size[0]), int(size[1]), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))


@dataclass
class InferOptions:
    chunk_size: int = DEFAULT_CHUNK
    device: str = "auto"
    batch_size: int | None = None  # None: each member's predict.batch_size
    num_workers: int | None = None  # None: each member's train.num_workers
    progress: bool = True
    verify: bool = True


def run(bundle: Path, images: Path, out: Path, sample: Path | None = None, opts: InferOptions | None = None) -> dict:
    """Write and validate the submission at ``out``; returns its path, the fused table and the timings."""
    opts, bundle, t0 = opts or InferOptions(), Path(bundle), time.perf_counter()
    manifest = read_manifest(bundle)
    if opts.verify:
        verify_files(bundle, manifest)
    fmt = manifest["submission"]["format"]
    sample_ids = get_format(fmt).read_sample(Path(sample)).ids if sample else None
    todo = list_test_images(Path(images), sample_ids, sample)
    device = pick_device(opts.device)
    members = load_members(bundle, manifest, device, opts.batch_size, opts.num_workers)
    step = chunk_length(opts.chunk_size, members)
    n_models = sum(len(m.models) for m in members)
    print(f"{manifest['ensemble']}: {len(members)} members, {n_models} fold models on {device}; {len(todo)} images "
          f"in chunks of {step}")
    t_loaded, frames, sizes = time.perf_counter(), [], {}
    with tqdm(total=len(todo), unit="img", desc="infer", disable=not opts.progress) as bar:
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            part_sizes = {image_id: probe_image(path) for image_id, path in part}  # header only, EXIF applied
            sizes.update(part_sizes)
            records = [empty_record(image_id, path, part_sizes[image_id]) for image_id, path in part]
            fused = fuse_chunk(predict_chunk(members, records), part_sizes, manifest)
            frames.append(keep_top_boxes(fused, manifest["submission"]["max_boxes_per_image"]))
            bar.update(len(part))
    frames = [f for f in frames if len(f)]
    fused = normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()
    t_predicted = time.perf_counter()
    path = write_submission(fused, [i for i, _ in todo], out, fmt, manifest["classes"], sample_submission=sample,
                            image_sizes=sizes, coord_decimals=manifest["submission"]["coord_decimals"])
    per_image = (t_predicted - t_loaded) / max(len(todo), 1)
    print(f"wrote {path} (validated): {len(todo)} images, {len(fused)} boxes, {Path(path).stat().st_size} bytes; "
          f"{per_image * 1000:.1f} ms per image ({n_models} models x views), models loaded in "
          f"{t_loaded - t0:.1f} s, {time.perf_counter() - t0:.1f} s in all")
    return {"submission": Path(path), "fused": fused, "images": len(todo), "seconds_per_image": per_image,
            "device": str(device), "chunk": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict test images with a bundle and write the submission.")
    parser.add_argument("--bundle", type=Path, required=True, help="folder written by python -m pipeline.bundle")
    parser.add_argument("--images", type=Path, required=True, help="folder of test images (ids: file stems)")
    parser.add_argument("--out", type=Path, required=True, help="the submission file to write")
    parser.add_argument("--sample-submission", type=Path, default=None, help="fixes the ids, their order and header")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="images predicted and fused at a time")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="override every member's predict.batch_size")
    parser.add_argument("--num-workers", type=int, default=None, help="image-loading workers per model pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of configs and weights")
    args = parser.parse_args(argv)
    if args.chunk_size < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--chunk-size and --batch-size must be at least 1")
    opts = InferOptions(chunk_size=args.chunk_size, device=args.device, batch_size=args.batch_size,
                        num_workers=args.num_workers, progress=not args.no_progress, verify=not args.no_verify)
    try:
        run(args.bundle, args.images, args.out, args.sample_submission, opts)
    except (InferError, ConfigError, DataError, SubmissionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
