"""pipeline.tracking: every stage helper against a real SQLite MLflow store, the fallback file when the store is
unusable, two processes writing at once, and the training-curves PNG."""
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from pipeline import tracking
from pipeline import ensemble as ensemble_stage, folds as folds_stage, predict as predict_stage, train
from pipeline.layout import run_dir
from pipeline.visualize import plot_training_curves
from pipeline.config import DataConfig, ExperimentConfig, FoldsConfig, TrackingConfig

mlflow = pytest.importorskip("mlflow")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module: the first use runs MLflow's migrations (seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with no warning given and no store marked dead."""
    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setattr(tracking, "_dead_uris", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_cfg(tmp_path: Path, uri: str | None, experiment: str, **tracking_kw) -> ExperimentConfig:
    return ExperimentConfig(
        experiment=experiment, run="frcnn", metric="gwd",
        data=DataConfig(name="toy", format="gwd_csv", root=tmp_path / "data"),
        runs_dir=tmp_path / "runs", folds=FoldsConfig(k=3, dir=tmp_path / "folds"),
        tracking=TrackingConfig(uri=uri, **tracking_kw),
    )


def client(uri: str):
    return mlflow.MlflowClient(uri)


def runs_of(uri: str, experiment: str, query: str = "") -> list:
    exp = client(uri).get_experiment_by_name(experiment)
    return client(uri).search_runs([exp.experiment_id], query) if exp else []


# --------------------------------------------------------------------------------------------- plain helpers


def test_flatten_params_nests_stringifies_and_truncates():
    flat = tracking.flatten_params({"train": {"lr": 0.001, "amp": "auto"}, "tta": ["none", "hflip"],
                                    "empty": {}, "long": "x" * 7000, "options": {"a": {"b": None}}})
    assert flat["train.lr"] == "0.001" and flat["train.amp"] == "auto"
    assert json.loads(flat["tta"]) == ["none", "hflip"]
    assert flat["empty"] == "{}" and flat["options.a.b"] == "None"
    assert len(flat["long"]) == tracking.MAX_PARAM_LENGTH and flat["long"].endswith("...")


def test_resolve_uri_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_uri(TrackingConfig()) == "http://example:5000"
    assert tracking.resolve_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_git_state_in_this_checkout():
    commit, dirty = tracking.git_state(str(Path(__file__).parent))
    if commit is None:
        pytest.skip("not a git checkout")
    assert len(commit) == 40 and isinstance(dirty, bool)


# --------------------------------------------------------------------------------------------- stage helpers


def test_train_folds_share_one_parent_with_params_metrics_and_artifacts(store, tmp_path):
    cfg = make_cfg(tmp_path, store, "train-exp")
    metrics_rows = [{"epoch": e, "train_loss": 1.0 / e, "val_score": 0.1 * e, "lr": 1e-3} for e in (1, 2, 3)]
    for fold in (0, 1):
        fold_dir = run_dir(cfg) / f"fold{fold}"
        fold_dir.mkdir(parents=True)
        jsonl = fold_dir / "metrics.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in metrics_rows))
        plot_training_curves(jsonl, fold_dir / "curves.png")
        with train.train_run(cfg, fold, fallback_dir=run_dir(cfg)) as tracker:
            assert tracker.active
            for row in metrics_rows:
                tracker.log_epoch(row)
            train.log_fold_result(tracker, fold_dir, {"score": 0.3, "epoch": 3})
    c = client(store)
    children = runs_of(store, "train-exp", "tags.`pipeline.stage` = 'train'")
    parents = runs_of(store, "train-exp", "tags.`pipeline.role` = 'parent'")
    assert len(children) == 2 and len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "frcnn" and parent.data.tags["pipeline.model_key"] == "train-exp/frcnn"
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["pipeline.model_key"] == "train-exp/frcnn"
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"]
        assert run.data.metrics["best_score"] == 0.3
        assert run.data.tags["pipeline.checkpoint.best"].endswith("best.pt")
        commit, dirty = tracking.git_state()
        if commit:
            assert run.data.tags["pipeline.git_commit"] == commit
            assert run.data.tags["pipeline.git_dirty"] == str(dirty).lower()
        history = c.get_metric_history(run.info.run_id, "val_score")
        assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"metrics.jsonl", "curves.png"} <= artifacts
    assert not (run_dir(cfg) / tracking.FALLBACK_NAME).exists()


