"""Dataset command line.

    python -m pipeline.data check --config configs/bccd/base.yaml [--set key=value ...] [--split train|test]
                                  [--verify]

    python -m pipeline.data cache --config C [--size S] [--resize square|letterbox] [--split train|test]
                                  [--dir cache] [--workers N]

``check`` loads the split exactly as training will, then prints a summary (images, boxes per class and source,
image and box sizes) and every repair made. ``cache`` decodes every image of the split(s) once and stores it
resized to the model input S, a side or WIDTHxHEIGHT (default: the config's ``model.image_size``;
``pipeline.data.cache``): ``<dir>/<data.name>/<resize><S>/``,
``<dir>`` being ``--dir``, else the config's ``data.cache_dir``, else ``./cache``; run it again after images change and only those
are decoded again. Training and prediction read it when ``data.cache_dir`` is set and S is ``model.image_size``.
Bad input exits with code 1 and the error message, no traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, add_config_args, config_from_args, parse_size, size_text
from pipeline.data import load_dataset
from pipeline.data.summary import summarize
from pipeline.data.table import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load a dataset split, print its summary and every repair")
    add_config_args(check)
    check.add_argument("--split", choices=["train", "test"], default="train")
    check.add_argument("--verify", action="store_true", help="decode every image fully (slow), not just headers")
    check.add_argument("--max-repairs", type=int, default=50, help="repair lines to list (default 50)")
    cache = sub.add_parser("cache", help="decode every image once and store it resized to the model input")
    add_config_args(cache)
    cache.add_argument("--size", type=parse_size, default=None,
                       help="the model's input: a side, or WIDTHxHEIGHT (1280x736); default: model.image_size")
    cache.add_argument("--resize", choices=["square", "letterbox"], default=None,
                       help="default: the config's model.resize")
    cache.add_argument("--split", choices=["train", "test"], action="append", default=None,
                       help="default: train, and test when the dataset has one")
    cache.add_argument("--dir", type=Path, default=None, help="cache root (default: data.cache_dir, else ./cache)")
    cache.add_argument("--workers", type=int, default=None, help="decoding threads (default: every core)")
    return parser


def _cache(args: argparse.Namespace) -> int:
    from pipeline.data.cache import DEFAULT_CACHE_DIR, build_cache, cache_folder  # cv2/albumentations: only here

    cfg = config_from_args(args)
    resize, size = args.resize or cfg.model.resize, args.size or cfg.model.image_size
    folder = cache_folder(args.dir or cfg.data.cache_dir or DEFAULT_CACHE_DIR, cfg.data.name, size, resize)
    for split in args.split or ["train", "test"]:
        try:
            table = load_dataset(cfg.data, split)
        except DataError as exc:
            if args.split:  # asked for by name: an error; by default the test split may simply not exist
                raise
            print(f"{split}: not cached ({exc})")
            continue
        report = build_cache(table.images, folder, split, size, resize, args.workers)
        rate = report.decoded / report.seconds if report.decoded and report.seconds > 0 else 0.0
        print(f"{split}: {report.images} images at {resize} {size_text(size)} px, {report.decoded} decoded "
              f"({rate:.1f} images/s), {report.reused} reused, {report.channels} channel(s), "
              f"{report.bytes / 2**20:.1f} MiB in {report.path} ({report.seconds:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The summary lists every repair; the per-repair warnings would only repeat them on stderr.
    logging.getLogger("pipeline.data.table").setLevel(logging.ERROR)
    if args.command == "cache":
        try:
            return _cache(args)
        except (DataError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        cfg = config_from_args(args)
        start = time.perf_counter()
        table = load_dataset(cfg.data, args.split, verify_images=args.verify)
        seconds = time.perf_counter() - start
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    title = f"{cfg.data.name} ({cfg.data.format}, split {args.split})"
    print(summarize(table, title, args.max_repairs))
    print(f"loaded in {seconds:.2f} s{' (every image fully decoded)' if args.verify else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
