import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import EFFDET_TINY, FRCNN_TINY, REPO, tiny_config, write_config
from pipeline import checkpoint, folds as folds_stage, train
from pipeline.engine import NonFiniteLossError
from pipeline.layout import fold_dir, folds_path, read_folds, read_predictions, run_dir


def prepared(tmp_path, tiny_data, **kw):
    cfg = tiny_config(tmp_path, tiny_data, **kw)
    folds_stage.run(cfg)
    return cfg


def run_cli(args, env=None, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_fold_all_writes_the_run_directory_without_leakage(tmp_path, tiny_data, capsys):
    cfg = prepared(tmp_path, tiny_data)
    train.run(cfg, "all", resume=False)
    folds = read_folds(folds_path(cfg))
    for k in (0, 1):
        d = run_dir(cfg) / f"fold{k}"
        for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "oof.parquet"):
            assert (d / name).exists(), name
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1] and all("val_score" in r for r in rows)
        assert not any("val_score_thr" in r for r in rows)  # COCO mAP ranks boxes: every box is scored
        oof = read_predictions(d / "oof.parquet")
        # out of fold: only this fold's images, predicted by this fold's model
        assert set(oof.image_id) <= set(folds.image_id[folds.fold == k])
        assert (oof.fold == k).all() and (oof.model == "tiny").all()
        assert (oof.x2 <= 128).all() and (oof.y2 <= 128).all() and (oof.x1 >= 0).all()
    assert "pooled OOF coco_map" in capsys.readouterr().out


@pytest.mark.slow
def test_existing_run_needs_resume_and_finished_fold_is_skipped(tmp_path, tiny_data, capsys):
    cfg = prepared(tmp_path, tiny_data, train={"epochs": 1})
    train.run(cfg, "0", resume=False)
    with pytest.raises(train.TrainError, match="--resume"):
        train.run(cfg, "0", resume=False)
    train.run(cfg, "0", resume=True)
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_kill_ends_with_the_same_weights(tmp_path, tiny_data):
    straight = write_config(tmp_path / "a", tiny_data, train={"epochs": 3})
    killed = write_config(tmp_path / "b", tiny_data, train={"epochs": 3})
    for path in (straight, killed):
        assert folds_stage.main(["--config", str(path)]) == 0
    run_cli(["--config", str(straight), "--fold", "0"])
    # global step 5 is inside epoch 2 (2 steps per epoch): the process dies there, like a killed job
    died = run_cli(["--config", str(killed), "--fold", "0"], env={"PIPELINE_TEST_KILL_AT_STEP": "5"}, check=False)
    assert died.returncode == 137
    assert not (tmp_path / "b/runs/demo/tiny/fold0/oof.parquet").exists()
    resumed = run_cli(["--config", str(killed), "--fold", "0", "--resume"])
    assert "resuming after epoch 1" in resumed.stdout
    a = checkpoint.load(tmp_path / "a/runs/demo/tiny/fold0/last.pt")
    b = checkpoint.load(tmp_path / "b/runs/demo/tiny/fold0/last.pt")
    assert a["global_step"] == b["global_step"] == 6
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    oof_a = read_predictions(tmp_path / "a/runs/demo/tiny/fold0/oof.parquet")
    oof_b = read_predictions(tmp_path / "b/runs/demo/tiny/fold0/oof.parquet")
    pd.testing.assert_frame_equal(oof_a, oof_b)


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step_and_keeps_best(tmp_path, tiny_data, monkeypatch):
    cfg = prepared(tmp_path, tiny_data, train={"epochs": 3})
    from pipeline.models.base import Detector

    real = Detector.forward_loss
    calls = {"n": 0}

    def flaky(self, images, targets):
        calls["n"] += 1
        losses = real(self, images, targets)
        if calls["n"] == 3:  # the first step of epoch 1
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(Detector, "forward_loss", flaky)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 0"):
        train.run(cfg, "0", resume=False)
    best = checkpoint.load(run_dir(cfg) / "fold0" / "best.pt")
    assert best["epoch"] == 0


@pytest.mark.slow
def test_efficientdet_trains_a_fold(tmp_path, tiny_data):
    cfg = prepared(tmp_path, tiny_data, model=EFFDET_TINY, train={"epochs": 1})
    summary = train.train_fold(cfg, __import__("pipeline.data", fromlist=["x"]).load_dataset(cfg.data),
                               read_folds(folds_path(cfg)), 1)
    assert summary["fold"] == 1 and (run_dir(cfg) / "fold1" / "oof.parquet").exists()


