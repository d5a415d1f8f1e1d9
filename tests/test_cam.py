"""Heat maps through grad-cam: every family gives a map of the image's size in [0, 1] that depends on the target."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import EFFDET_TINY, FRCNN_TINY
from pipeline.cam import (CamError, CamTarget, cam_target_layers, detect_with_grad, detections, explain,
                          merge_levels, model_input, overlay)
from pipeline.config import ModelConfig
from pipeline.models import Detector, create_model
from tests.test_models import TINY

H, W = 90, 140  # not square and not the model's size: the map must come back in the image's own pixels


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((H, W, 3), 90, dtype=np.uint8)
    img[20:60, 30:80] = (230, 60, 50)  # a bright object on a textured background
    return (img + rng.integers(0, 30, img.shape)).astype(np.uint8)


@pytest.fixture(scope="module", params=["frcnn", "effdet"])
def detector(request) -> Detector:
    torch.manual_seed(0)
    spec = {"frcnn": FRCNN_TINY, "effdet": EFFDET_TINY}[request.param]
    return create_model(ModelConfig(**spec), 3).eval()


@pytest.mark.slow
def test_gradcam_and_eigencam_give_a_map_of_the_image_size_in_unit_range(detector, image):
    found = detections(detector, image)
    assert len(found["scores"]) > 0 and (np.diff(found["scores"]) <= 0).all()
    assert found["boxes"][:, [0, 2]].max() <= W + 1e-3 and found["boxes"][:, [1, 3]].max() <= H + 1e-3
    target = CamTarget(tuple(found["boxes"][0]), int(found["labels"][0]))
    for method, kwargs in (("gradcam", {"target": target}), ("eigencam", {})):
        heat = explain(detector, image, method, **kwargs)
        assert heat.shape == (H, W) and heat.dtype == np.float32, method
        assert heat.min() >= 0.0 and heat.max() <= 1.0, method
        # a map of zeros is what a lost gradient (or no feature hook) would give: some signal must reach it
        assert heat.max() > 0.5 and heat.std() > 0.01, method
    picture = overlay(image, heat)
    assert picture.shape == (H, W, 3) and picture.dtype == np.uint8


@pytest.mark.slow
def test_gradcam_depends_on_the_detection_explained(detector, image):
    found = detections(detector, image)
    centres = (found["boxes"][:, :2] + found["boxes"][:, 2:]) / 2
    far = int(np.argmax(np.abs(centres - centres[0]).sum(axis=1)))  # the detection farthest from the best one
    a = explain(detector, image, "gradcam", CamTarget(tuple(found["boxes"][0]), int(found["labels"][0])))
    b = explain(detector, image, "gradcam", CamTarget(tuple(found["boxes"][far]), int(found["labels"][far])))
    assert far != 0 and not np.allclose(a, b, atol=1e-3)


@pytest.mark.slow
def test_explaining_leaves_the_model_as_it_was(detector, image):
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    detector.train()
    explain(detector, image, "eigencam")
    assert detector.training and all(m.training for m in detector.modules())
    detector.eval()
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())


@pytest.mark.slow
def test_differentiable_predict_equals_predict(detector, image):
    images, _ = model_input(image, detector.image_size)
    plain = detector.predict(images)[0]
    with torch.enable_grad():
        graded = detect_with_grad(detector, images)[0]
    assert graded["scores"].requires_grad
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(graded[key].detach(), plain[key])


@pytest.mark.slow
def test_gradcam_refuses_a_box_the_model_never_predicted(detector, image):
    with pytest.raises(CamError, match="eigencam"):
        explain(detector, image, "gradcam", CamTarget((0.0, 0.0, 1.0, 1.0), 0))
    with pytest.raises(CamError, match="CamTarget"):
        explain(detector, image, "gradcam")
    with pytest.raises(CamError, match="known: gradcam, eigencam"):
        explain(detector, image, "scorecam")


def test_family_layers():
    torch.manual_seed(0)
    frcnn = create_model(ModelConfig(**FRCNN_TINY), 3)
    effdet = create_model(ModelConfig(**EFFDET_TINY), 3)
    assert cam_target_layers(frcnn) == [frcnn.net.backbone]  # body + FPN
    assert cam_target_layers(effdet) == [effdet.net.fpn]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_registered_family_explains_a_detection(family, image):
    """Every family with a tiny config in tests/test_models.py (RetinaNet, FCOS, SSDlite ...) through one path."""
    torch.manual_seed(0)
    detector = create_model(TINY[family], 3).eval()
    # what the heads read: effdet's BiFPN, every torchvision detector's backbone (body + FPN, SSD's extractor)
    assert cam_target_layers(detector) == [detector.net.fpn if family == "efficientdet" else detector.net.backbone]
    found = detections(detector, image)
    target = CamTarget(tuple(found["boxes"][0]), int(found["labels"][0]))
    for method in ("gradcam", "eigencam"):
        heat = explain(detector, image, method, target)
        assert heat.shape == (H, W) and 0.0 <= heat.min() and heat.max() <= 1.0 and heat.std() > 0.01, method


def test_merge_levels_stacks_channels_on_the_finest_grid_that_fits():
    levels = {"0": torch.zeros(1, 2, 32, 32), "1": torch.ones(1, 3, 16, 16), "pool": torch.ones(1, 1, 8, 8)}
    assert merge_levels(levels, max_cells=32 * 32).shape == (1, 6, 32, 32)
    assert merge_levels(levels, max_cells=20 * 20).shape == (1, 6, 16, 16)
    assert merge_levels(list(levels.values()), max_cells=16).shape == (1, 6, 4, 4)  # none fits: shrunk to fit
    assert merge_levels(torch.ones(1, 5, 7, 7), max_cells=100).shape == (1, 5, 7, 7)
    merged = merge_levels(torch.arange(64.0).view(1, 1, 8, 8), max_cells=16)  # averaged, not sampled
    assert merged.shape == (1, 1, 4, 4) and merged.mean().item() == pytest.approx(31.5)
    with pytest.raises(CamError, match="no \\(B, C, H, W\\)"):
        merge_levels(("text",), max_cells=100)


class ToyDetector(Detector):
    """A family pipeline.cam has never heard of: only ``backbone`` (a tensor-valued conv) is known. Two fixed boxes,
    left and right half; each box's score is the mean of feature channel 0 over its half."""

    def __init__(self) -> None:
        super().__init__(num_classes=1, image_size=64, max_detections=10)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())

    @property
    def backbone(self) -> nn.Module:
        return self.net

    def _detect(self, images):
        f = self.net(images)[:, 0]
        s = images.shape[-1]
        boxes = torch.tensor([[0.0, 0.0, s / 2, s], [s / 2, 0.0, s, s]])
        out = []
        for fi in f:
            scores = torch.stack([fi[:, : s // 2].mean(), fi[:, s // 2:].mean()]).sigmoid()
            out.append({"boxes": boxes, "scores": scores, "labels": torch.zeros(2, dtype=torch.long)})
        return out


def test_a_new_family_works_through_its_backbone_and_can_choose_its_layers(image):
    torch.manual_seed(0)
    toy = ToyDetector().eval()
    assert cam_target_layers(toy) == [toy.net]
    found = detections(toy, image)
    heat = explain(toy, image, "gradcam", CamTarget(tuple(found["boxes"][0]), 0))
    assert heat.shape == (H, W) and 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.5
    toy.cam_target_layers = lambda: [toy.net[0]]  # a family's own choice wins
    assert cam_target_layers(toy) == [toy.net[0]]
    assert explain(toy, image, "eigencam").shape == (H, W)


class OverlappingClassesDetector(ToyDetector):
    """Two boxes on the same object: class 0 and, overlapping the target a little more, class 1 (what a detector
    with a low score threshold gives everywhere)."""

    def _detect(self, images):
        f = self.net(images)[:, 0]
        boxes = torch.tensor([[0.0, 0.0, 32.0, 64.0], [0.0, 0.0, 33.0, 64.0]])
        return [{"boxes": boxes, "scores": torch.stack([fi.mean(), fi[:, :16].mean()]).sigmoid(),
                 "labels": torch.tensor([0, 1])} for fi in f]


def test_gradcam_explains_the_box_of_the_targets_class_even_when_another_class_overlaps_more(image):
    torch.manual_seed(0)
    toy = OverlappingClassesDetector().eval()
    found = detections(toy, image)
    wide = tuple(found["boxes"][found["labels"] == 1][0])  # the class-1 box; explain class 0 there
    heat = explain(toy, image, "gradcam", CamTarget(wide, 0))
    assert heat.shape == (H, W) and heat.max() > 0.5


class BrightnessDetector(ToyDetector):
    """Its one feature channel is the image's brightness, so EigenCAM's map is the brightness itself: the heat map
    must show a bright object where it is in the image."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 1, 1)
        nn.init.constant_(conv.weight, 1 / 3)
        nn.init.zeros_(conv.bias)
        self.net = nn.Sequential(conv, nn.ReLU())


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_the_heat_map_lies_on_the_image_under_either_resize(resize):
    img = np.zeros((H, W, 3), np.uint8)
    img[20:60, 30:80] = 255  # centre (54.5, 39.5); a letterboxed input is 64 x 41 of image over grey padding
    heat = explain(BrightnessDetector().eval(), img, "eigencam", resize=resize)
    hot = np.argwhere(heat > 0.5)
    assert heat.shape == (H, W)
    assert abs(hot[:, 0].mean() - 39.5) < 3 and abs(hot[:, 1].mean() - 54.5) < 3


def test_detections_of_a_letterboxed_model_come_back_in_image_pixels(image):
    toy = ToyDetector().eval()  # boxes: the input's left and right halves, 64 x 64 input
    content_h = round(H * 64 / W)  # letterbox: the 140 x 90 image fills 64 x 41 of the input
    for resize, (sx, sy) in (("square", (W / 64, H / 64)), ("letterbox", (W / 64, H / content_h))):
        boxes = detections(toy, image, resize)["boxes"]
        expected = np.array([[0, 0, 32 * sx, 64 * sy], [32 * sx, 0, 64 * sx, 64 * sy]])
        np.testing.assert_allclose(boxes[np.argsort(boxes[:, 0])], expected, rtol=1e-6)
    tensor, content = model_input(image, 64, resize="letterbox")
    assert tensor.shape == (1, 3, 64, 64) and content == (64, content_h)