def test_folds_predict_ensemble_and_submission_helpers(store, tmp_path):
    cfg = make_cfg(tmp_path, store, "stages-exp")
    balance = pd.DataFrame({"fold": [0, 1, 2], "images": [10, 10, 9], "boxes": [40, 38, 41]})
    # each stage logs its own run; this checks what each one writes to the store
    folds_id = folds_stage.log_folds(cfg, tmp_path / "folds.csv", balance, n_images=29)
    preds = pd.DataFrame({"image_id": [f"i{i}" for i in range(29)]})
    predict_id = predict_stage.log_prediction(cfg, "oof", ["none", "hflip"], tmp_path / "oof.parquet", preds,
                                        {"none": 0.58, "hflip": 0.57, "tta_wbf": 0.61})
    ensemble_id = ensemble_stage.log_ensemble(cfg, members=["frcnn", "effdet"],
                                        fusion_params={"iou_thr": 0.55, "skip_box_thr": 0.01},
                                        member_scores={"frcnn": 0.61, "effdet": 0.63}, ensemble_score=0.66,
                                        nested_score=0.645)
    meta = {"file": "20261123-101500_demo-ens.csv", "created": "2026-11-23T10:15:00", "ensemble": "ens",
            "members": ["frcnn", "effdet"], "cv": 0.66, "cv_nested": 0.645, "metric": "gwd", "format": "gwd",
            "content_hash": "abc123", "config": "configs/demo/ensemble.yaml", "mlflow_run_id": ensemble_id}
    sub_id = tracking.log_submission(meta, cfg.tracking, experiment=cfg.experiment, fallback_dir=tmp_path)
    assert None not in (folds_id, predict_id, ensemble_id, sub_id)
    c = client(store)

    folds = c.get_run(folds_id)
    assert folds.data.params["folds.k"] == "3" and folds.data.tags["pipeline.stage"] == "folds"
    balance_file = Path(c.download_artifacts(folds_id, "fold_balance.csv", str(tmp_path)))
    assert pd.read_csv(balance_file).equals(balance)

    predict = c.get_run(predict_id)
    assert json.loads(predict.data.params["predict.tta"]) == ["none", "hflip"]
    assert predict.data.metrics["oof_score"] == 0.61 and "mlflow.parentRunId" in predict.data.tags

    ens = c.get_run(ensemble_id)
    assert ens.data.params["fusion.iou_thr"] == "0.55"
    assert ens.data.metrics["oof_score"] == 0.66 and ens.data.metrics["oof_effdet"] == 0.63
    assert ens.data.metrics["oof_gain_over_best_member"] == pytest.approx(0.03)
    assert ens.data.metrics["oof_nested_score"] == 0.645

    sub = c.get_run(sub_id)
    assert sub.data.tags["pipeline.stage"] == "submission" and sub.data.tags["pipeline.submission_hash"] == "abc123"
    assert sub.data.tags["pipeline.source_run_id"] == ensemble_id
    assert sub.data.metrics["cv"] == 0.66 and sub.data.params["file"] == meta["file"]
    assert sub.data.metrics["cv_nested"] == 0.645
    # the same content registered again reuses its run; LB scores attach to it
    assert tracking.log_submission(meta, cfg.tracking, experiment=cfg.experiment, fallback_dir=tmp_path) == sub_id
    assert tracking.find_submission_run(cfg.tracking, "abc123") == sub_id
    assert tracking.log_lb_scores(cfg.tracking, sub_id, {"lb_public": 0.7, "lb_private": None})
    assert c.get_run(sub_id).data.metrics["lb_public"] == 0.7


def test_body_exception_propagates_and_marks_the_run_failed(store, tmp_path):
    cfg = make_cfg(tmp_path, store, "failing-exp")
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run(cfg, "train", name="boom") as tracker:
            run_id = tracker.run_id
            1 / 0
    assert client(store).get_run(run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_no_op(tmp_path):
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9", "off", enabled=False)
    with tracking.stage_run(cfg, "train") as tracker:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0})
    assert tracker.run_id is None and not run_dir(cfg).exists()


# --------------------------------------------------------------------------------------------- failure modes


