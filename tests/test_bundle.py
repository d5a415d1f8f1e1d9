"""The offline inference bundle: what it packs (manifest, weights, sizes, notebook), and end to end that its wheels
installed offline into a fresh environment reproduce the submission the chain wrote."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import EFFDET_TINY, FRCNN_TINY, write_config_dir
from pipeline import bundle, checkpoint, folds
from pipeline.config import load_config
from pipeline.data import load_dataset
from pipeline.engine import load_model_checkpoint
from pipeline.formats import content_hash, read_submission
from pipeline.io import atomic_write_text
from pipeline.layout import (BEST_CHECKPOINT, ENSEMBLE_RESULT, ensemble_dir, fold_dir, predictions_path,
                             write_predictions)
from pipeline.models import create_model

TUNED = {"iou_thr": 0.6, "skip_box_thr": 0.0, "score_thr": 0.02, "weights": {"frcnn": 1.0, "effdet": 2.0},
         "conf_type": "avg"}
CV = 0.4321


def fake_trained_ensemble(root: Path, data: Path, members: tuple[str, ...] = ("frcnn", "effdet")) -> Path:
    """A config folder whose stages have 'run' without training: the folds file, random-initialised fold models
    saved as training saves best.pt (with optimizer state a bundle must leave behind), OOF predictions that
    name the TTA views, and the ensemble's result.json with tuned fusion parameters. Returns ensemble.yaml."""
    models = {"frcnn": FRCNN_TINY, "effdet": EFFDET_TINY}
    config_dir = write_config_dir(root, data, {m: models[m] for m in members}, tracking={"enabled": False})
    ens = load_config(config_dir / "ensemble.yaml")
    folds.run(load_config(config_dir / "base.yaml"))
    n_classes = len(load_dataset(ens.data).classes)
    for i, spec in enumerate(ens.ensemble.members):
        cfg = ens.load_sibling(spec.config)
        for fold in range(cfg.folds.k):
            torch.manual_seed(10 * i + fold)
            model = create_model(cfg.model, n_classes)
            checkpoint.save({"model": model.state_dict(), "optimizer": {"momentum": torch.zeros(200_000)},
                             "epoch": 3, "score": 0.25 + fold / 100}, fold_dir(cfg, fold) / BEST_CHECKPOINT)
        oof = pd.DataFrame({"image_id": ["a", "a"], "x1": 1.0, "y1": 1.0, "x2": 9.0, "y2": 9.0, "score": 0.5,
                            "label": 0, "model": cfg.run, "fold": 0, "tta": ["hflip", "none"]})
        write_predictions(oof, predictions_path(cfg, "oof"))
    params = {**TUNED, "weights": {m: TUNED["weights"][m] for m in members}}
    result = {"ensemble": ens.ensemble.name, "metric": ens.metric, "members": list(members), "params": params,
              "oof": CV, "test_labelled": True}
    atomic_write_text(ensemble_dir(ens) / ENSEMBLE_RESULT, json.dumps(result))
    return config_dir / "ensemble.yaml"


@pytest.fixture(scope="module")
def ensemble_yaml(tmp_path_factory, tiny_data) -> Path:
    return fake_trained_ensemble(tmp_path_factory.mktemp("fake_run"), tiny_data)


