"""What is particular to the one-stage families (RetinaNet, FCOS, SSDlite): their box and label conventions
checked against their own anchors, learning end to end, scale views, anchors at every input size, torchvision's
full-size builders and the shipped configs.

The contract every family shares (losses, predictions, modes, checkpoints, Lite0 weights, offline errors) is
parametrised over all families in tests/test_models.py; this file reuses its tiny configs and helpers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from pipeline.config import ModelConfig, load_config
from pipeline.models import FCOSDetector, create_model, load_backbone_weights
from pipeline.models.retinanet import group_norm
from pipeline.models.timm_fpn import LevelStrideAnchorGenerator
from pipeline.tta import check_views, predict_views
from tests.test_models import NUM_CLASSES, S, batch, build, no_network, one_thread, train_steps

__all__ = ["no_network", "one_thread"]  # the autouse fixtures of test_models apply here too

ONE_STAGE = ["retinanet_timm", "fcos_timm", "ssdlite_timm"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------- box and label conventions, through the real post-processing


def _fire_one(model, cls: int, side: int, margin: float) -> list[torch.Tensor]:
    """Replace the head's outputs: exactly one anchor holds an object of 0-based class `cls`, with a box code that
    decodes to a tall box inside the side x side input. Returns a list that receives that box (x1, y1, x2, y2) when
    the head runs, so the real post-processing (decode, thresholds, NMS, transform, label offset) is under test."""
    net, fcos, expected = model.net, isinstance(model, FCOSDetector), []

    def head(features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        anchors = net.anchor_generator(ImageList(torch.zeros(1, 3, side, side), [(side, side)]), features)[0]
        cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        size = anchors[:, 2] - anchors[:, 0]
        # FCOS's points are anchors of side = stride; its codes are distances to the box sides in those units
        boxes = torch.stack([cx - size, cy - 3 * size, cx + size, cy + 3 * size], 1) if fcos else anchors
        tall = boxes[:, 3] - boxes[:, 1] > 1.5 * (boxes[:, 2] - boxes[:, 0])
        inside = (boxes >= margin).all(1) & (boxes <= side - margin).all(1)
        k = int(torch.nonzero(tall & inside)[0])
        n, count = features[0].shape[0], anchors.shape[0]
        logits = torch.full((n, count, model.num_classes + model.label_offset), -20.0)
        if model.label_offset:  # softmax with a background column: every other anchor is background
            logits[:, :, 0] = 20.0
            logits[:, k, 0] = -20.0
        logits[:, k, cls + model.label_offset] = 20.0
        out = {"cls_logits": logits, "bbox_regression": torch.zeros(n, count, 4)}
        if fcos:
            out["bbox_regression"][:, k] = torch.tensor([1.0, 3.0, 1.0, 3.0])
            out["bbox_ctrness"] = torch.full((n, count, 1), 20.0)
        expected.append(boxes[k])
        return out

    net.head.forward = head
    return expected


@pytest.mark.parametrize("family", ONE_STAGE)
def test_one_firing_anchor_decodes_to_its_box_and_class(family: str) -> None:
    """Only one anchor fires, as class 2: the detection must be exactly that anchor's box (FCOS: the box its
    point and codes describe) in input pixels, with label 2. Fails for swapped x/y (the box is tall), boxes left
    in another frame, or a label off by the background class."""
    model = build(family).eval()
    expected = _fire_one(model, cls=2, side=S, margin=4)
    det = model.predict(torch.rand(1, 3, S, S))[0]
    assert len(det["scores"]) == 1 and det["labels"][0] == 2 and det["scores"][0] > 0.99
    torch.testing.assert_close(det["boxes"][0], expected[-1], rtol=0, atol=1e-3)


@pytest.mark.parametrize("family", ["retinanet_timm", "fcos_timm"])
def test_one_firing_anchor_through_a_scale_view_comes_back_in_the_original_frame(family: str) -> None:
    # scale2: the network runs at 256 px with 256 px anchors; the box comes back halved into the 128 px frame
    model = build(family).eval()
    expected = _fire_one(model, cls=1, side=2 * S, margin=8)
    det = predict_views(model, torch.rand(1, 3, S, S), ["scale2"], batch_size=1)[0]["scale2"]
    assert len(det["scores"]) == 1 and det["labels"][0] == 1
    torch.testing.assert_close(det["boxes"][0], expected[-1] / 2, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("family", ONE_STAGE)
def test_predicts_the_drawn_boxes_in_input_pixels_after_overfitting(family: str) -> None:
    # Learning end to end: the best boxes land on the drawn rectangles with their classes, which fails for
    # swapped coordinates (IoU 0.18 on the tall box), normalised boxes (0), boxes in another frame (a 2x scale:
    # <= 0.25) or an off-by-one label. 0.4, not 0.5: SSDlite's BatchNorm (momentum 0.03) has running statistics
    # still far from its batch statistics after 40 steps, and its eval-mode tall box reached IoU 0.44-0.46.
    model = build(family).train()
    images, targets = batch()
    train_steps(model, images, targets, steps=40, lr=2e-3)
    for det, tgt in zip(model.eval().predict(images), targets):
        assert det["labels"][0] == tgt["labels"][0]
        top = det["boxes"][:3][det["labels"][:3] == tgt["labels"][0]]
        assert box_iou(top, tgt["boxes"]).max().item() > 0.4


# ----------------------------------------------------------------------------------------------- input sizes


def test_ssdlite_refuses_scale_views_and_says_why() -> None:
    model = build("ssdlite_timm")
    check_views(model, ["none", "hflip", "rot90_1"])
    with pytest.raises(ValueError, match=r"'scale1.25'.*160x160.*only its own 128x128.*default boxes"):
        check_views(model, ["none", "scale1.25"])
    with pytest.raises(ValueError, match=r"only its own 128x128.*\(1, 3, 256, 256\)"):
        model.predict(torch.rand(1, 3, 2 * S, 2 * S))


def test_ssdlite_runs_at_its_own_size_whatever_it_is() -> None:
    # torchvision fixes SSDlite at 320 px; here the transform keeps image_size, so the loader's 192 px images are
    # neither resized to 320 inside nor predicted in 320 px coordinates
    model = build("ssdlite_timm", image_size=192).eval()
    sides: list[int] = []
    model.backbone.register_forward_pre_hook(lambda mod, args: sides.append(args[0].shape[-1]))
    det = model.predict(torch.rand(2, 3, 192, 192))
    assert sides == [192] and all((d["boxes"] <= 192).all() for d in det)


@pytest.mark.parametrize("name", ["ssdlite_timm", "ssdlite320_mobilenet_v3_large"])
def test_ssdlite_refuses_a_non_square_image_size_and_says_what_to_use(name: str) -> None:
    """SSDlite's default boxes are fractions of each side: on a non-square input they would stretch with it, so a
    [W, H] image_size is refused when the model is built, with the square-plus-letterbox alternative."""
    cfg = ModelConfig(name=name, arch="mobilenetv3_small_050" if name == "ssdlite_timm" else "",
                      image_size=[256, 128])
    with pytest.raises(ValueError, match=rf"(?s){name}: model.image_size \[256, 128\] is not square.*square "
                                         r"inputs only.*letterbox"):
        create_model(cfg, NUM_CLASSES)
    # a square [W, H] pair is the side: built as before
    assert build("ssdlite_timm", image_size=[S, S]).image_size == S


def _torchvision_anchors(sizes, ratios, side: int, grids: list[int]) -> list[torch.Tensor]:
    images = ImageList(torch.zeros(1, 3, side, side), [(side, side)])
    features = [torch.zeros(1, 1, g, g) for g in grids]
    return AnchorGenerator(sizes, ratios)(images, features)


def test_level_stride_anchors_equal_torchvisions_where_the_side_divides_and_step_by_the_stride_elsewhere() -> None:
    sizes, ratios, strides = ((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3, (32, 64, 128)
    ours = LevelStrideAnchorGenerator(sizes, ratios, strides)
    images = ImageList(torch.zeros(1, 3, 256, 256), [(256, 256)])
    grids = [8, 4, 2]
    got = ours(images, [torch.zeros(1, 1, g, g) for g in grids])[0]
    assert torch.equal(got, _torchvision_anchors(sizes, ratios, 256, grids)[0])
    # 160 px: grids 5, 3, 2 (stride-2 convs round up). torchvision steps P7 by 160 // 2 = 80; the network's cell
    # 1 of P7 sits at 128
    grids = [5, 3, 2]
    got = ours(ImageList(torch.zeros(1, 3, 160, 160), [(160, 160)]), [torch.zeros(1, 1, g, g) for g in grids])[0]
    centres = (got[:, :2] + got[:, 2:]) / 2
    p7 = centres[-2 * 2 * 3:]  # the last level: 2x2 cells x 3 ratios
    assert sorted(set(p7[:, 0].tolist())) == [0.0, 128.0]
    tv = _torchvision_anchors(sizes, ratios, 160, grids)[0]
    assert sorted(set(((tv[-12:, 0] + tv[-12:, 2]) / 2).tolist())) == [0.0, 80.0]


@pytest.mark.parametrize("family", ["retinanet_timm", "fcos_timm"])
def test_a_single_image_whose_p7_is_one_cell_predicts(family: str) -> None:
    # at 128 px P7 is 1x1: GroupNorm with one channel per group would normalise a single value (torch raises for a
    # batch of one); the 32-channel test FPN gets 16 groups of 2 channels, a 256-channel one torchvision's 32 of 8
    model = build(family).eval()
    assert len(model.predict(torch.rand(1, 3, S, S))) == 1
    norms = [m for m in model.net.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all((m.num_groups, m.num_channels) == (16, 32) for m in norms)
    assert [group_norm(c)(c).num_groups for c in (256, 64, 32, 1)] == [32, 32, 16, 1]


def test_anchor_sizes_need_one_group_per_level() -> None:
    with pytest.raises(ValueError, match="one group of sizes per level"):
        build("retinanet_timm", options={"fpn_channels": 32, "anchor_sizes": [[16], [32], [64]]})
    with pytest.raises(ValueError, match="same number of anchor sizes"):
        build("retinanet_timm", options={"fpn_channels": 32, "anchor_sizes": [[16], [32], [64], [128], [256, 300]]})


# ----------------------------------------------------------------------------------- torchvision's full builders


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"])
def test_torchvision_resnet50_builders_train_and_predict(name: str) -> None:
    # the full-size torchvision models (32-38M parameters) get one smoke test; the timm variants cover the rest
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, image_size=S, max_detections=20), NUM_CLASSES)
    images, targets = batch()
    assert torch.isfinite(model.train().forward_loss(images[:1], targets[:1])["loss"])
    det = model.eval().predict(images[:1])[0]
    assert 0 < len(det["scores"]) <= 20
    assert ((det["labels"] >= 0) & (det["labels"] < NUM_CLASSES)).all()
    assert model.accepts_size(2 * S) and not model.accepts_size(S + 8)


def test_torchvision_ssdlite_builds_at_image_size_and_takes_a_mobilenet_v3_imagenet_file(tmp_path: Path) -> None:
    """Without hub weights torchvision would build the reduced tail; a torchvision mobilenet_v3_large ImageNet
    file needs the full one. It maps onto the SSDlite extractor by order (its C4 block is split in two)."""
    import torchvision

    torch.manual_seed(3)
    imagenet = torchvision.models.mobilenet_v3_large().state_dict()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(imagenet, path)
    cfg = ModelConfig(name="ssdlite320_mobilenet_v3_large", image_size=S, backbone_weights=str(path))
    model = create_model(cfg, NUM_CLASSES)
    assert torch.equal(model.backbone[1][-1][0].weight, imagenet["features.16.0.weight"])  # the last 1x1 conv
    report = load_backbone_weights(model.backbone, path)
    assert report.mapping == "order" and report.unexpected == ["classifier.0.weight", "classifier.0.bias",
                                                               "classifier.3.weight", "classifier.3.bias"]
    images, targets = batch()
    assert torch.isfinite(model.train().forward_loss(images, targets)["loss"])
    assert len(model.eval().predict(images)) == 2
    reduced = create_model(ModelConfig(name="ssdlite320_mobilenet_v3_large", image_size=S), NUM_CLASSES)
    assert reduced.backbone[1][-1][0].weight.shape[0] == imagenet["features.16.0.weight"].shape[0] // 2


def test_ssdlite_pretrained_with_box_options_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="pretrained COCO weights fix"):
        create_model(ModelConfig(name="ssdlite320_mobilenet_v3_large", image_size=S, pretrained=True,
                                 options={"min_ratio": 0.1}), NUM_CLASSES)


def test_one_stage_families_keep_labels_zero_based_inside_where_torchvision_has_no_background() -> None:
    # RetinaNet and FCOS score classes with sigmoids and no background column: K outputs for K classes
    for family in ("retinanet_timm", "fcos_timm"):
        assert build(family).net.head.classification_head.num_classes == NUM_CLASSES
    assert build("ssdlite_timm").net.head.classification_head.num_columns == NUM_CLASSES + 1


# -------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", [f"configs/{d}/{f}.yaml" for d in ("demo", "bccd")
                                  for f in ("retinanet", "fcos", "ssdlite")])
def test_shipped_family_configs_build_with_the_lite0_weights(path: str) -> None:
    cfg = load_config(REPO / path)
    assert cfg.model.backbone_weights == "lite0" and cfg.model.arch == "tf_efficientnet_lite0"
    model = create_model(cfg.model, len(cfg.data.classes))
    side = cfg.model.image_size
    assert model.accepts_size(side)
    check_views(model, cfg.predict.tta)  # every configured TTA view is one the family takes
