"""Where a detector looks: Grad-CAM and EigenCAM heat maps through the maintained ``grad-cam`` package.

    heat = explain(detector, image, "gradcam", CamTarget(box, label))   # (H, W) float32 in [0, 1]
    picture = overlay(image, heat)                                      # (H, W, 3) uint8, a jet heat map

Only the glue the library does not have lives here; the CAM arithmetic is ``pytorch_grad_cam``'s:

- **One path for every family.** The library calls ``model(images)`` and scores the output with a target;
  :class:`_DifferentiablePredict` is a ``Detector``'s own prediction (same checks, eval mode, ``_detect``,
  ``_finish``) without ``predict``'s ``torch.no_grad``, so it returns our detections, ``{"boxes", "scores",
  "labels"}`` in input pixels with 0-based labels, with gradients. The library's ``FasterRCNNBoxScoreTarget``
  (IoU with the target box + score of the best-overlapping detection) reads exactly that format, so it serves
  every family, not only Faster R-CNN; :class:`_ClassBoxScoreTarget` only narrows it to the target's class.
- **Feature pyramids.** Detectors' feature layers return a list or a dict of levels, which the library's hooks
  (written for one tensor) cannot take gradients of. :class:`_PyramidTaps` hooks every level, counts a level no
  gradient reached as zero (Faster R-CNN's ``pool`` level feeds only the RPN, whose proposals are detached),
  and :func:`merge_levels` resizes the levels to one grid and stacks their channels, as the library's own
  ``fasterrcnn_reshape_transform`` does for its Faster R-CNN tutorial (without its ``abs``, which would be wrong
  for gradients).
- **Which layer.** :func:`cam_target_layers`: a family's ``Detector`` may define ``cam_target_layers()``
  itself; otherwise, by the network it holds, what the heads read: a torchvision detector's ``backbone`` (body
  + FPN for Faster R-CNN, as in the library's tutorial, RetinaNet and FCOS; SSD's feature extractor),
  EfficientDet's BiFPN; and for any other family its ``backbone`` property (the ImageNet feature extractor,
  which every family defines).
- **EigenCAM** needs no target: the first principal component of the feature layer, with the library's sign
  correction (SVD's sign is arbitrary; without it a map can come out inverted).

Frames: the model sees the image as :class:`pipeline.dataset.EvalDataset` feeds it (``resize``: the model's
``model.resize``): stretched to ``image_size`` (a side, or width x height) for ``square``, scaled to fit and padded
at the right and bottom for ``letterbox``. Boxes in original pixels are scaled per axis into the image's part of
the input (its content size); the heat map of that part (padding cropped) is resized back to the image's own size.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from pipeline.augment import Resize, fit_to_input
from pipeline.config import InputSize
from pipeline.models import Detector
from pipeline.models.base import eval_mode
from pipeline.models.efficientdet import EfficientDet  # effdet's class, imported there with its warnings silenced

with warnings.catch_warnings():  # ttach / scikit-learn deprecation chatter at import, not ours to fix
    warnings.simplefilter("ignore", DeprecationWarning)
    from pytorch_grad_cam import EigenCAM, GradCAM
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

METHODS = ("gradcam", "eigencam")
# Grid cells the merged pyramid may have. EigenCAM's SVD (numpy, full_matrices) builds an (H*W)^2 matrix: 48^2
# cells is ~40 MB; Grad-CAM has no such cost, so it keeps a finer grid.
MAX_CELLS = {"gradcam": 96 * 96, "eigencam": 48 * 48}


class CamError(ValueError):
    """A heat map that cannot be made as asked (unknown method, no detection to explain); says what to do."""


@dataclass(frozen=True)
class CamTarget:
    """The detection to explain: a box in original-image pixels and its 0-based class. The model's detection of
    that class overlapping it most (IoU > ``iou_threshold``) is what Grad-CAM differentiates."""

    box: tuple[float, float, float, float]
    label: int
    iou_threshold: float = 0.5


# ------------------------------------------------------------------------------------------ family glue

# By the network inside a Detector (torchvision's and effdet's classes, not our family modules, so a new family on
# one of these networks is covered without a line here): the features its heads read.
NETWORK_TARGET_LAYERS: dict[tuple[type, ...], Callable[[Any], list[nn.Module]]] = {
    # body + FPN (Faster R-CNN, RetinaNet, FCOS: levels "0".."n" and "pool"), or SSD's feature extractor
    (GeneralizedRCNN, RetinaNet, FCOS, SSD): lambda net: [net.backbone],
    (EfficientDet,): lambda net: [net.fpn],  # the BiFPN's P3..P7
}


def cam_target_layers(detector: Detector) -> list[nn.Module]:
    """The layers whose features the heat map is made of (see the module doc for the order of choices)."""
    own = getattr(detector, "cam_target_layers", None)
    if callable(own):
        return list(own())
    net = getattr(detector, "net", None)
    for classes, pick in NETWORK_TARGET_LAYERS.items():
        if isinstance(net, classes):
            return pick(net)
    try:
        return [detector.backbone]
    except NotImplementedError:
        raise CamError(f"{type(detector).__name__} defines neither `backbone` nor `cam_target_layers()`: "
                       "give it one of them to explain its detections") from None


def detect_with_grad(detector: Detector, images: Tensor) -> list[dict[str, Tensor]]:
    """``detector.predict(images)`` with gradients: the same checks, eval mode and output format."""
    detector._check_images(images)
    with eval_mode(detector):
        detections = detector._detect(images)
    return [detector._finish(d, images.shape[-1], images.shape[-2]) for d in detections]


class _DifferentiablePredict(nn.Module):
    """What the library calls as ``model(images)``."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        return detect_with_grad(self.detector, images)


