"""`make submission`: the whole chain for one config folder, each stage through its own entry point.

    python -m pipeline.submit --config-dir configs/demo [--set train.epochs=2]

folds (base.yaml) → train every member of ensemble.yaml on every fold (resuming what exists) → predict OOF and
test with the member's TTA views → ensemble tuned on OOF → validated submission in submissions/ → the ledger;
when the test split has labels (BCCD's published test split, the demo's test_labels.csv), the submission is
scored against them as the local leaderboard. Overrides given with --set apply to every stage.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import ensemble, folds, predict, train
from pipeline.config import ConfigError, load_config


def run(config_dir: Path, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    ensemble_path = config_dir / "ensemble.yaml"
    ens_cfg = load_config(ensemble_path, overrides)
    folds.run(load_config(config_dir / "base.yaml", overrides))
    for member in ens_cfg.ensemble.members:
        cfg = load_config(config_dir / member.config, overrides)
        print(f"\n=== {member.config}: train {cfg.folds.k} folds ===", flush=True)
        train.run(cfg, "all", resume=True)
        for split in ("oof", "test"):
            predict.run(cfg, split, list(cfg.predict.tta))
    print("\n=== ensemble ===", flush=True)
    result = ensemble.run(ensemble_path, overrides)
    if result.get("submission") and result.get("test_labelled"):
        # the test split carries labels (a local hidden split): score the file and record it as its public LB
        from pipeline.leaderboard import score

        lb = score(Path(result["submission"]).name, config=ensemble_path, overrides=overrides,
                   ledger_dir=ens_cfg.submission.dir)
        print(f"local leaderboard ({ens_cfg.metric} on the hidden test labels): {lb:.4f}  (OOF CV {result['oof']:.4f})")
    print(f"\nsubmission chain done in {time.perf_counter() - t0:.0f} s: {result.get('submission')}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=Path("configs/demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        run(args.config_dir, args.overrides)
    except (ConfigError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
