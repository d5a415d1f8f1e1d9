"""One typed config, built once from a YAML file plus ``--set key=value`` overrides, then passed down.

A YAML file may name a parent with ``base: other.yaml`` (relative to itself); the child is deep-merged over it.
Every unknown key or wrong type is an error that names the key and the file. Relative paths in ``data.root`` (and
the other folders: folds, runs, submissions, an ensemble member's ``predictions``) are resolved against the working
directory (the project root), as the Makefile runs every stage from there; ``base`` and a member's ``config`` are
read relative to the YAML file that names them.
"""
from __future__ import annotations

import argparse
import sys
from numbers import Integral
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.io import TextDecodeError, read_text


# ------------------------------------------------------------------------------------------ input geometry
# A model's input size (``model.image_size``, a multi-scale size, a cache's size) is an int for a square input, or a
# (width, height) pair. ``input_wh`` reads either as (width, height); ``canonical_size`` writes it back as the int for
# a square and the pair otherwise, so [512, 512] and 512 are one size (one fingerprint, one cache folder).
InputSize = int | tuple[int, int]
MIN_INPUT_SIDE = 32


def input_wh(size: InputSize | Sequence[int]) -> tuple[int, int]:
    """(width, height) of an input size: an int is a square side, a pair is [width, height]."""
    if _is_int(size):
        return int(size), int(size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2 and all(map(_is_int, size)):
        return int(size[0]), int(size[1])
    raise ValueError(f"an input size is a side or [width, height], got {size!r}")


def _is_int(value: Any) -> bool:
    # numbers.Integral: Python and numpy integers (a size read from an array shape or an index); a bool is no size
    return isinstance(value, Integral) and not isinstance(value, bool)


def canonical_size(size: InputSize | Sequence[int]) -> InputSize:
    """The int for a square size, the (width, height) tuple otherwise."""
    w, h = input_wh(size)
    return w if w == h else (w, h)


def size_text(size: InputSize | Sequence[int]) -> str:
    """``512`` for a square, ``1280x736`` (width x height) otherwise: how sizes are named in folders and commands."""
    w, h = input_wh(size)
    return str(w) if w == h else f"{w}x{h}"


def parse_size(value: Any) -> InputSize:
    """An input size from a config or a command line: an int, a [width, height] pair, or the text ``512`` /
    ``1280x736`` (``size_text``'s form); canonical. ValueError naming the rule for anything else, or a side < 32."""
    if isinstance(value, str):
        parts = value.strip().lower().split("x")
        if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"an input size is a side (512) or WIDTHxHEIGHT (1280x736), got {value!r}")
        value = [int(p) for p in parts] if len(parts) == 2 else int(parts[0])
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        w, h = input_wh(value)
    except ValueError:
        raise ValueError(f"an input size is one side (an int: a square) or [width, height], got {value!r}") from None
    if min(w, h) < MIN_INPUT_SIDE:
        shape = f"{w}" if w == h else f"[{w}, {h}] (width, height)"
        raise ValueError(f"each side of an input size must be >= {MIN_INPUT_SIDE} px, got {shape}")
    return canonical_size((w, h))


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