def _levels(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [v for v in values if isinstance(v, Tensor) and v.ndim == 4]


def merge_levels(output: Any, max_cells: int) -> Tensor:
    """A feature pyramid (tensor, list or dict of (B, C, H, W) levels) as one (B, sum C, h, w) tensor on the grid
    of the finest level with at most ``max_cells`` cells; when no level is that small, the coarsest level's grid
    shrunk to fit. Larger levels are average-pooled onto the grid, smaller ones bilinearly upsampled."""
    levels = _levels(output)
    if not levels:
        raise CamError(f"the CAM target layer returned {type(output).__name__}, no (B, C, H, W) feature map")
    sizes = sorted({tuple(t.shape[-2:]) for t in levels}, key=lambda s: s[0] * s[1])
    fitting = [s for s in sizes if s[0] * s[1] <= max_cells]
    if fitting:
        grid = fitting[-1]
    else:
        h, w = sizes[0]
        shrink = (max_cells / (h * w)) ** 0.5
        grid = (max(1, int(h * shrink)), max(1, int(w * shrink)))
    return torch.cat([_on_grid(t, grid) for t in levels], dim=1)


def _on_grid(level: Tensor, grid: tuple[int, int]) -> Tensor:
    if tuple(level.shape[-2:]) == grid:
        return level
    if level.shape[-2] >= grid[0] and level.shape[-1] >= grid[1]:
        return nn.functional.adaptive_avg_pool2d(level, grid)
    return nn.functional.interpolate(level.float(), size=grid, mode="bilinear", align_corners=False)


class _PyramidTaps(ActivationsAndGradients):
    """The library's activation and gradient hooks, for a target layer that returns several feature maps."""

    def save_gradient(self, module: nn.Module, inputs: Any, output: Any) -> None:
        levels = _levels(output)
        slots: list[Tensor | None] = [None] * len(levels)
        self._taps.append((levels, slots))
        for i, level in enumerate(levels):
            if level.requires_grad:
                level.register_hook(partial(_store, slots, i))

    @property
    def gradients(self) -> list[Tensor]:
        merged = []
        for levels, slots in self._taps:
            if all(s is None for s in slots):  # no backward pass (EigenCAM) or nothing reached this layer
                continue
            grads = [s if s is not None else torch.zeros_like(t) for s, t in zip(slots, levels)]
            merged.append(self.reshape_transform(grads).cpu().detach())
        return merged

    @gradients.setter
    def gradients(self, value: list) -> None:  # the library resets with [] before every forward pass
        self._taps: list[tuple[list[Tensor], list[Tensor | None]]] = []

    def clear(self) -> None:
        super().clear()
        self._taps = []


def _store(slots: list, index: int, grad: Tensor) -> None:
    slots[index] = grad.detach()


class _ClassBoxScoreTarget(FasterRCNNBoxScoreTarget):
    """The library's target (IoU + score of the detection overlapping the box most) among the detections of the
    target's class only. With a low score threshold one object carries a box of every class, and the library's
    argmax over all of them can land on another class: a score of 0, no gradient, nothing explained."""

    def __call__(self, model_outputs: dict[str, Tensor]) -> Tensor:
        same = model_outputs["labels"] == int(self.labels[0])
        return super().__call__({k: v[same] for k, v in model_outputs.items()})


class _SignedEigenCAM(EigenCAM):
    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        return get_2d_projection_with_sign_correction(activations)


# ------------------------------------------------------------------------------------------------ API

def model_input(image: np.ndarray, size: InputSize, device: torch.device | str = "cpu",
                resize: Resize = "square") -> tuple[Tensor, tuple[int, int]]:
    """(1, 3, height, width) float in [0, 1] for ``size`` (a side or (width, height)), as the evaluation loader and
    engine give it to a model (:func:`pipeline.augment.fit_to_input`), and the image's content width and height
    in it."""
    fitted, content = fit_to_input(image, size, resize)
    tensor = torch.from_numpy(np.ascontiguousarray(fitted.transpose(2, 0, 1))).float().div(255.0)[None]
    return tensor.to(device), content


def cam_device(setting: str = "auto") -> torch.device:
    """``train.device`` as a device for the heat maps: "auto" is the GPU when there is one."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _device(detector: Detector) -> torch.device:
    return next(detector.parameters()).device


def detections(detector: Detector, image: np.ndarray, resize: Resize = "square") -> dict[str, np.ndarray]:
    """The model's own detections of ``image`` (H, W, 3 uint8), best first, boxes in original pixels
    (``resize``: how the model's input was made, ``model.resize``)."""
    h, w = image.shape[:2]
    images, (content_w, content_h) = model_input(image, detector.image_size, _device(detector), resize)
    out = detector.predict(images)[0]
    scale = np.array([w / content_w, h / content_h] * 2, dtype=np.float64)
    return {"boxes": out["boxes"].float().cpu().numpy().reshape(-1, 4) * scale,
            "scores": out["scores"].float().cpu().numpy(), "labels": out["labels"].cpu().numpy()}


def _target_in_input(target: CamTarget, width: int, height: int, content: tuple[int, int]) -> np.ndarray:
    content_w, content_h = content
    return np.asarray(target.box, dtype=np.float32) * np.array([content_w / width, content_h / height] * 2,
                                                               dtype=np.float32)


def _check_target(detector: Detector, images: Tensor, box: np.ndarray, target: CamTarget) -> None:
    """Grad-CAM differentiates a detection's score: refuse early when the model has none for this target."""
    from torchvision.ops import box_iou

    found = detector.predict(images)[0]
    same = found["labels"] == target.label
    if same.any():
        ious = box_iou(torch.as_tensor(box[None], dtype=torch.float32), found["boxes"][same].float().cpu())
        if float(ious.max()) > target.iou_threshold:
            return
    raise CamError(f"the model has no detection of class {target.label} overlapping box "
                   f"{[round(float(v), 1) for v in target.box]} by IoU > {target.iou_threshold}: there is no "
                   "score for Grad-CAM to explain; use method eigencam (it needs no target)")


def explain(detector: Detector, image: np.ndarray, method: str = "gradcam",
            target: CamTarget | None = None, resize: Resize = "square") -> np.ndarray:
    """The heat map of ``method`` for ``image`` (H, W, 3 uint8): (H, W) float32 in [0, 1].

    ``gradcam`` explains ``target`` (required); ``eigencam`` ignores it. ``resize``: how the model's input is made
    (``model.resize``); a letterboxed input's padding is cropped from the map."""
    if method not in METHODS:
        raise CamError(f"unknown CAM method {method!r}; known: {', '.join(METHODS)}")
    h, w = image.shape[:2]
    images, content = model_input(image, detector.image_size, _device(detector), resize)
    transform = partial(merge_levels, max_cells=MAX_CELLS[method])
    model = _DifferentiablePredict(detector)
    layers = cam_target_layers(detector)
    with eval_mode(detector):  # BaseCAM switches the model to eval; every submodule's own flag comes back
        if method == "eigencam":
            cam = _SignedEigenCAM(model, layers, reshape_transform=transform)
            targets = [FasterRCNNBoxScoreTarget([], [])]  # never called (no gradients); None would make the
            # library treat the output as classifier logits
        else:
            if target is None:
                raise CamError("gradcam explains one detection: give a CamTarget (box and class)")
            box = _target_in_input(target, w, h, content)
            _check_target(detector, images, box, target)
            cam = GradCAM(model, layers, reshape_transform=transform)
            targets = [_ClassBoxScoreTarget([target.label], [box], target.iou_threshold)]
        cam.activations_and_grads.release()  # the library's hooks take one tensor: ours take a pyramid
        cam.activations_and_grads = _PyramidTaps(model, layers, transform)
        try:
            with torch.set_grad_enabled(method == "gradcam"):
                heat = cam(images, targets=targets)[0]
        finally:
            cam.activations_and_grads.release()
    heat = np.nan_to_num(heat.astype(np.float32))[: content[1], : content[0]]  # the padding is not the image
    heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(heat, 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """``heat`` as a jet colour map blended over ``image`` (H, W, 3 uint8 RGB): (H, W, 3) uint8."""
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat map {heat.shape} and image {image.shape[:2]} differ in size")
    return show_cam_on_image(image.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=image_weight)


__all__ = ["CamError", "CamTarget", "NETWORK_TARGET_LAYERS", "METHODS", "cam_device", "cam_target_layers",
           "detect_with_grad", "detections", "explain", "merge_levels", "model_input", "overlay"]
