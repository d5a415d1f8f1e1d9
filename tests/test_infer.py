"""Inference from a bundle: streaming in chunks changes nothing but memory, the sample fixes the ids, a changed
file is refused, and the module needs neither MLflow nor anything a Kaggle image lacks beyond the bundle."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline import bundle, infer
from pipeline.config import load_config
from pipeline.formats import validate_submission
from test_bundle import fake_trained_ensemble


@pytest.fixture(scope="module")
def ensemble_yaml(tmp_path_factory, tiny_data):
    # one member keeps these tests fast; test_bundle's end-to-end test runs two architectures
    return fake_trained_ensemble(tmp_path_factory.mktemp("fake_run"), tiny_data, members=("frcnn",))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, ensemble_yaml):
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    bundle.run(load_config(ensemble_yaml), out, bundle.BundleOptions(wheels=False))
    return out


@pytest.mark.slow
def test_chunked_streaming_gives_the_same_table_as_one_chunk(packed, tiny_data, tmp_path, monkeypatch):
    seen = []
    real = infer.predict_with_views

    def counting(model, records, *args, **kwargs):
        seen.append(len(records))
        return real(model, records, *args, **kwargs)

    monkeypatch.setattr(infer, "predict_with_views", counting)
    opts = dict(batch_size=2, progress=False)
    whole = infer.run(packed, tiny_data / "test", tmp_path / "whole.csv", opts=infer.InferOptions(chunk_size=100, **opts))
    assert seen == [6] * 2  # 2 folds, all 6 test images at once
    seen.clear()
    chunked = infer.run(packed, tiny_data / "test", tmp_path / "chunked.csv", opts=infer.InferOptions(chunk_size=2, **opts))
    assert seen == [2] * 6 and chunked["chunk"] == 2  # 3 chunks x 2 models, never more than a chunk at once
    assert len(whole["fused"]) > 0 and whole["fused"].image_id.nunique() > 1
    assert (whole["fused"].score >= 0.02).all()  # the tuned score threshold was applied
    assert whole["fused"].groupby("image_id").size().max() == 100  # cut to what COCO mAP reads, per chunk
    pd.testing.assert_frame_equal(chunked["fused"], whole["fused"])
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_chunks_round_up_to_every_members_batch_size():
    members = [infer.Member(name, SimpleNamespace(predict=SimpleNamespace(batch_size=b)), [], {}, None)
               for name, b in (("a", 4), ("b", 6))]
    assert [infer.chunk_length(n, members) for n in (1, 12, 13, 24)] == [12, 12, 24, 24]


@pytest.mark.slow
def test_cli_follows_the_sample_and_counts_images_it_does_not_list(packed, tiny_data, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "test", images)
    shutil.copy(next(images.iterdir()), images / "not_in_sample.jpg")
    sample = tiny_data / "sample_submission.csv"
    out = tmp_path / "submission.csv"
    code = infer.main(["--bundle", str(packed), "--images", str(images), "--out", str(out),
                       "--sample-submission", str(sample), "--no-progress", "--batch-size", "3"])
    assert code == 0
    validate_submission(out, "label_conf_xyxy", sample, n_classes=3)
    assert sorted(pd.read_csv(out).image_id) == sorted(pd.read_csv(sample).image_id)
    captured = capsys.readouterr()
    assert "skipped 1 image(s)" in captured.err and "ms per image" in captured.out

    (images / f"{pd.read_csv(sample).image_id.iloc[0]}.jpg").unlink()
    assert infer.main(["--bundle", str(packed), "--images", str(images), "--out", str(tmp_path / "x.csv"),
                       "--sample-submission", str(sample), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(sample) in err and "1 image id(s) have no image" in err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.slow
def test_an_fp16_bundle_runs_and_writes_a_valid_submission(ensemble_yaml, tiny_data, tmp_path):
    half = tmp_path / "half"
    bundle.run(load_config(ensemble_yaml), half, bundle.BundleOptions(wheels=False, half=True))
    sample = tiny_data / "sample_submission.csv"
    result = infer.run(half, tiny_data / "test", tmp_path / "s.csv", sample, infer.InferOptions(progress=False))
    validate_submission(result["submission"], "label_conf_xyxy", sample, n_classes=3)
    assert len(result["fused"]) > 0 and result["images"] == 6


def test_a_weight_file_changed_after_bundling_is_refused(packed, tiny_data, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(packed, copy)
    weights = copy / "weights/frcnn/fold1.pt"
    weights.write_bytes(weights.read_bytes()[:-10])  # an interrupted upload
    with pytest.raises(infer.InferError, match="fold1.pt: its sha256 differs"):
        infer.run(copy, tiny_data / "test", tmp_path / "s.csv", opts=infer.InferOptions(progress=False))
    manifest = json.loads((copy / infer.MANIFEST).read_text())
    (copy / infer.MANIFEST).write_text(json.dumps({**manifest, "bundle_format": 99}))
    with pytest.raises(infer.InferError, match="bundle format 99"):
        infer.run(copy, tiny_data / "test", tmp_path / "s.csv", opts=infer.InferOptions(progress=False))
    assert infer.MANIFEST == bundle.MANIFEST and infer.BUNDLE_FORMAT == bundle.BUNDLE_FORMAT


@pytest.mark.slow
def test_imports_without_mlflow_and_needs_only_the_bundle_and_the_image():
    # a clean interpreter: in this one, other tests have long imported MLflow and everything else
    probe = ("import sys; sys.modules['mlflow'] = None; import pipeline.infer; "
             "print(sorted(m for m, mod in sys.modules.items() if mod is not None and "
             "m.startswith(('pipeline.', 'mlflow', 'matplotlib'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])
    assert "pipeline.tracking" not in loaded and not any(m.startswith(("mlflow", "matplotlib")) for m in loaded)
    assert not {"pipeline.train", "pipeline.predict", "pipeline.ensemble", "pipeline.submission"} & set(loaded)
    imported = bundle.infer_import_distributions()
    assert "effdet" in imported and "torch" in imported
    assert bundle.uncovered_imports(imported, set(bundle.BUNDLED_DISTRIBUTIONS), set(bundle.KAGGLE_IMAGE)) == {}


@pytest.mark.slow
def test_an_nms_ensemble_fuses_each_members_fold_models_first_in_every_chunk(tmp_path, tiny_data, monkeypatch):
    # the ensemble stage records fold_fusion for a rule that keeps one box's own score: the notebook fuses each
    # member x view's fold models by WBF first, chunk by chunk, as the stage fused test
    from pipeline.data import load_dataset
    from pipeline.fusion import fuse_tuned
    from pipeline.io import atomic_write_text
    from pipeline.layout import ENSEMBLE_RESULT, ensemble_dir

    ens = fake_trained_ensemble(tmp_path / "run", tiny_data, members=("frcnn",))
    path = ensemble_dir(load_config(ens)) / ENSEMBLE_RESULT
    result = json.loads(path.read_text())
    wbf = {"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg"}
    result["params"] = {"method": "nms", "iou_thr": 0.5, "score_thr": 0.02, "weights": {"frcnn": 1.0},
                        "fold_fusion": {"frcnn": wbf}}
    atomic_write_text(path, json.dumps(result))
    out = tmp_path / "bundle"
    manifest = bundle.run(load_config(ens), out, bundle.BundleOptions(wheels=False))
    assert manifest["fusion"]["fold_fusion"] == {"frcnn": wbf}
    raw = []
    real = infer.predict_chunk
    monkeypatch.setattr(infer, "predict_chunk", lambda *a: raw.append(real(*a)) or raw[-1])
    opts = dict(batch_size=2, progress=False)
    whole = infer.run(out, tiny_data / "test", tmp_path / "whole.csv",
                      opts=infer.InferOptions(chunk_size=100, **opts))["fused"].reset_index(drop=True)
    chunked = infer.run(out, tiny_data / "test", tmp_path / "chunked.csv",
                        opts=infer.InferOptions(chunk_size=2, **opts))["fused"].reset_index(drop=True)
    pd.testing.assert_frame_equal(chunked, whole)
    # the first run's one chunk holds every raw prediction: fused with the plan it is the notebook's table
    preds, sets = raw[0], [("frcnn", f, v) for f in (0, 1) for v in manifest["members"][0]["views"]]
    sizes = load_dataset(load_config(ens).data, "test").images
    params = {k: v for k, v in manifest["fusion"].items() if k != "backend"}
    top, group = manifest["submission"]["max_boxes_per_image"], ("model", "fold", "tta")

    def fused(p):
        return infer.keep_top_boxes(fuse_tuned(preds, sizes, p, sets, group, name=manifest["ensemble"]),
                                    top).reset_index(drop=True)

    assert len(whole) > 0
    pd.testing.assert_frame_equal(whole, fused(params))
    as_sets = fused({k: v for k, v in params.items() if k != "fold_fusion"})  # and not the fold models as sets
    assert len(as_sets) != len(whole) or not as_sets[["x1", "score"]].equals(whole[["x1", "score"]])