@pytest.fixture(scope="module")
def built(ensemble_yaml, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    opts = bundle.BundleOptions(wheels=False, kaggle_user="someone", competition="global-wheat-detection")
    return out, bundle.run(load_config(ensemble_yaml), out, opts)


def test_manifest_names_members_views_folds_fusion_cv_and_hashes(built, ensemble_yaml):
    out, manifest = built
    on_disk = json.loads((out / bundle.MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert [m["name"] for m in manifest["members"]] == ["frcnn", "effdet"]  # the ensemble's order
    for member in manifest["members"]:
        assert member["views"] == ["none", "hflip"]  # as the ensemble orders them: none first
        assert [f["fold"] for f in member["folds"]] == [0, 1]
        assert [f["score"] for f in member["folds"]] == [0.25, 0.26] and member["folds"][0]["epoch"] == 3
        assert load_config(out / member["config"]).run == member["name"]
    assert manifest["fusion"] == {**TUNED, "backend": "numba"}
    assert manifest["cv"] == CV and manifest["metric"] == "coco_map"
    assert manifest["classes"] == ["disc", "square", "ring"]
    # max_boxes_per_image "metric", resolved as the submission stage does: COCO mAP reads 100 boxes per image
    assert manifest["submission"] == {"format": "label_conf_xyxy", "coord_decimals": None, "max_boxes_per_image": 100}
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {bundle.MANIFEST}
    assert set(manifest["files"]) == files
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": content_hash(out / rel), "bytes": (out / rel).stat().st_size}
    assert manifest["upload_command"] == f"kaggle datasets create -p {out} --dir-mode tar"
    meta = json.loads((out / bundle.DATASET_METADATA).read_text())
    assert meta["id"] == "someone/demo-tiny-ens-bundle" and 6 <= len(meta["title"]) <= 50


def test_weights_are_the_best_checkpoints_model_entry_only(built, ensemble_yaml):
    out, manifest = built
    member = load_config(ensemble_yaml).load_sibling("effdet.yaml")
    best = checkpoint.load(fold_dir(member, 1) / BEST_CHECKPOINT)
    packed = checkpoint.load(out / "weights/effdet/fold1.pt")
    assert set(packed) == {"model"}  # no optimizer, epoch, RNG
    assert packed["model"].keys() == best["model"].keys()
    assert all(torch.equal(packed["model"][k], v) for k, v in best["model"].items())


def test_size_report_adds_up_per_part(built, capsys):
    out, manifest = built
    sizes = {r["part"]: r for r in manifest["sizes"]}
    assert set(sizes) == {"weights: frcnn", "weights: effdet", "configs", "notebook, metadata"}
    assert sum(r["bytes"] for r in manifest["sizes"]) == sum(f["bytes"] for f in manifest["files"].values())
    effdet_files = [f for rel, f in manifest["files"].items() if rel.startswith("weights/effdet/")]
    assert sizes["weights: effdet"] == {"part": "weights: effdet", "files": 2,
                                        "bytes": sum(f["bytes"] for f in effdet_files)}
    bundle.print_size_report(manifest["sizes"], 1234)
    printed = capsys.readouterr().out
    assert "weights: frcnn" in printed and "manifest.json" in printed and "total" in printed


def test_half_stores_fp16_weights_that_load_into_fp32_models(built, ensemble_yaml, tmp_path):
    out32, manifest32 = built
    out16 = tmp_path / "fp16"
    manifest16 = bundle.run(load_config(ensemble_yaml), out16, bundle.BundleOptions(wheels=False, half=True))
    assert manifest16["half"] is True and manifest32["half"] is False
    full, half = (checkpoint.load(o / "weights/frcnn/fold0.pt")["model"] for o in (out32, out16))
    for key, value in full.items():
        expected = torch.float16 if value.is_floating_point() else value.dtype  # integer buffers stay integers
        assert half[key].dtype == expected, key
    size = {m["part"]: m["bytes"] for m in manifest16["sizes"]}
    size32 = {m["part"]: m["bytes"] for m in manifest32["sizes"]}
    assert 0.45 < size["weights: frcnn"] / size32["weights: frcnn"] < 0.55
    member = load_config(out16 / "configs/frcnn.yaml")
    model = load_model_checkpoint(out16 / "weights/frcnn/fold0.pt", member.model, 3, torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert value.dtype == full[key].dtype  # fp32 model, fp16-rounded values
        assert torch.equal(value, full[key].half().to(value.dtype) if value.is_floating_point() else full[key])


def test_notebook_is_an_nbformat4_notebook_with_the_two_cells(built):
    out, manifest = built
    nb = json.loads((out / bundle.NOTEBOOK).read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] == 5 and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert len(nb["cells"]) == 2
    for cell in nb["cells"]:
        assert set(cell) == {"cell_type", "execution_count", "id", "metadata", "outputs", "source"}
        assert cell["cell_type"] == "code" and cell["outputs"] == [] and cell["execution_count"] is None
        assert re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cell["id"])  # the nbformat 4.5 schema's cell id
        assert all(isinstance(line, str) for line in cell["source"])
    install, infer = ("".join(c["source"]) for c in nb["cells"])
    slug = json.loads((out / bundle.DATASET_METADATA).read_text())["id"].split("/")[1]
    assert f"!pip install --no-index --no-deps /kaggle/input/{slug}/wheels/*.whl" in install
    assert f"!python -m pipeline.infer --bundle /kaggle/input/{slug} --images " \
           "/kaggle/input/global-wheat-detection/test" in infer
    assert "--out /kaggle/working/submission.csv" in infer
    assert "--sample-submission /kaggle/input/global-wheat-detection/sample_submission.csv" in infer


def test_refuses_a_used_folder_and_a_stale_ensemble(built, ensemble_yaml, tmp_path):
    out, _ = built
    cfg = load_config(ensemble_yaml)
    with pytest.raises(bundle.BundleError, match="not empty"):
        bundle.run(cfg, out, bundle.BundleOptions(wheels=False))
    with pytest.raises(bundle.BundleError, match="never bundled"):
        bundle.run(cfg, tmp_path / "t", bundle.BundleOptions(extra_wheels=("torch==2.4.0",)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(bundle.BundleError, match="not empty"):  # --overwrite replaces bundles only
        bundle.run(cfg, other, bundle.BundleOptions(wheels=False, overwrite=True))
    assert (other / "notes.txt").read_text() == "mine"
    result_path = ensemble_dir(cfg) / ENSEMBLE_RESULT
    saved = result_path.read_text()
    try:
        atomic_write_text(result_path, json.dumps({**json.loads(saved), "members": ["frcnn"]}))
        with pytest.raises(bundle.BundleError, match="tuned for members"):
            bundle.run(cfg, tmp_path / "stale", bundle.BundleOptions(wheels=False))
    finally:
        atomic_write_text(result_path, saved)
    assert not (tmp_path / "stale").exists() and not (tmp_path / ".stale.partial").exists()


def test_an_import_neither_bundled_nor_on_the_image_is_flagged():
    imported = {"effdet": ["effdet"], "torch": ["torch"], "sympy": ["sympy"], "yaml": ["PyYAML"],
                "mystery": ["mystery-dist"], "_cython_3_2_3": []}
    missing = bundle.uncovered_imports(imported, set(bundle.BUNDLED_DISTRIBUTIONS), set(bundle.KAGGLE_IMAGE))
    assert missing == {"mystery": ["mystery-dist"]}  # sympy: torch requires it; PyYAML: listed (any spelling)
    assert bundle.uncovered_imports(imported, set(bundle.BUNDLED_DISTRIBUTIONS) | {"mystery_dist"},
                                    set(bundle.KAGGLE_IMAGE)) == {}
    assert bundle.spec_name("Mystery_Dist==1.0") == "mystery-dist"
    assert bundle.spec_name("wheels/mystery_dist-1.0-py3-none-any.whl") == "mystery-dist"


# ------------------------------------------------------------------------------------------- end to end


def image_site(target: Path) -> list[str]:
    """A folder holding (as links into this environment) what a Kaggle GPU image provides: the distributions of
    bundle.KAGGLE_IMAGE and everything they require. Nothing else of this environment: not the package, not
    effdet, timm, ... Returns the distributions linked."""
    target.mkdir(parents=True)
    linked = []
    for name in sorted(bundle.with_requirements(bundle.KAGGLE_IMAGE)):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # required only on other platforms
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {".."}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
        linked.append(name)
    return linked


def offline_env() -> dict[str, str]:
    """No pip configuration or find-links of this machine, no proxies, nothing on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("PIP_", "PYTHON")) and "PROXY" not in k.upper()}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}


def without_network(cmd: list[str]) -> list[str]:
    """``cmd`` in a network namespace with no interface up (unshare), where this machine allows it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("cannot cut the network here (unshare -n refused); the offline claim would be untested")
    return ["unshare", "-n", *cmd]


@pytest.mark.slow
def test_bundle_installs_offline_and_reproduces_the_chain_submission(tmp_path_factory, tiny_data):
    from pipeline import submit

    work = tmp_path_factory.mktemp("e2e")
    root = write_config_dir(work / "configs", tiny_data, {"frcnn": FRCNN_TINY, "effdet": EFFDET_TINY},
                            train={"epochs": 1}, tracking={"enabled": False})  # MLflow would write ./mlruns
    chain_file = Path(submit.run(root, [])["submission"])
    out = work / "bundle"
    manifest = bundle.run(load_config(root / "ensemble.yaml"), out, bundle.BundleOptions())
    wheels = sorted((out / "wheels").glob("*.whl"))
    names = {bundle.canonical(w.name.split("-")[0]) for w in wheels}
    assert names == {"pipeline"} | {bundle.canonical(n) for n in bundle.installed(bundle.BUNDLED_DISTRIBUTIONS)}
    assert {"effdet", "timm", "faster-coco-eval"} <= names
    assert not names & {"torch", "torchvision"}

    # A fresh environment: no site-packages of this one but the simulated Kaggle image (torch & co.), then the
    # notebook's install cell, offline, from the bundle's wheels alone.
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=offline_env())
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    reused = image_site(work / "kaggle-image")
    assert "torch" in reused and "effdet" not in reused and "pipeline" not in reused
    (site / "kaggle_image.pth").write_text(str(work / "kaggle-image") + "\n")
    install = [python, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *map(str, wheels)]
    subprocess.run(without_network(list(map(str, install))), check=True, env=offline_env(), cwd=work)
    where = subprocess.run([python, "-c", "import pipeline, effdet; print(pipeline.__file__, effdet.__file__)"],
                           check=True, capture_output=True, text=True, env=offline_env(), cwd=work).stdout
    assert all(path.startswith(str(site)) for path in where.split()), where

    ours = work / "submission.csv"
    cmd = [python, "-m", "pipeline.infer", "--bundle", out, "--images", tiny_data / "test", "--out", ours,
           "--sample-submission", tiny_data / "sample_submission.csv", "--no-progress"]
    done = subprocess.run(without_network(list(map(str, cmd))), capture_output=True, text=True,
                          env=offline_env(), cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)  # its timings, with -s

    # same rows, same boxes to the written precision (and here, the same bytes)
    classes = manifest["classes"]
    theirs_table = read_submission(chain_file, "label_conf_xyxy", classes)
    ours_table = read_submission(ours, "label_conf_xyxy", classes)
    assert list(pd.read_csv(ours).image_id) == list(pd.read_csv(chain_file).image_id)
    assert len(ours_table) > 0
    pd.testing.assert_frame_equal(ours_table, theirs_table)
    assert ours.read_bytes() == chain_file.read_bytes()
