"""Shared fixtures: a tiny generated dataset, tiny model configs, and an MLflow store that is never the user's."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import yaml

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: a process per core, so one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Building a detector allocates objects by the hundred thousand: at the default thresholds (700, 10, 10) that set
# off a full collection every few tests, 15-35 a worker at 0.1-0.3 s each. At 10,000 a worker makes one or two, and
# at most 10,000 objects wait for a young collection (most garbage, tensors included, goes by reference count).
gc.set_threshold(10_000, 10, 10)

from pipeline.config import ExperimentConfig, SyntheticConfig, load_config
from pipeline.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTHETIC = SyntheticConfig(seed=1, n_train=24, n_test=6, image_size=128, max_objects=8)
FRCNN_TINY = {
    "name": "fasterrcnn_timm", "arch": "mobilenetv3_small_050", "image_size": 128,
    "options": {"fpn_channels": 32, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100,
                "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 64,
                "anchor_sizes": [[8], [16], [32], [64], [128]]},
}
EFFDET_TINY = {
    "name": "efficientdet", "arch": "tf_efficientdet_lite0", "image_size": 128,
    "options": {"fpn_channels": 32, "fpn_cell_repeats": 1, "box_class_repeats": 1},
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported (torch, torchvision, timm, mlflow: ~730k objects) out of the cyclic GC's
    reach: none of it becomes garbage, yet every full collection scanned it again (0.3 s each) and so did the
    interpreter's exit (2-3 s a worker). Objects the tests make are collected as before."""
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process exits next: its exit need not scan what the tests left (cached models, caches of the package)
    for cycles, 0.8 s a worker."""
    gc.freeze()


@pytest.fixture(autouse=True)
def _private_mlflow_store(tmp_path_factory, monkeypatch):
    """Every test logs to one throwaway SQLite store, never to the project's mlflow.db."""
    store = tmp_path_factory.getbasetemp() / "mlflow-session.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("tiny_data"), TINY_SYNTHETIC)


def write_config(tmp_path: Path, data_root: Path, model: dict | None = None, **sections) -> Path:
    """A config YAML in ``tmp_path`` for the tiny dataset; ``sections`` override top-level keys."""
    tree = yaml.safe_load((REPO / "configs/demo/base.yaml").read_text())
    tree["data"]["root"] = str(data_root)
    tree["data"]["synthetic"] = TINY_SYNTHETIC.model_dump()
    tree.update(runs_dir=str(tmp_path / "runs"), run="tiny", model=model or FRCNN_TINY)
    tree["folds"] = {"k": 2, "seed": 0, "box_count_bins": [0, 1], "dir": str(tmp_path / "folds")}
    tree["train"] = {"epochs": 2, "batch_size": 4, "lr": 0.002, "warmup_epochs": 0.5, "num_workers": 0,
                     "max_steps_per_epoch": 2, "progress": False, **sections.pop("train", {})}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_config(tmp_path: Path, data_root: Path, model: dict | None = None, **sections) -> ExperimentConfig:
    return load_config(write_config(tmp_path, data_root, model, **sections))


def write_config_dir(tmp_path: Path, data_root: Path, members: dict[str, dict], **sections) -> Path:
    """A config folder like configs/demo: base.yaml, one YAML per member and ensemble.yaml."""
    base = write_config(tmp_path, data_root, None, **sections)
    tree = yaml.safe_load(base.read_text())
    tree.pop("model")
    tree["submission"] = {"format": "label_conf_xyxy", "dir": str(tmp_path / "submissions")}
    tree["ensemble"] = {"tune": {"iou_thr": [0.5, 0.6], "skip_box_thr": [0.0], "score_thr": [0.0, 0.1],
                                 "weight_steps": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tree))
    for name, model in members.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"base": "base.yaml", "run": name, "model": model, "predict": {"tta": ["none", "hflip"]}}))
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "ensemble": {"name": "tiny-ens", "members": [{"config": f"{n}.yaml"} for n in members]}}))
    return tmp_path


@pytest.fixture
def mean_confidence_metric():
    """A toy lower-is-better metric registered for one test: the mean summed confidence per scored image (a
    stand-in for a loss or an error rate). Every stage must follow its direction, never assume "higher"."""
    import numpy as np

    from pipeline.metrics import Metric, MetricResult, register_metric, unregister_metric

    def score(gt, preds) -> MetricResult:
        return MetricResult("mean_confidence", float(np.sum(preds.scores)) / max(1, len(gt.image_ids)))

    yield register_metric(Metric("mean_confidence", higher_is_better=False, class_aware=False, score=score))
    unregister_metric("mean_confidence")
