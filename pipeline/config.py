"""One typed config, built once from a YAML file plus ``--set key=value`` overrides, then passed down.

A YAML file may name a parent with ``base: other.yaml`` (relative to itself); the child is deep-merged over it.
Every unknown key or wrong type is an error that names the key and the file. Relative paths in ``data.root``
are resolved against the working directory (the project root), as the Makefile runs every stage from there.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Strict):
    """Parameters of the embedded generated dataset (see pipeline.data.synthetic)."""

    seed: int = 0
    n_train: int = 120
    n_test: int = 40
    image_size: int = 256
    classes: list[str] = Field(default_factory=lambda: ["disc", "square", "ring"])
    sources: int = 3
    max_objects: int = 30


class DataConfig(Strict):
    name: str
    format: Literal["gwd_csv", "coco", "voc", "yolo"]
    root: Path
    classes: list[str] | None = None  # required for yolo; read from the data otherwise (then checked if given)
    # gwd_csv
    train_csv: str = "train.csv"
    train_images: str = "train"
    test_images: str | None = "test"
    sample_submission: str | None = "sample_submission.csv"
    # hidden labels of the test images (train_csv format) for local leaderboard scoring; used when the file exists
    test_csv: str | None = "test_labels.csv"
    # coco
    train_json: str = "annotations/train.json"
    test_json: str | None = None
    # voc
    annotations: str = "Annotations"
    images: str = "JPEGImages"
    train_split: str | None = None  # a name in ImageSets/Main/, e.g. "trainval"
    test_split: str | None = None  # e.g. "test": the hidden leaderboard split, never in folds
    # yolo
    labels: str = "labels"
    # any format: an optional CSV (image_id, group) whose groups never cross folds
    groups_csv: str | None = None
    skip_bad_images: bool = False  # True: skip (and count) unreadable images instead of stopping
    synthetic: SyntheticConfig | None = None  # set: the dataset is generated under root when missing


class FoldsConfig(Strict):
    k: int = Field(5, ge=2)
    seed: int = 42
    box_count_bins: list[int] = Field(default_factory=lambda: [0, 1, 10, 30])  # left edges of box-count bins
    dir: Path = Path("folds")


class ModelConfig(Strict):
    name: str = "fasterrcnn_mobilenet_v3_large_fpn"
    arch: str = ""
    image_size: int = Field(512, ge=32)
    pretrained: bool = False
    backbone_weights: str | None = None
    init_checkpoint: str | None = None
    max_detections: int = Field(300, ge=1)
    score_threshold: float = Field(0.001, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    options: dict[str, Any] = Field(default_factory=dict)


class TransformSpec(Strict):
    name: str  # an albumentations class name, e.g. "HorizontalFlip"
    params: dict[str, Any] = Field(default_factory=dict)


class AugmentConfig(Strict):
    train: list[TransformSpec] = Field(default_factory=list)
    min_visibility: float = Field(0.3, ge=0.0, le=1.0)
    min_area: float = Field(4.0, ge=0.0)
    mosaic_prob: float = Field(0.0, ge=0.0, le=1.0)
    mixup_prob: float = Field(0.0, ge=0.0, le=1.0)
    cutmix_prob: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.9
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = 10.0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    ema: bool = True
    ema_decay: float = Field(0.999, gt=0, lt=1)
    seed: int = 42
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    val_every: int = Field(1, ge=1)
    patience: int | None = None  # epochs without improvement before stopping; None: never stop early
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    progress: bool = True

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false; the user meant the words
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class PredictConfig(Strict):
    tta: list[str] = Field(default_factory=lambda: ["none"])
    batch_size: int = Field(8, ge=1)
    tta_iou_thr: float = Field(0.55, gt=0, le=1)
    tta_skip_box_thr: float = Field(0.0, ge=0, le=1)
    tta_conf_type: str = "avg"


class SubmissionConfig(Strict):
    format: Literal["gwd", "label_conf_xyxy", "coco_json"] = "gwd"
    # decimals of box coordinates; None: the format's custom (whole pixels for the CSV formats, 2 for COCO JSON).
    # On small images whole pixels cost real score: 0.007 COCO mAP on the 256 px demo.
    coord_decimals: int | None = Field(None, ge=0, le=6)
    dir: Path = Path("submissions")


class MemberConfig(Strict):
    config: str  # a model config, relative to the ensemble config's folder
    weight: float | None = None  # fixed weight; None: tuned on OOF


class TuneConfig(Strict):
    iou_thr: list[float] = Field(default_factory=lambda: [0.4, 0.5, 0.55, 0.6, 0.7])
    skip_box_thr: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.05])
    score_thr: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    weight_steps: int = Field(4, ge=1)  # member weights from {1..weight_steps}, normalised


class EnsembleConfig(Strict):
    name: str = "ensemble"
    members: list[MemberConfig] = Field(default_factory=list)
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    wbf_backend: Literal["numba", "ensemble_boxes"] = "numba"
    tune: TuneConfig = Field(default_factory=TuneConfig)


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root


class ExperimentConfig(Strict):
    experiment: str = "default"
    run: str = "run"
    metric: Literal["gwd", "coco_map", "coco_map50", "voc_map50"] = "coco_map"
    runs_dir: Path = Path("runs")
    data: DataConfig
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    submission: SubmissionConfig = Field(default_factory=SubmissionConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.model.name == "efficientdet" and self.model.image_size % 128:
            raise ValueError(f"model.image_size={self.model.image_size}: EfficientDet needs a multiple of 128")
        return self

    @property
    def folds_path(self) -> Path:
        return self.folds.dir / f"{self.data.name}_k{self.folds.k}_s{self.folds.seed}.csv"

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.experiment / self.run

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at ``path`` merged over its ``base:`` chain."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = read_yaml_tree(path.parent / base, _seen + (path.resolve(),))
    return _deep_merge(parent, raw)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``tree``."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {exc}") from None
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    tree = read_yaml_tree(path)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"  {key}: {msg} (got {err.get('input')!r})")
        where = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
        raise ConfigError(f"invalid config {where}:\n" + "\n".join(problems)) from None


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
