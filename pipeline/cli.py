"""One front door: ``pipeline <command> [args]`` runs ``python -m pipeline.<module> [args]``.

    pipeline folds                      # the embedded demo, or ./pipeline.yaml, when no --config is given
    pipeline train --fold 0 --config configs/bccd/frcnn.yaml
    pipeline submit --config-dir configs/bccd
    pipeline leaderboard show

Each command is its module's own ``main()``: same options, same exit codes. Modules are imported by name, only
the one asked for, so ``pipeline leaderboard show`` does not load torch.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, what it does); the chain's stages in order, then the tools around them
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("pipeline.data.__main__", "check the raw data: a summary and every repair made"),
    "folds": ("pipeline.folds", "write the k-fold split (export: in a YOLO or COCO layout)"),
    "train": ("pipeline.train", "train one fold (--fold K) or all (--fold all)"),
    "predict": ("pipeline.predict", "predict OOF or test images with every fold model and TTA views"),
    "ensemble": ("pipeline.ensemble", "tune the fusion on OOF, fuse OOF and test predictions"),
    "submission": ("pipeline.submission", "write the fused test predictions as a validated submission"),
    "pseudo": ("pipeline.pseudo", "a pseudo-label round from an ensemble (--round N)"),
    "submit": ("pipeline.submit", "the whole chain for a config folder (make submission)"),
    "leaderboard": ("pipeline.leaderboard", "the ledger: show | record | submit | sync | score | plot"),
    "bundle": ("pipeline.bundle", "pack the ensemble into an offline Kaggle bundle (code competitions)"),
    "infer": ("pipeline.infer", "the submission from a bundle, offline (inside a Kaggle notebook)"),
    "report": ("pipeline.report", "the ensemble's HTML error-analysis report"),
    "visualize": ("pipeline.visualize", "pictures: augmented samples, training curves, heat maps, predictions"),
    "tracking": ("pipeline.tracking", "replay a tracking fallback file into MLflow"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: pipeline <command> [--help] [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pipeline: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"pipeline {command}", *rest]  # argparse names the command in its usage and errors
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
