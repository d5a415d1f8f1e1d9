"""Dataset command line.

    python -m pipeline.data check --config configs/bccd/base.yaml [--set key=value ...] [--split train|test]
                                  [--verify]

``check`` loads the split exactly as training will, then prints a summary (images, boxes per class and source,
image and box sizes) and every repair made. Bad input exits with code 1 and the error message, no traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from pipeline.config import ConfigError, add_config_args, load_config
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The summary lists every repair; the per-repair warnings would only repeat them on stderr.
    logging.getLogger("pipeline.data.table").setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config, args.overrides)
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