class CsvLayout(Strict):
    """``data.format: csv``: which columns of a competition's CSV hold what (``pipeline.data.readers.csv``).

    One row per box (VinBigData), or per image with a column holding the image's list of boxes (SIIM, GBR).
    Paths are relative to ``data.root``; the CSV files are ``data.train_csv`` and (hidden labels) ``data.test_csv``.
    """

    id_column: str = "image_id"
    # the image file of a row: ``{id}`` (the id, less ``id_suffix``) and ``{<column>}`` (any column of the row) are
    # filled in; ``*`` / ``?`` glob and must match exactly one file. E.g. "train/{id}.dicom",
    # "train_images/video_{video_id}/{video_frame}.jpg", "train/{StudyInstanceUID}/*/{id}.dcm"
    image_pattern: str = "train/{id}.jpg"
    # the test split's images: every file the pattern matches ({...} fields match any name), id from ``{id}``
    # (plus ``id_suffix``); or, when ``data.test_csv`` exists, the rows of that file in this layout
    test_image_pattern: str | None = None
    id_suffix: str = ""  # text the id carries that the file name does not (SIIM's "_image"); kept in the table's id
    # boxes: four columns (one box per row) or one column holding a list of boxes, never both
    box_columns: list[str] | None = None  # the four columns in ``box_format`` order
    boxes_column: str | None = None  # JSON / Python-literal list of dicts or of [4 numbers], or one "[x, y, w, h]"
    box_keys: list[str] | None = None  # the dicts' four keys in box_format order; default by box_format (reader)
    box_format: Literal["xyxy", "xywh", "cxcywh"] = "xyxy"
    normalised: bool = False  # coordinates are fractions of the image's width and height
    # classes: a column of class names, or one class for every box
    label_column: str | None = None
    fixed_class: str | None = None
    empty_labels: list[str] = Field(default_factory=list)  # labels that mean "no box here" (VinBigData "No finding")
    group_column: str | None = None  # patient / study / video: never split across folds (the table's `group`)
    source_column: str | None = None  # the table's `source` (folds stratify on it)
    annotator_column: str | None = None  # kept per box (the boxes' `annotator` column)
    width_column: str | None = None  # declared sizes, checked against the real image
    height_column: str | None = None
    # fuse each image's boxes (one list per annotator) with weighted boxes fusion before training
    fuse_annotators: bool = False
    fuse_iou_thr: float = Field(0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "CsvLayout":
        if (self.box_columns is None) == (self.boxes_column is None):
            raise ValueError("name either box_columns (four columns) or boxes_column (a list of boxes), not both")
        for key in ("box_columns", "box_keys"):
            value = getattr(self, key)
            if value is not None and (len(value) != 4 or len(set(value)) != 4):
                raise ValueError(f"{key} must be four different names in {self.box_format} order, got {value}")
        if (self.label_column is None) == (self.fixed_class is None):
            raise ValueError("name either label_column (a column of class names) or fixed_class, not both")
        if (self.width_column is None) != (self.height_column is None):
            raise ValueError("width_column and height_column go together")
        return self


class DataConfig(Strict):
    name: str
    format: str  # a registered reader: pipeline.data.readers.READERS
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
    csv: CsvLayout | None = None  # data.format csv: the column mapping
    skip_bad_images: bool = False  # True: skip (and count) unreadable images instead of stopping
    # a folder of images without labels (relative to root), a pseudo-label source (pipeline.pseudo); never in folds
    unlabelled: str | None = None
    synthetic: SyntheticConfig | None = None  # set: the dataset is generated under root when missing
    # the base folder of pre-resized image caches (`python -m pipeline.data cache`, pipeline.data.cache); None: no
    # cache. Training and prediction use the cache built for their input size and resize, the image files otherwise
    cache_dir: Path | None = None

    @field_validator("format")
    @classmethod
    def _known_reader(cls, value: str) -> str:
        from pipeline.data.readers import READERS  # the registry decides; a reader added there is valid here

        if value not in READERS:
            raise ValueError(f"unknown data format {value!r}; known: {', '.join(READERS)}")
        return value


class FoldsConfig(Strict):
    k: int = Field(5, ge=2)
    seed: int = 42
    box_count_bins: list[int] = Field(default_factory=lambda: [0, 1, 10, 30])  # left edges of box-count bins
    dir: Path = Path("folds")


class ModelConfig(Strict):
    name: str = "fasterrcnn_mobilenet_v3_large_fpn"
    arch: str = ""
    # the model's input: one side (a square, e.g. 512) or [width, height] (e.g. [1280, 736] for 16:9 frames),
    # each side >= 32 and a multiple of what the family needs (its size_rule). [512, 512] is read as 512
    image_size: InputSize = 512
    pretrained: bool = False
    backbone_weights: str | None = None
    init_checkpoint: str | None = None
    max_detections: int = Field(300, ge=1)
    score_threshold: float = Field(0.001, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    options: dict[str, Any] = Field(default_factory=dict)
    # square: stretch every image to the input's width x height (the aspect ratio changes unless it is the input's);
    # letterbox: scale by min(width / W, height / H), keep the ratio and pad the rest (bottom/right); boxes map back
    # exactly either way
    resize: Literal["square", "letterbox"] = "square"

    @field_validator("image_size", mode="before")
    @classmethod
    def _input_size(cls, value: Any) -> InputSize:
        return parse_size(value)

    @property
    def input_wh(self) -> tuple[int, int]:
        """The input's (width, height)."""
        return input_wh(self.image_size)


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
    # auto: the fused engine (pipeline.fused_augment) when `train` holds only flips, rot90, transpose, HSV and
    # brightness/contrast and there is no Mosaic, else albumentations; fused: that engine or an error
    engine: Literal["auto", "albumentations", "fused"] = "auto"


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
    # torch.compile the model's network for training (the parts its family names: Detector.compiled_parts): false,
    # true (torch's default mode) or a torch.compile mode. The first step pays for the compile: each epoch's row then
    # holds first_step_s. A speed setting: a run may resume with it changed. Validation and the OOF run the network
    # eagerly (pipeline.engine.eager_network): compiling the eval graph would cost as much again for one pass.
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False
    compile_backend: str = "inductor"  # torch.compile's backend; "eager" / "aot_eager" trace without code generation
    seed: int = 42
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    val_every: int = Field(1, ge=1)
    patience: int | None = None  # epochs without improvement before stopping; None: never stop early
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    progress: bool = True
    # multi-scale training: the input sizes a batch may take (one per batch, drawn from (seed, epoch, batch)); null or
    # empty: every batch at model.image_size. Each is a side (a square) or [width, height]; with a non-square
    # model.image_size every entry must be a [width, height] pair (a lone side would be ambiguous). The model must
    # take each size (e.g. sides that are multiples of 32 for Faster R-CNN)
    multiscale: list[InputSize] | None = None
    # pseudo-labelled images added to every fold's training set (never to its validation set): a round number
    # (runs/<experiment>/pseudo/round<N>, pipeline.layout.pseudo_dir) or the path of a round's folder
    pseudo: int | str | None = None

    @field_validator("pseudo", mode="before")
    @classmethod
    def _pseudo_round_or_path(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads yes/true as a bool: neither a round nor a path
            raise ValueError(f"pseudo must be a round number or the path of a round's folder, got {value!r}")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a pseudo-label round is a number >= 1, got {value}")
        if isinstance(value, str) and not value.strip():
            raise ValueError("pseudo must be a round number or the path of a round's folder, got an empty string")
        return value

    @field_validator("multiscale", mode="before")
    @classmethod
    def _multiscale_sizes(cls, value: Any) -> list[InputSize] | None:
        if value is None or (isinstance(value, (list, tuple)) and not value):
            return None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"multiscale is a list of sides or [width, height] pairs, got {value!r}")
        sizes = []
        for entry in value:
            try:
                sizes.append(parse_size(entry))
            except ValueError as exc:
                raise ValueError(f"multiscale entry {entry!r}: {exc}") from None
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"multiscale sizes repeated: {value}")
        return sizes

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

    @property
    def tta_wbf(self) -> dict[str, Any]:
        """The WBF that fuses this model's views and fold models (its "fold ensemble"), as keyword arguments."""
        return {"iou_thr": self.tta_iou_thr, "skip_box_thr": self.tta_skip_box_thr, "conf_type": self.tta_conf_type}


class SubmissionConfig(Strict):
    format: str = "gwd"  # a registered format: pipeline.formats.format_names()
    # decimals of box coordinates; None: the format's custom (whole pixels for the CSV formats, 2 for COCO JSON).
    # On small images whole pixels cost real score: 0.007 COCO mAP on the 256 px demo.
    coord_decimals: int | None = Field(None, ge=0, le=6)
    dir: Path = Path("submissions")
    # boxes kept per image, the most confident first: "metric" = what the metric's scorer reads (100 for COCO mAP,
    # every box for GWD, whose false positives cost score); a number; or null for every box
    max_boxes_per_image: int | Literal["metric"] | None = "metric"

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from pipeline.formats import format_names  # the registry decides; a format added there is valid here

        if value not in format_names():
            raise ValueError(f"unknown submission format {value!r}; known: {', '.join(format_names())}")
        return value


class MemberConfig(Strict):
    """A model config of ours, or a folder of predictions made by another tool on our folds
    (see pipeline.external for the layout and formats)."""

    config: str | None = None  # a model config, relative to the ensemble config's folder
    # or: a folder of another tool's OOF (per fold) and test predictions, relative to the working directory (as
    # data.root; not to this file, unlike `config`)
    predictions: str | None = None
    name: str | None = None  # the member's name (required with predictions; default: the config's `run`)
    format: Literal["table", "coco_json", "yolo_txt"] = "table"  # of the predictions folder's files
    # coco_json: how an integer image_id without a file_name names an image -- exported: the id `folds export --to
    # coco` wrote (MMDetection, detectron2); stem: the file's all-digit stem (older Ultralytics save_json); auto: the
    # reading that names an image for every entry (two that disagree are refused, naming this key)
    coco_image_id: Literal["auto", "exported", "stem"] = "auto"
    weight: float | None = None  # fixed weight; None: tuned on OOF
    # the TTA views to fuse, each one its OOF predictions hold; None: all of them. A view left out is neither tuned
    # nor fused nor run by a bundle: drop a view that does not help without predicting again
    views: list[str] | None = None

    @field_validator("views")
    @classmethod
    def _distinct_views(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"views must be distinct and at least one, got {value}")
        return value

    @property
    def predictions_folder(self) -> Path:
        """The folder of another tool's predictions (a relative path: from the working directory, as data.root)."""
        if self.predictions is None:
            raise ConfigError(f"member {self.config} is a config of ours, not a predictions folder")
        return Path(self.predictions)

    def chosen_views(self, predicted: Sequence[str], source: object) -> list[str]:
        """The views to fuse, ``none`` first then by name: every view of ``predicted`` (those of the member's OOF
        predictions, read from ``source``), or those ``views`` names (``ConfigError`` for one not predicted)."""
        have = sorted({str(v) for v in predicted}, key=lambda v: (v != "none", v))
        missing = [v for v in self.views or [] if v not in have]
        if missing:
            raise ConfigError(f"member {self.name or self.config} ({source}): views {missing} were not predicted; "
                              f"the predictions hold {have}")
        return have if self.views is None else [v for v in have if v in self.views]

    @model_validator(mode="after")
    def _one_source(self) -> "MemberConfig":
        if (self.config is None) == (self.predictions is None):
            raise ValueError("a member names either `config` (a model of ours) or `predictions` (a folder), not both")
        if self.predictions is not None and not self.name:
            raise ValueError(f"member with predictions {self.predictions!r} needs a `name`")
        if self.coco_image_id != "auto" and (self.predictions is None or self.format != "coco_json"):
            raise ValueError(f"coco_image_id {self.coco_image_id!r} reads coco_json predictions only; this member's "
                             f"are {'a config of ours' if self.predictions is None else self.format}")
        return self


class TuneConfig(Strict):
    iou_thr: list[float] = Field(default_factory=lambda: [0.4, 0.5, 0.55, 0.6, 0.7])
    skip_box_thr: list[float] = Field(default_factory=lambda: [0.0, 0.01, 0.05])
    # the confidence thresholds tried: the tuned one cuts the submission; a thresholded metric (GWD, F2) also reads
    # validation and every table row at its best one. Up to 0.95: under GWD the demo's Faster R-CNN fold ensemble
    # scored best at 0.9 (0.6659; 0.4006 at 0.5, where the grid used to end), the tuned ensemble at 0.8 (0.7866
    # against 0.7615 at 0.5)
    score_thr: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                            0.95])
    weight_steps: int = Field(4, ge=1)  # member weights from {1..weight_steps}, normalised


