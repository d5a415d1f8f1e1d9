"""Predictions come back in original-image pixels: the resize is inverted per axis."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import TrainConfig
from pipeline.data.table import AnnotationTable
from pipeline.dataset import EvalDataset, collate, make_records
from pipeline.engine import NonFiniteLossError, predict, resolve_precision


class CornerDetector(torch.nn.Module):
    """Finds the bright rectangle: its extent in the (resized) input, score 0.9, label 1."""

    def predict(self, images):
        out = []
        for image in images:
            ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def test_predictions_are_mapped_back_to_original_pixels(tmp_path):
    pixels = np.zeros((120, 200, 3), np.uint8)  # 200 wide, 120 high: not square, not the model size
    pixels[30:90, 40:120] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    images = __import__("pandas").DataFrame({"image_id": ["a"], "path": [str(tmp_path / "a.png")], "width": [200], "height": [120]})
    table = AnnotationTable(images, None, ["x", "y"])
    loader = DataLoader(EvalDataset(make_records(table, ["a"]), 64), batch_size=1, collate_fn=collate)
    preds = predict(CornerDetector(), loader, resolve_precision(TrainConfig(), torch.device("cpu")), 64, "m", 2, "none")
    row = preds.iloc[0]
    # 64 px input: x scale 200/64, y scale 120/64; the rectangle edges survive the resize within a pixel
    assert abs(row.x1 - 40) <= 200 / 64 and abs(row.x2 - 120) <= 200 / 64
    assert abs(row.y1 - 30) <= 120 / 64 and abs(row.y2 - 90) <= 120 / 64
    assert (row.model, row.fold, row.tta, row.label) == ("m", 2, "none", 1)


def test_eval_dataset_scales_ground_truth_into_the_input_frame(tmp_path):
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(tmp_path / "b.jpg")
    images = __import__("pandas").DataFrame({"image_id": ["b"], "path": [str(tmp_path / "b.jpg")], "width": [300], "height": [100]})
    boxes = __import__("pandas").DataFrame({"image_id": ["b"], "x1": [30.0], "y1": [10.0], "x2": [150.0], "y2": [50.0], "label": [0]})
    image, target, meta = EvalDataset(make_records(AnnotationTable(images, boxes, ["x"]), ["b"]), 60)[0]
    assert image.shape == (3, 60, 60) and image.dtype == torch.uint8
    assert torch.allclose(target["boxes"], torch.tensor([[6.0, 6.0, 30.0, 30.0]]))
    assert meta == {"image_id": "b", "width": 300, "height": 100}


def test_a_non_square_input_is_inverted_per_axis_by_its_own_width_and_height(tmp_path):
    """model.image_size [200, 120] for a 200 x 120 image: the input is the image (scale 1 per axis), so the finder's
    box is the rectangle exactly; at [100, 30] each axis has its own scale (2 and 4), and the meta's default
    content is the whole 100 x 30 input, not a square."""
    from pipeline.engine import input_to_original

    pixels = np.zeros((120, 200, 3), np.uint8)
    pixels[32:88, 40:120] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    images = __import__("pandas").DataFrame({"image_id": ["a"], "path": [str(tmp_path / "a.png")], "width": [200],
                                             "height": [120]})
    records = make_records(AnnotationTable(images, None, ["x", "y"]), ["a"])
    precision = resolve_precision(TrainConfig(), torch.device("cpu"))
    for size in ((200, 120), (100, 30)):  # edges land on whole input pixels at both: exact
        loader = DataLoader(EvalDataset(records, size), batch_size=1, collate_fn=collate)
        assert next(iter(loader))[0].shape == (1, 3, size[1], size[0])
        row = predict(CornerDetector(), loader, precision, size, "m", 0, "none").iloc[0]
        np.testing.assert_allclose([row.x1, row.y1, row.x2, row.y2], [40, 32, 120, 88], rtol=0, atol=1e-9)
    boxes, keep = input_to_original(np.array([[0.0, 0.0, 100.0, 30.0]]), {"width": 200, "height": 120}, (100, 30))
    assert keep.all() and np.array_equal(boxes, [[0.0, 0.0, 200.0, 120.0]])


# --- train.compile: the network compiled in place -----------------------------------------------------------------

def _traced_backend(graphs: list):
    """A torch.compile backend (registered by name, as train.compile_backend takes one) that records each graph
    dynamo hands it and runs it as traced: the numbers stay those of the eager model."""
    import torch._dynamo

    name = f"pipeline_test_traced_{id(graphs)}"

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.register_backend(name=name)(backend)
    return name


def _tiny(name: str, seed: int = 0):
    from conftest import EFFDET_TINY, FRCNN_TINY
    from pipeline.config import ModelConfig
    from pipeline.models import create_model

    torch.manual_seed(seed)
    return create_model(ModelConfig.model_validate({"efficientdet": EFFDET_TINY, "fasterrcnn_timm": FRCNN_TINY}[name]),
                        num_classes=2)


def _batch(n: int = 2, side: int = 128):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, side, side, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([0, 1])} for _ in range(n)]
    return images, targets


@pytest.mark.slow  # dynamo traces a whole EfficientDet: ~3-4 s (make test runs it)
def test_compile_network_compiles_the_families_network_in_place_and_keeps_its_state_dict_keys():
    from pipeline.engine import compile_network

    graphs: list = []
    model, eager = _tiny("efficientdet"), _tiny("efficientdet")
    keys = list(model.state_dict())
    images, targets = _batch()
    assert compile_network(model, TrainConfig()) == [] and not graphs  # off by default
    assert compile_network(model, TrainConfig(compile=True, compile_backend=_traced_backend(graphs))) == ["net"]
    model.train(), eager.train()
    compiled_losses, eager_losses = model.forward_loss(images, targets), eager.forward_loss(images, targets)
    assert graphs, "the network never went through torch.compile"
    assert torch.allclose(compiled_losses["loss"], eager_losses["loss"], rtol=1e-5, atol=1e-6)
    # in place: the same keys, so a checkpoint of a compiled run loads into a model that never was
    assert list(model.state_dict()) == keys
    _tiny("efficientdet", seed=3).load_state_dict(model.state_dict(), strict=True)


def test_every_family_names_parts_to_compile_that_exist():
    from pipeline.engine import compile_network

    for name, parts in [("efficientdet", ["net"]), ("fasterrcnn_timm", ["net.backbone"])]:
        model = _tiny(name)
        assert list(model.compiled_parts) == parts and all(model.get_submodule(p) is not None for p in parts)
    toy = CornerDetector()
    toy.compiled_parts = ()
    with pytest.raises(ValueError, match="names no part to compile"):
        compile_network(toy, TrainConfig(compile=True))


@pytest.mark.slow  # dynamo traces a Faster R-CNN backbone: ~2-3 s (make test runs it)
def test_a_compiled_epoch_reports_its_first_step_and_an_eager_one_does_not():
    from pipeline.engine import LossModule, compile_network, train_one_epoch

    def epoch(compile_setting):
        model = _tiny("fasterrcnn_timm")
        cfg = TrainConfig(compile=compile_setting, compile_backend=_traced_backend([]), progress=False)
        compile_network(model, cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        images, targets = _batch()
        loader = [((images * 255).to(torch.uint8), targets, None)] * 2
        stats, step = train_one_epoch(LossModule(model), optimizer, scheduler, scaler, None, loader,
                                      resolve_precision(cfg, torch.device("cpu")), cfg, 0, 0)
        return stats, step

    compiled, step = epoch(True)
    assert step == 2 and 0 < compiled["first_step_s"] and torch.isfinite(torch.tensor(compiled["train_loss"]))
    assert "first_step_s" not in epoch(False)[0]


@pytest.mark.slow  # dynamo traces a whole EfficientDet: ~3-4 s (make test runs it)
def test_prediction_runs_a_compiled_network_eagerly(tmp_path):
    # train.compile is for the training steps: validation and the OOF (engine.predict) compile nothing
    from pipeline.engine import compile_network

    graphs: list = []
    model = _tiny("efficientdet")
    compile_network(model, TrainConfig(compile=True, compile_backend=_traced_backend(graphs)))
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(tmp_path / "a.png")
    images = __import__("pandas").DataFrame({"image_id": ["a"], "path": [str(tmp_path / "a.png")], "width": [128],
                                             "height": [128]})
    loader = DataLoader(EvalDataset(make_records(AnnotationTable(images, None, ["x", "y"]), ["a"]), 128),
                        batch_size=1, collate_fn=collate)
    predict(model, loader, resolve_precision(TrainConfig(), torch.device("cpu")), 128, "m", 0, "none")
    assert not graphs
    model.train()
    model.forward_loss(*_batch())
    assert graphs  # the training step still compiles


# --- the epoch's losses: read on the host a window of steps at a time ---------------------------------------------

class ScriptedLoss(torch.nn.Module):
    """Each call returns the next scripted total loss (times a parameter, so there is a backward and a step);
    ``fail_at``: that call raises instead."""

    def __init__(self, totals: list[float], fail_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.totals, self.fail_at, self.calls = totals, fail_at, 0

    def forward(self, images, targets):
        i, self.calls = self.calls, self.calls + 1
        if i == self.fail_at:
            raise RuntimeError("the batch broke")
        part = self.w * self.totals[i]
        return {"part": part, "loss": part * 2}


def _scripted_epoch(module: ScriptedLoss, steps: int, epoch: int = 7, global_step: int = 10):
    from pipeline.engine import train_one_epoch

    cfg = TrainConfig(progress=False, clip_grad_norm=None)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)  # the scripted losses stay as scripted
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), [{"boxes": torch.zeros(0, 4)}], None)
    return train_one_epoch(module, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), None,
                           [batch] * steps, resolve_precision(cfg, torch.device("cpu")), cfg, epoch, global_step)


def test_the_epochs_losses_are_the_means_of_its_steps():
    stats, step = _scripted_epoch(ScriptedLoss([1.0, 2.0, 3.0, 4.5]), 4)
    assert step == 14 and stats["train_part"] == 2.625 and stats["train_loss"] == 5.25


def test_a_non_finite_loss_is_named_by_its_step_though_read_later():
    module = ScriptedLoss([1.0, float("nan"), 3.0, 4.0, 5.0])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 7, step 1 \(global step 11\)"):
        _scripted_epoch(module, 5)
    assert module.calls == 5  # read at the end of the epoch: no wait for the device at each step


def test_a_non_finite_loss_is_found_within_one_read_window():
    from pipeline.engine import LOSS_READ_EVERY

    module = ScriptedLoss([1.0] * 3 + [float("inf")] + [1.0] * 200)
    with pytest.raises(NonFiniteLossError, match=r"step 3 "):
        _scripted_epoch(module, 200)
    assert module.calls == LOSS_READ_EVERY


def test_a_failure_after_a_non_finite_loss_names_the_loss_first():
    # steps after a NaN train a broken model, which may fail in other ways before the losses are read: the NaN is
    # the cause to report, the failure its context
    with pytest.raises(NonFiniteLossError, match=r"step 1 ") as caught:
        _scripted_epoch(ScriptedLoss([1.0, float("nan"), 3.0], fail_at=2), 3)
    assert isinstance(caught.value.__context__, RuntimeError)
    with pytest.raises(RuntimeError, match="the batch broke"):  # no NaN before it: the failure itself
        _scripted_epoch(ScriptedLoss([1.0, 2.0, 3.0], fail_at=2), 3)


# --- the prediction table of a loader batch at once ---------------------------------------------------------------

def _one_image_table(out: dict, meta: dict, size, model_name: str, fold: int, tta: str):
    """The per-image table as the predict paths built it before ``detections_table`` (the reference)."""
    import pandas as pd
    from pipeline.config import input_wh
    from pipeline.layout import PREDICTION_COLUMNS

    width, height = input_wh(size)
    cw, ch = meta.get("content_width", width), meta.get("content_height", height)
    boxes = out["boxes"].float().cpu().numpy().reshape(-1, 4).astype(np.float64, copy=True)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, cw) * (meta["width"] / cw)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, ch) * (meta["height"] / ch)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, n = boxes[keep], int(keep.sum())
    return pd.DataFrame({
        "image_id": [meta["image_id"]] * n, "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
        "score": out["scores"].float().cpu().numpy()[keep], "label": out["labels"].cpu().numpy().astype(np.int64)[keep],
        "model": model_name, "fold": fold, "tta": tta})[PREDICTION_COLUMNS]


def test_a_batch_table_is_each_image_and_views_table_number_for_number():
    import pandas as pd
    from pipeline.engine import detections_table
    from pipeline.layout import normalise_predictions

    rng = np.random.default_rng(0)
    for size in (96, (160, 96)):
        found = []
        for k in range(12):
            n = int(rng.integers(0, 6))  # some images without detections
            xy = rng.uniform(-20, 150, (n, 2))  # some boxes leave the input, some lie in a letterbox's padding
            boxes = torch.tensor(np.c_[xy, xy + rng.uniform(0, 40, (n, 2))], dtype=torch.float32)
            meta = {"image_id": f"i{k // 3}", "width": int(rng.integers(50, 900)), "height": int(rng.integers(50, 900))}
            if k % 2:
                meta.update(content_width=int(rng.integers(40, 97)), content_height=int(rng.integers(40, 97)))
            det = {"boxes": boxes, "scores": torch.rand(n, dtype=torch.float32), "labels": torch.randint(0, 3, (n,))}
            found.append((det, meta, ["none", "hflip", "scale0.75"][k % 3]))
        expected = normalise_predictions(pd.concat([_one_image_table(d, m, size, "m", 2, v) for d, m, v in found],
                                                   ignore_index=True))
        got = normalise_predictions(detections_table(found, size, "m", 2))
        assert 0 < len(got) < sum(len(d["scores"]) for d, _, _ in found)  # cases of each kind: kept and dropped
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    assert len(detections_table([], 96, "m", 0)) == 0
