"""`make submission`: the whole chain for one config folder, each stage through its own entry point.

    python -m pipeline.submit --config-dir configs/demo [--set train.epochs=2]

folds (base.yaml) → train every member of ensemble.yaml on every fold (resuming what exists) → predict OOF and
test with the member's TTA views → ensemble tuned on OOF → validated submission in submissions/ → the ledger;
when the test split has labels (BCCD's published test split, the demo's test_labels.csv), the submission is
scored against them as the local leaderboard. Overrides given with --set apply to every stage.

The one module that imports stages: every other module talks to a stage only through its files.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import ensemble, folds, leaderboard, predict, submission, train
from pipeline.config import ConfigError, load_config
from pipeline.layout import FoldsError


def run(config_dir: Path, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    ens_cfg = load_config(config_dir / "ensemble.yaml", overrides)
    folds.run(load_config(config_dir / "base.yaml", overrides))
    for member in ens_cfg.ensemble.members:
        if member.config is None:  # predictions made by another tool: nothing to train or predict here
            continue
        cfg = ens_cfg.load_sibling(member.config)
        print(f"\n=== {member.config}: train {cfg.folds.k} folds ===", flush=True)
        train.run(cfg, "all", resume=True)
        for split in ("oof", "test"):
            predict.run(cfg, split, list(cfg.predict.tta))
    print("\n=== ensemble ===", flush=True)
    result = ensemble.run(ens_cfg)
    print("\n=== submission ===", flush=True)
    result |= submission.run(ens_cfg)
    if result["test_labelled"]:
        # the test split carries labels (a local hidden split): score the file and record it as its public LB
        lb = leaderboard.score(Path(result["submission"]).name, config=ens_cfg.source, overrides=overrides,
                               ledger_dir=ens_cfg.submission.dir)
        print(f"local leaderboard ({ens_cfg.metric} on the hidden test labels): {lb:.4f}  (OOF CV {result['oof']:.4f})")
    print(f"\nsubmission chain done in {time.perf_counter() - t0:.0f} s: {result['submission']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=Path("configs/demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        run(args.config_dir, args.overrides)
    except (ConfigError, FoldsError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