class EnsembleConfig(Strict):
    name: str = "ensemble"
    members: list[MemberConfig] = Field(default_factory=list)
    # the fusion rule: a name in pipeline.fusion.FUSION_METHODS (wbf, nms, soft_nms, nmw), or "auto": every rule
    # tuned on OOF and the best kept (the ensemble table shows each rule's tuned score)
    method: str = "wbf"
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    wbf_backend: Literal["numba", "ensemble_boxes"] = "numba"
    tune: TuneConfig = Field(default_factory=TuneConfig)
    # also score the tuning itself out of fold: each fold fused with what the search chose on the other folds' OOF
    # images (the table's "nested" row, a mean of per-fold scores beside the tuned ensemble's, and the ledger's
    # cv_nested; about k - 1 times the tuning time). The tuned OOF score picks the best of many fusions on the
    # images that score it, so it runs high; this one does not. auto: run it when that estimate is at most a minute
    # (pipeline.ensemble.NESTED_AUTO_S)
    nested: bool | Literal["auto"] = "auto"
    # test's fold models: "wbf" -- each member x view's fold models fused by WBF first (the member's predict.tta_*:
    # its "fold ensemble" rows), so the tuned rule fuses member x view sets on test as on OOF, where one fold model
    # predicted each image; "sets" -- every fold model a set of the tuned rule (all rules before 2026-12-01); "auto"
    # -- "sets" for a rule that averages its sets (WBF but conf_type max: FusionRule.averages_sets), "wbf" for the
    # others. Test, sets -> wbf: NMS, soft-NMS, NMW +2 to +10 points on the demo and BCCD; WBF -0.005 / +0.003 (README)
    fold_fusion: Literal["auto", "wbf", "sets"] = "auto"

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from pipeline.fusion.rules import FUSION_METHODS  # the registry decides; a rule added there is valid here

        if value != "auto" and value not in FUSION_METHODS:
            raise ValueError(f"unknown fusion method {value!r}; known: auto, {', '.join(FUSION_METHODS)}")
        return value