def read_fallback(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["server_down", "uncreatable_sqlite", "bad_scheme", "mlflow_missing"])
def test_unusable_store_falls_back_quickly_with_one_warning(tmp_path, caplog, monkeypatch, kind):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    uri = {"server_down": "http://127.0.0.1:9",  # a closed local port
           "uncreatable_sqlite": f"sqlite:///{blocker}/sub/mlflow.db",
           "bad_scheme": "nosuchscheme://x",
           "mlflow_missing": f"sqlite:///{tmp_path / 'ok.db'}"}[kind]
    if kind == "mlflow_missing":
        monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the import failed
    cfg = make_cfg(tmp_path, uri, "fallback-exp")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    for fold in (0, 1):  # two runs in one process: still one warning
        with train.train_run(cfg, fold) as tracker:
            tracker.log_epoch({"epoch": 1, "train_loss": 0.5, "val_score": 0.2})
            tracker.log_dict({"fold": fold}, "info.json")
    # the store was found unusable up front (one warning), so no call waited on MLflow's own ~100 s of retries
    warnings = [r for r in caplog.records if r.name == "pipeline.tracking" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    rows = read_fallback(run_dir(cfg) / tracking.FALLBACK_NAME)
    assert {r["op"] for r in rows} >= {"start", "params", "metrics", "artifact", "end"}
    metrics = [r for r in rows if r["op"] == "metrics"]
    assert len(metrics) == 2 and metrics[0]["data"] == {"train_loss": 0.5, "val_score": 0.2}
    assert metrics[0]["step"] == 1 and metrics[0]["name"] == "fold0"
    params = {k: v for r in rows if r["op"] == "params" and r["name"] == "fold0" for k, v in r["data"].items()}
    assert params["train.lr"] == "0.001"
    assert [r["data"]["status"] for r in rows if r["op"] == "end"] == ["FINISHED", "FINISHED"]


def test_fallback_replays_into_a_store(store, tmp_path):
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9", "replay-exp")
    with train.train_run(cfg, 0) as tracker:
        tracker.log_epoch({"epoch": 1, "val_score": 0.25})
        tracker.log_epoch({"epoch": 2, "val_score": 0.5})
    fallback = run_dir(cfg) / tracking.FALLBACK_NAME
    assert tracking.replay_fallback(fallback, uri=store) == 1
    assert not fallback.exists() and fallback.with_name(fallback.name + ".replayed").exists()
    (run,) = runs_of(store, "replay-exp", "tags.`pipeline.stage` = 'train'")
    assert run.data.params["train.lr"] == "0.001" and run.info.status == "FINISHED"
    assert [m.value for m in client(store).get_metric_history(run.info.run_id, "val_score")] == [0.25, 0.5]
    assert runs_of(store, "replay-exp", "tags.`pipeline.role` = 'parent'")


def test_a_replay_into_a_store_that_is_still_down_fails_and_keeps_the_runs(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "http://127.0.0.1:9", "down-exp")
    with train.train_run(cfg, 0) as tracker:
        tracker.log_epoch({"epoch": 1, "val_score": 0.25})
    fallback = run_dir(cfg) / tracking.FALLBACK_NAME
    assert tracking.main(["replay", str(fallback), "--uri", "http://127.0.0.1:9"]) == 1
    assert "replayed 0 of 1 run(s)" in capsys.readouterr().out
    assert {r["op"] for r in read_fallback(fallback)} >= {"start", "metrics", "end"}  # nothing lost


# --------------------------------------------------------------------------------------------- concurrency

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.config import DataConfig, ExperimentConfig, TrackingConfig
    from pipeline.tracking import model_key, stage_run

    uri, root, fold = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cfg = ExperimentConfig(experiment="concurrent", run="m", runs_dir=root / "runs",
                           data=DataConfig(name="t", format="gwd_csv", root=root), tracking=TrackingConfig(uri=uri))
    with stage_run(cfg, "train", name="fold" + fold, parent=model_key(cfg)) as tracker:
        tracker.log_params({"fold": fold})
        for step in range(20):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "fold": float(fold)}, step=step)
    print(tracker.run_id, tracker.active)
""")


@pytest.mark.slow
def test_two_processes_write_one_sqlite_store_at_once(tmp_path):
    # a fresh store: both processes also race to create its tables (MLflow's migrations) and the parent run
    store = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store, str(tmp_path), str(fold)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for fold in (0, 1)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert out.split()[-1] == "True", err  # still logging to MLflow at the end: nothing fell back
    assert not (tmp_path / "runs" / "concurrent" / "m" / tracking.FALLBACK_NAME).exists()
    children = runs_of(store, "concurrent", "tags.`pipeline.stage` = 'train'")
    parents = runs_of(store, "concurrent", "tags.`pipeline.role` = 'parent'")
    assert len(children) == 2 and len(parents) == 1
    c = client(store)
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = c.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(20))


# --------------------------------------------------------------------------------------------- curves


def test_training_curves_png_tolerates_missing_keys(tmp_path):
    jsonl = tmp_path / "fold0" / "metrics.jsonl"
    jsonl.parent.mkdir()
    rows = [{"epoch": 1, "train_loss": 1.2, "lr": 1e-4}, {"epoch": 2, "train_loss": 0.9, "val_score": 0.3},
            {"train_loss": 0.7, "val_score": 0.35, "val_loss": 0.8, "lr": 1e-3}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = plot_training_curves(jsonl, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_training_curves(empty, tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_a_briefly_locked_sqlite_store_waits_instead_of_losing_data(store, tmp_path):
    import sqlite3
    import threading

    cfg = make_cfg(tmp_path, store, "locked-exp")
    with tracking.stage_run(cfg, "train", name="locked") as tracker:
        holder = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
        threading.Timer(1.0, lambda: holder.execute("COMMIT")).start()
        tracker.log_metrics({"loss": 0.5}, step=0)
        assert tracker.active
    holder.close()
    assert client(store).get_run(tracker.run_id).data.metrics == {"loss": 0.5}
    assert not (run_dir(cfg) / tracking.FALLBACK_NAME).exists()


def test_attaching_to_an_unknown_run_does_not_condemn_the_store(store, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    assert not tracking.log_lb_scores(TrackingConfig(uri=store), "0" * 32, {"lb_public": 0.5}, fallback_dir=tmp_path)
    assert "is not in" in caplog.text and store not in tracking._dead_uris
    assert read_fallback(tmp_path / tracking.FALLBACK_NAME)[-1]["data"] == {"lb_public": 0.5}
