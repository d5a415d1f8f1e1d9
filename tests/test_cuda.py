"""The device-dependent paths on a CUDA GPU: AMP (bf16, and fp16 with the GradScaler), channels_last, EfficientDet's
anchors on the device, every registered model family's train step and prediction, and one fold trained and
predicted end to end.

Skipped where torch sees no CUDA device (CI and the CPU machines); ``benchmarks/gpu_check.sh`` runs this file on a
GPU machine. ``PIPELINE_TEST_DEVICE=cpu`` runs the same checks on the CPU instead, to check the tests themselves
before a GPU is at hand (there "the device" is the CPU and autocast is CPU autocast).

Tiny models (tests/test_models.py's ``TINY``, tests/conftest.py's ``EFFDET_TINY`` and ``FRCNN_TINY``); the
torchvision families that have no tiny variant run at full width on 128 px images. Nothing downloads: the network
is blocked as in tests/test_models.py.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from timm.utils import ModelEmaV3

from conftest import EFFDET_TINY, FRCNN_TINY as FRCNN_TINY_MODEL, tiny_config
from pipeline import folds as folds_stage, predict as predict_stage, train as train_stage
from pipeline.config import ModelConfig, TrainConfig
from pipeline.engine import (LossModule, Precision, load_fold_model, predict_with_views, resolve_precision,
                             train_one_epoch)
from pipeline.dataset import make_records
from pipeline.data import load_dataset
from pipeline.layout import fold_dir, folds_path, predictions_path, read_folds, read_predictions
from pipeline.models import MODELS, create_model
from pipeline.train import build_optimizer, build_scheduler
from pipeline.tta import predict_views
from tests.test_models import FRCNN_TINY, NUM_CLASSES, S, TINY, batch, no_network

__all__ = ["no_network"]  # its autouse fixture applies here: nothing may download

DEVICE = torch.device(os.environ.get("PIPELINE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (run benchmarks/gpu_check.sh on a GPU machine; PIPELINE_TEST_DEVICE=cpu checks the tests)")

# Every registered family: the tiny variant where there is one, else the full torchvision model at 128 px (with the
# small RPN/RoI budgets for Faster R-CNN, as tests/test_models.py tests the R50-FPN-v2).
FAMILY_CONFIGS: dict[str, ModelConfig] = {
    name: TINY.get(name) or ModelConfig(name=name, image_size=S,
                                        options=dict(FRCNN_TINY) if name.startswith("fasterrcnn") else {})
    for name in sorted(MODELS)
}
# Families whose eval-mode losses are a function of weights and inputs alone (Faster R-CNN samples its RPN and RoI
# training boxes at random), so the device and the CPU must give the same numbers.
DETERMINISTIC = ["efficientdet", "retinanet_timm", "fcos_timm", "ssdlite_timm"]


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


@pytest.fixture
def exact_fp32():
    """fp32 without TF32 (cuDNN convolutions use TF32 by default on Ampere and later): comparisons of fp32 results
    across devices or memory formats are then about the code, not about a 10-bit mantissa."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(FAMILY_CONFIGS[family], NUM_CLASSES)


def loader_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[dict]]:
    """tests/test_models.py's two-image batch as the DataLoader yields it: uint8 images, CPU targets, metas."""
    images, targets = batch()
    return (images * 255).round().to(torch.uint8), targets, [{}, {}]


def engine_steps(model: torch.nn.Module, amp: str, steps: int, channels_last: bool = True):
    """``steps`` optimizer steps through ``train_one_epoch`` set up as ``pipeline.train`` sets it up (its optimizer
    and scheduler, EMA, grad clipping, the GradScaler for fp16). Returns (stats, scaler, ema, precision)."""
    cfg = TrainConfig(amp=amp, channels_last="on" if channels_last else "off", lr=1e-3, warmup_epochs=0,
                      progress=False, clip_grad_norm=10.0)
    precision = resolve_precision(cfg, DEVICE)
    model.to(DEVICE)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision.amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=0.9)
    stats, step = train_one_epoch(LossModule(model), optimizer, scheduler, scaler, ema, [loader_batch()] * steps,
                                  precision, cfg, 0, 0)
    assert step == steps
    return stats, scaler, ema, precision


def check_detections(detections: list[dict[str, torch.Tensor]], n: int, side: int, device_type: str) -> None:
    assert len(detections) == n
    for det in detections:
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert {boxes.device.type, scores.device.type, labels.device.type} == {device_type}
        assert boxes.dtype == torch.float32 and scores.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= side).all()
        assert ((scores >= 0) & (scores <= 1)).all() and torch.equal(scores, scores.sort(descending=True).values)
        assert ((labels >= 0) & (labels < NUM_CLASSES)).all()


# ---------------------------------------------------------------------------------------- precision on the device


def test_auto_precision_on_the_device_is_bf16_or_fp16_and_channels_last() -> None:
    precision = resolve_precision(TrainConfig(), DEVICE)
    if DEVICE.type == "cuda":
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert precision.amp_dtype == expected and precision.channels_last
    else:
        assert precision.amp_dtype is None and not precision.channels_last
    images = Precision(DEVICE, torch.bfloat16, True).images(loader_batch()[0])
    assert on_device(images) and images.dtype == torch.float32 and float(images.max()) <= 1.0
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_trains_and_predicts_on_the_device(family: str, amp: str) -> None:
    """A few engine steps under autocast with channels_last, then predictions under autocast: finite losses, the
    weights moved (fp16: steps the scaler skipped for overflow change nothing, so there are 6), the weights stay
    fp32 on the device, and the detections are on the device in the shared format."""
    model = build(family)
    before = copy.deepcopy(model.state_dict())
    stats, scaler, ema, precision = engine_steps(model, amp, steps=6 if amp == "fp16" else 2)
    assert precision.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    assert scaler.is_enabled() == (amp == "fp16")
    if scaler.is_enabled():
        assert 0 < scaler.get_scale() < float("inf")
    params = list(model.parameters())
    assert all(on_device(p) and p.dtype == torch.float32 for p in params)
    assert all(on_device(p) for p in ema.module.parameters())
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v.cpu(), before[k].cpu())]
    assert changed, "no weight changed: every optimizer step was skipped"
    images = loader_batch()[0]
    with precision.autocast():
        detections = model.predict(precision.images(images))
    check_detections(detections, 2, S, DEVICE.type)
    with precision.autocast():  # what predict_with_views runs: views batched on the device, results on the CPU
        views = predict_views(model, precision.images(images), ["none", "hflip"], batch_size=4)
    for per_image in views:
        check_detections(list(per_image.values()), 2, S, "cpu")