class PseudoConfig(Strict):
    """Pseudo-label rounds (pipeline.pseudo): which images, which teacher, which boxes and images are kept.

    Two operating points are read off the ensemble's fused OOF predictions (precision at IoU 0.5, class-aware): the
    *label* threshold, the lowest score whose OOF precision reaches ``precision_target`` (boxes at or above it become
    labels), and the *likely* threshold, the lowest score whose OOF precision reaches ``likely_precision``. A box
    between the two is one the teacher half-sees; leaving it unlabelled would teach the student that a probable
    object is background. So an image is kept when at most ``max_uncertain_fraction`` of its boxes at or above the
    likely threshold fall below the label threshold, and it has at least one label (``keep_empty``: also keep
    images with no box at or above the likely threshold, as background examples)."""

    sources: list[Literal["test", "unlabelled"]] = Field(default_factory=lambda: ["test"], min_length=1)
    # fold: fold K's pseudo-labels come only from the members' fold-K models (which never saw fold K's images), so
    # a round-2 fold-K model learns nothing derived from its own validation labels and OOF stays out-of-fold;
    # ensemble: every fold gets the full ensemble's labels (stronger teacher, but they carry the validation labels
    # of every fold into every fold's training: the CV of the next round is optimistic)
    teacher: Literal["fold", "ensemble"] = "fold"
    precision_target: float = Field(0.9, gt=0.0, le=1.0)
    likely_precision: float = Field(0.5, gt=0.0, le=1.0)
    max_uncertain_fraction: float = Field(0.25, ge=0.0, le=1.0)
    keep_empty: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "PseudoConfig":
        if self.likely_precision > self.precision_target:
            raise ValueError(f"likely_precision {self.likely_precision} is above precision_target "
                             f"{self.precision_target}: the likely threshold must not be stricter than the label one")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources repeated: {self.sources}")
        return self


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root