@pytest.mark.slow
def test_ddp_with_gloo_on_two_processes(tmp_path, tiny_data):
    path = write_config(tmp_path, tiny_data, train={"epochs": 1})
    assert folds_stage.main(["--config", str(path)]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pipeline.train", "--config", str(path), "--fold", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = tmp_path / "runs/demo/tiny/fold0"
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes
    folds = read_folds(tmp_path / "folds/demo_k2_s0.csv")
    oof = read_predictions(d / "oof.parquet")
    # predictions gathered from both ranks: every validation image with a box is there
    assert set(oof.image_id) <= set(folds.image_id[folds.fold == 0])
    assert oof.image_id.nunique() >= 0.8 * (folds.fold == 0).sum()
    summary = json.loads([line for line in proc.stdout.splitlines() if '"oof"' in line][-1])
    assert summary["fold"] == 0


# Loaded by every process of the run below through PYTHONPATH: rank 1 alone gets a NaN loss at its third step.
NAN_ON_RANK_1 = """
import importlib.abc, os, sys

class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pipeline.train":
            sys.meta_path.remove(self)
            import pipeline.engine as engine
            real, calls = engine.LossModule.forward, []

            def forward(module, images, targets):
                out = real(module, images, targets)
                calls.append(1)
                return {**out, "loss": out["loss"] * float("nan")} if len(calls) == 3 else out
            engine.LossModule.forward = forward
        return None

if os.environ.get("RANK") == "1":
    sys.meta_path.insert(0, _Patch())
"""


@pytest.mark.slow
def test_a_nan_loss_on_one_ddp_rank_stops_every_rank_naming_the_step(tmp_path, tiny_data):
    # the gradients of the NaN step reach every rank through the all-reduce: each names its first non-finite step
    # and exits, torchrun ends the job (no rank left waiting in a collective), and best.pt stays the last good one
    path = write_config(tmp_path, tiny_data, train={"epochs": 2, "batch_size": 2})
    assert folds_stage.main(["--config", str(path)]) == 0
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pipeline.train", "--config", str(path), "--fold", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    # rank 1 names the step it broke; rank 0 its next one, unless torchrun stopped it first (either may print first)
    named = [line for line in proc.stderr.splitlines() if line.startswith("error: loss is nan")]
    assert any("(global step 2)" in line for line in named), proc.stderr[-3000:]
    assert all("(global step 2)" in line or "(global step 3)" in line for line in named), named
    d = tmp_path / "runs/demo/tiny/fold0"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and checkpoint.load(d / "best.pt")["epoch"] == 0


@pytest.mark.slow
def test_resume_accepts_changed_prediction_settings_but_not_a_changed_model(tmp_path, tiny_data, capsys):
    cfg = prepared(tmp_path, tiny_data, train={"epochs": 1})
    train.run(cfg, "0", resume=False)
    changed = cfg.model_copy(deep=True)
    changed.predict.tta = ["none", "vflip"]
    changed.submission.coord_decimals = 2
    train.run(changed, "0", resume=True)
    assert "nothing to do" in capsys.readouterr().out
    other = cfg.model_copy(deep=True)
    other.model.max_detections = 50
    with pytest.raises(train.TrainError, match="config differs"):
        train.run(other, "0", resume=True)


@pytest.mark.slow
def test_a_lower_is_better_metric_keeps_the_lowest_scoring_checkpoint(tmp_path, tiny_data, mean_confidence_metric):
    cfg = prepared(tmp_path, tiny_data, metric="mean_confidence", train={"epochs": 3, "ema": False})
    train.run(cfg, "0", resume=False)
    out = fold_dir(cfg, 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val_score"] for r in rows]
    assert len(set(scores)) == 3, "the toy metric must move between epochs for this test to mean anything"
    lowest = min(range(3), key=scores.__getitem__)
    best = checkpoint.load(out / "best.pt")
    assert best["epoch"] == lowest and best["score"] == pytest.approx(min(scores))
    assert rows[-1]["best_score"] == pytest.approx(min(scores)) and rows[-1]["best_epoch"] == lowest


@pytest.mark.slow
def test_a_thresholded_metric_validates_each_epoch_at_its_best_confidence_threshold(tmp_path, tiny_data, capsys):
    from pipeline.data import load_dataset
    from pipeline.metrics import evaluate

    grid = [0.05, 0.1, 0.2, 0.3]
    cfg = prepared(tmp_path, tiny_data, metric="gwd", train={"epochs": 2, "ema": False},
                   ensemble={"tune": {"score_thr": grid}})
    train.run(cfg, "0", resume=False)
    out = fold_dir(cfg, 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_score_thr"] in [0.0, *grid] for r in rows)
    best = checkpoint.load(out / "best.pt")
    t = rows[best["epoch"]]["val_score_thr"]
    oof = read_predictions(out / "oof.parquet")  # the best checkpoint's predictions, every box
    table, folds = load_dataset(cfg.data, "train"), read_folds(folds_path(cfg))
    val_ids = folds.image_id[folds.fold == 0].tolist()
    assert best["score"] == pytest.approx(evaluate("gwd", table, oof[oof.score >= t], val_ids).score)
    assert best["score"] == pytest.approx(max(evaluate("gwd", table, oof[oof.score >= u], val_ids).score
                                              for u in [0.0, *grid]))
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["oof_score_thr"] == t


def test_scheduler_warms_up_linearly_then_follows_the_cosine(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, train={"epochs": 4, "warmup_epochs": 1, "lr": 0.1, "min_lr_ratio": 0.1})
    optimizer = train.build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    scheduler = train.build_scheduler(optimizer, cfg.train, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert lrs[10] == pytest.approx(0.1) and lrs[-1] > 0.01 and lrs[-1] < lrs[20] < lrs[10]
    # no weight decay on biases and norms (1-d tensors)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.train.weight_decay, 0.0]


def test_resume_fingerprint_ignores_epochs_workers_and_progress_only(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    saved = train.config_fingerprint(cfg)
    same = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 9, "num_workers": 3,
                                                                        "progress": True})})
    assert train.same_training(saved, same)
    assert train.same_training(saved, cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"tta": ["hflip"]})}))
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})})
    assert not train.same_training(saved, changed)