@pytest.mark.parametrize("family", DETERMINISTIC)
def test_device_losses_equal_the_cpu_losses(family: str, exact_fp32) -> None:
    """The same weights and batch give the same eval-mode losses on the CPU and on the device (fp32, no TF32): a
    buffer left on the CPU, a device-dependent default or a dtype slip shows up here."""
    model = build(family).eval()
    images, targets = batch()
    cpu = {k: v.item() for k, v in model.forward_loss(images, targets).items()}
    model.to(DEVICE)
    moved = [{k: v.to(DEVICE) for k, v in t.items()} for t in targets]
    dev = {k: v.item() for k, v in model.forward_loss(images.to(DEVICE), moved).items()}
    assert dev.keys() == cpu.keys()
    for key in cpu:
        assert dev[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("family", DETERMINISTIC)
def test_channels_last_gives_the_numbers_of_contiguous_memory(family: str, exact_fp32) -> None:
    # (Faster R-CNN is left out: its RPN keeps the top-k of near-equal random-init scores, so a last-bit difference
    # between the NHWC and NCHW kernels can swap proposals; its channels_last train step is tested above.)
    model = build(family).to(DEVICE).eval()
    images, targets = batch()
    images = images.to(DEVICE)
    moved = [{k: v.to(DEVICE) for k, v in t.items()} for t in targets]
    plain = {k: v.item() for k, v in model.forward_loss(images, moved).items()}
    model.to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    last = {k: v.item() for k, v in model.forward_loss(images.contiguous(memory_format=torch.channels_last),
                                                       moved).items()}
    for key in plain:
        assert last[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-4), key


# ---------------------------------------------------------------------------------------- EfficientDet's anchors


def test_efficientdet_anchors_follow_the_model_to_the_device() -> None:
    """FIELD-NOTES' trap: effdet's DetBenchPredict keeps its anchors on the CPU when built around a network already
    on CUDA. Ours are a buffer of the detector; the other sides' anchors (scale views, multi-scale training) are a
    cache that must be rebuilt on the device, also when that side was first used on the CPU."""
    model = build("efficientdet").eval()
    model.predict(torch.rand(1, 3, 2 * S, 2 * S))  # caches the 2S anchors on the CPU
    model.to(DEVICE)
    assert on_device(model.anchors.boxes) and model.labeler.anchors is model.anchors
    for side in (S, 2 * S):
        check_detections(model.predict(torch.rand(2, 3, side, side, device=DEVICE)), 2, side, DEVICE.type)
        assert on_device(model._anchors_at(side).boxes)
    images, targets = batch()
    big = torch.nn.functional.interpolate(images, scale_factor=2.0).to(DEVICE)
    doubled = [{"boxes": (t["boxes"] * 2).to(DEVICE), "labels": t["labels"].to(DEVICE)} for t in targets]
    losses = model.train().forward_loss(big, doubled)  # multi-scale training: the 2S labeler on the device
    assert torch.isfinite(losses["loss"]) and on_device(model._labeler_at(2 * S).anchors.boxes)
    out = predict_views(model.eval(), images.to(DEVICE), ["none", "hflip", "scale2"], batch_size=6)
    for per_image in out:
        check_detections(list(per_image.values()), 3, S, "cpu")


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("model", [EFFDET_TINY, FRCNN_TINY_MODEL], ids=["efficientdet", "fasterrcnn_timm"])
def test_one_fold_trains_and_predicts_on_the_device(tmp_path, tiny_data, model: dict) -> None:
    """pipeline.train on the device with its automatic precision (bf16 and channels_last on a GPU), then the
    prediction stage with two views: the checkpoint saved from the device loads on the CPU and back on the
    device, and the OOF tables hold boxes in original-image pixels."""
    cfg = tiny_config(tmp_path, tiny_data, model, train={"device": DEVICE.type, "epochs": 1},
                      tracking={"enabled": False})
    folds_stage.run(cfg)
    train_stage.run(cfg, "0", resume=False)
    state = torch.load(fold_dir(cfg, 0) / "best.pt", map_location="cpu", weights_only=False)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    table = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    detector = load_fold_model(cfg, 0, len(table.classes), DEVICE)
    assert all(on_device(p) for p in detector.parameters())
    ids = folds.image_id[folds.fold == 0].tolist()
    precision = resolve_precision(cfg.train, DEVICE)
    preds = predict_with_views(detector, make_records(table, ids), cfg, ["none", "hflip"], 0, precision)
    assert set(preds.tta) <= {"none", "hflip"} and set(preds.image_id) <= set(ids)
    assert (preds.x1 >= 0).all() and (preds.x2 <= 128).all() and (preds.y2 <= 128).all()
    path = predict_stage.run(cfg, "oof", ["none", "hflip"], [0])
    assert path == predictions_path(cfg, "oof") and len(read_predictions(path)) > 0