class ExperimentConfig(Strict):
    experiment: str = "default"
    run: str = "run"
    metric: str = "coco_map"  # a registered metric: pipeline.metrics.metric_names()
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
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)

    # where the config was read from and the overrides applied to it: an ensemble's members are read relative to
    # its file, with the same overrides (set by load_config; never part of the dump, so never part of a resume check)
    _source: Path | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        from pipeline.metrics import metric_names  # the registry decides; a metric registered there is valid here

        if value not in metric_names():
            raise ValueError(f"unknown metric {value!r}; known: {', '.join(metric_names())}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        size = self.model.image_size
        # EfficientDet's default max_level 7: every side halves exactly seven times (the family checks its own
        # max_level again when it is built); caught here so a bad size fails before any stage starts
        bad = [side for side in input_wh(size) if side % 128]
        if self.model.name == "efficientdet" and bad:
            fixes = " or ".join(str(v) for v in sorted({max(128, bad[0] // 128 * 128), (bad[0] // 128 + 1) * 128}))
            raise ValueError(f"model.image_size={size_text(size)}: EfficientDet needs each side a multiple of 128 "
                             f"(2 ** max_level); {bad[0]} is not (use {fixes})")
        flat = [s for s in self.train.multiscale or [] if isinstance(s, int)]
        if not isinstance(size, int) and flat:
            smaller = [32 * max(1, round(side * 0.75 / 32)) for side in size]
            raise ValueError(f"train.multiscale {flat}: model.image_size is {size_text(size)} (width x height, not "
                             "square), so each multiscale size must be a [width, height] pair, e.g. "
                             f"[{smaller}, {list(size)}] (a lone side would not say which side it is)")
        return self

    @property
    def source(self) -> Path | None:
        """The YAML file this config was loaded from (None when built in code)."""
        return self._source

    @property
    def overrides(self) -> list[str]:
        return list(self._overrides)

    def load_sibling(self, name: str | Path) -> "ExperimentConfig":
        """Another config named relative to this one's file (an ensemble's member), with the same overrides."""
        if self._source is None:
            raise ConfigError(f"{name}: a config built in code has no folder to find it in")
        return load_config(self._source.parent / name, self.overrides)

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


def _config_text(path: Path) -> str:
    """The config file's text: UTF-8, or the encoding its byte-order mark declares (YAML allows UTF-16/32); a
    ConfigError naming the file for anything else (a folder, a missing or unreadable file, Latin-1 bytes)."""
    if path.is_dir():
        configs = sorted(p.name for p in path.glob("*.y*ml"))
        listed = f"; it holds {', '.join(configs[:8])}" if configs else ""
        raise ConfigError(f"{path} is a folder, not a config file: pass --config <folder>/<file>.yaml{listed}")
    try:
        return read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except TextDecodeError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at ``path`` merged over its ``base:`` chain."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(_config_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the file name of another config, got {base!r}")
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
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"  {key}: {msg} (got {err.get('input')!r})")
        where = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
        raise ConfigError(f"invalid config {where}:\n" + "\n".join(problems)) from None
    cfg._source, cfg._overrides = Path(path), tuple(overrides or ())
    return cfg


# Without --config a stage reads ./pipeline.yaml, else the embedded demo's config for that stage, and says which.
PROJECT_CONFIG = Path("pipeline.yaml")
DEMO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def add_config_args(parser: argparse.ArgumentParser, demo: str = "base.yaml") -> None:
    """``--config`` and ``--set``; ``demo`` is the file of configs/demo this stage falls back to."""
    parser.add_argument("--config", default=None,
                        help=f"YAML config file (default: ./{PROJECT_CONFIG} if present, else configs/demo/{demo})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.set_defaults(demo_config=demo)


def config_path_from_args(args: argparse.Namespace) -> Path:
    """The config a command was given, or the default it falls back to (announced on stderr)."""
    if args.config:
        return Path(args.config)
    if PROJECT_CONFIG.is_file():
        path, why = PROJECT_CONFIG, "found in the working directory"
    else:
        path, why = DEMO_CONFIGS / args.demo_config, "the embedded demo"
        if not path.is_file():
            raise ConfigError(f"no --config given, no ./{PROJECT_CONFIG}, and the demo configs are not beside this "
                              f"installation ({DEMO_CONFIGS.name}/ not found): pass --config FILE")
    print(f"using config {path} ({why}; pass --config FILE to choose another)", file=sys.stderr)
    return path


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(config_path_from_args(args), args.overrides)