def test_a_checkpoint_older_than_a_new_setting_still_resumes(tmp_path, tiny_data):
    # a release that adds a config field must not orphan runs whose checkpoints predate it (at its default value)
    cfg = tiny_config(tmp_path, tiny_data)
    saved = train.config_fingerprint(cfg)
    del saved["train"]["clip_grad_norm"]
    del saved["pseudo"]
    assert train.same_training(saved, cfg)
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"clip_grad_norm": 1.0})})
    assert not train.same_training(saved, changed)


@pytest.mark.slow
def test_multiscale_letterbox_training_resumes_to_the_same_weights(tmp_path, tiny_data):
    kw = dict(model={**FRCNN_TINY, "resize": "letterbox"}, train={"epochs": 3, "multiscale": [96, 128]})
    straight, killed = write_config(tmp_path / "a", tiny_data, **kw), write_config(tmp_path / "b", tiny_data, **kw)
    for path in (straight, killed):
        assert folds_stage.main(["--config", str(path)]) == 0
    run_cli(["--config", str(straight), "--fold", "0"])
    died = run_cli(["--config", str(killed), "--fold", "0"], env={"PIPELINE_TEST_KILL_AT_STEP": "5"}, check=False)
    assert died.returncode == 137
    run_cli(["--config", str(killed), "--fold", "0", "--resume"])
    a = checkpoint.load(tmp_path / "a/runs/demo/tiny/fold0/last.pt")["model"]
    b = checkpoint.load(tmp_path / "b/runs/demo/tiny/fold0/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the sides drawn after a resume must be the same"


@pytest.mark.slow
def test_multiscale_sides_a_model_refuses_stop_training_early(tmp_path, tiny_data):
    cfg = prepared(tmp_path, tiny_data, train={"multiscale": [100]})
    with pytest.raises(train.TrainError, match=r"train.multiscale \[100\]"):
        train.run(cfg, "0", resume=False)


def test_resume_fingerprint_ignores_train_compile(tmp_path, tiny_data):
    # the same network compiled or not: a run may resume with train.compile switched either way
    cfg = tiny_config(tmp_path, tiny_data)
    compiled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": "max-autotune",
                                                                            "compile_backend": "eager"})})
    assert train.same_training(train.config_fingerprint(cfg), compiled)
    assert train.same_training(train.config_fingerprint(compiled), cfg)


@pytest.mark.slow
def test_a_compiled_fold_logs_its_first_step_and_resumes_without_compile(tmp_path, tiny_data, capsys):
    cfg = prepared(tmp_path, tiny_data, model=EFFDET_TINY,
                   train={"epochs": 1, "compile": True, "compile_backend": "eager", "ema": False})
    train.run(cfg, "0", resume=False)
    assert "fold 0: torch.compile of net (eager, mode default)" in capsys.readouterr().out
    log = run_dir(cfg) / "fold0" / "metrics.jsonl"
    first = json.loads(log.read_text().splitlines()[0])
    assert first["first_step_s"] > 0
    eager = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2, "compile": False})})
    train.run(eager, "0", resume=True)
    assert "resuming after epoch 0" in capsys.readouterr().out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and "first_step_s" not in rows[1]
