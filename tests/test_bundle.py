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

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import EFFDET_TINY, FRCNN_TINY, write_config_dir
from pipeline import bundle, checkpoint, folds
from pipeline.config import ConfigError, load_config
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
              "oof": CV, "nested_oof": CV - 0.01, "test_labelled": True}
    atomic_write_text(ensemble_dir(ens) / ENSEMBLE_RESULT, json.dumps(result))
    return config_dir / "ensemble.yaml"


def copy_of_ensemble(ens_yaml: Path, root: Path) -> Path:
    """`ens_yaml`'s config folder (runs and folds included) copied to `root`, its configs pointing into `root`: what
    fake_trained_ensemble(root, ...) writes, in 0.03 s instead of 0.55 s (four models built and saved)."""
    source = ens_yaml.parent
    shutil.copytree(source, root, dirs_exist_ok=True)
    for config in root.glob("*.yaml"):  # runs_dir, folds.dir, submission.dir: absolute paths into the folder
        config.write_text(config.read_text().replace(str(source), str(root)))
    return root / ens_yaml.name


@pytest.fixture(scope="module")
def pristine_ensemble(tmp_path_factory, tiny_data) -> Path:
    """The module's one fake trained ensemble, never changed: each user gets a copy."""
    return fake_trained_ensemble(tmp_path_factory.mktemp("fake_run"), tiny_data)


@pytest.fixture(scope="module")
def ensemble_yaml(pristine_ensemble, tmp_path_factory) -> Path:
    return copy_of_ensemble(pristine_ensemble, tmp_path_factory.mktemp("shared_run"))


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
    assert manifest["cv"] == CV and manifest["cv_nested"] == CV - 0.01 and manifest["metric"] == "coco_map"
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


def test_notebook_is_an_nbformat4_notebook_with_the_three_cells(built):
    out, manifest = built
    nb = json.loads((out / bundle.NOTEBOOK).read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] == 5 and nb["metadata"]["kernelspec"]["name"] == "python3"
    assert len(nb["cells"]) == 3
    for cell in nb["cells"]:
        assert set(cell) == {"cell_type", "execution_count", "id", "metadata", "outputs", "source"}
        assert cell["cell_type"] == "code" and cell["outputs"] == [] and cell["execution_count"] is None
        assert re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cell["id"])  # the nbformat 4.5 schema's cell id
        assert all(isinstance(line, str) for line in cell["source"])
    check, install, infer = ("".join(c["source"]) for c in nb["cells"])
    assert f"sys.version_info[:2] != {sys.version_info[:2]}" in check  # default: this interpreter's Python
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


# ------------------------------------------------------------------------------ the notebook's Python (target)


def foreign_python() -> str:
    """A Python version that is not this one: what a Kaggle image may run."""
    return f"3.{sys.version_info.minor + 1}"


def test_manifest_and_notebook_carry_the_target_python(built, ensemble_yaml, tmp_path, capsys):
    _, default = built
    assert default["target"] == {"python": bundle.running_python(), "implementation": "cp",
                                 "platforms": [bundle.DEFAULT_PLATFORM]}
    target = bundle.WheelTarget.parse(foreign_python(), ["manylinux_2_35_x86_64"])
    out = tmp_path / "foreign"
    manifest = bundle.run(load_config(ensemble_yaml), out, bundle.BundleOptions(wheels=False, target=target))
    assert manifest["target"] == {"python": foreign_python(), "implementation": "cp",
                                  "platforms": ["manylinux_2_35_x86_64"]}
    assert json.loads((out / bundle.MANIFEST).read_text())["target"]["python"] == foreign_python()
    check = "".join(json.loads((out / bundle.NOTEBOOK).read_text())["cells"][0]["source"])
    with pytest.raises(RuntimeError) as refused:  # the cell, run by this (other) Python, stops the notebook
        exec(compile(check, "cell-1", "exec"), {})
    here = bundle.running_python()
    assert f"this notebook runs Python {here}, the bundle's wheels are for Python {foreign_python()}" in \
        str(refused.value) and f"--python-version {here}" in str(refused.value)
    capsys.readouterr()
    exec(compile(bundle.python_check_cell(bundle.WheelTarget.parse(None, None)), "cell-1", "exec"), {})
    assert f"Python {here}: the bundle's wheels are for {here}" in capsys.readouterr().out


def test_pip_download_command_for_a_foreign_python(tmp_path):
    target = bundle.WheelTarget.parse("3.12", ["manylinux_2_28_x86_64"])
    cmd = bundle.pip_download_command(["simplejpeg==1.9.0"], tmp_path, target)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[-1] == "simplejpeg==1.9.0"
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i] in ("--python-version", "--implementation",
                                                                           "-d")}
    assert flag == {"--python-version": "3.12", "--implementation": "cp", "-d": str(tmp_path)}
    platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    # pip takes --platform literally: a glibc 2.28 image also installs 2_17 (manylinux2014) and older wheels
    assert platforms[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert "manylinux_2_29_x86_64" not in platforms
    assert bundle.WheelTarget.parse("3.12", ["manylinux2014_x86_64"]).platform_tags()[:2] == [
        "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    for bad in ("312", "3", "python3.12"):
        with pytest.raises(bundle.BundleError, match="MAJOR.MINOR"):
            bundle.WheelTarget.parse(bad, None)


@pytest.mark.parametrize("wheel, fits", [
    ("simplejpeg-1.9.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl", True),
    ("faster_coco_eval-1.8.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    ("pycocotools-2.0.11-cp311-abi3-manylinux2014_x86_64.whl", True),  # the stable ABI of 3.11 runs on 3.12
    ("timm-1.0.31-py3-none-any.whl", True),
    ("simplejpeg-1.9.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", False),  # another Python
    ("x-1.0-cp312-cp312-manylinux_2_34_x86_64.whl", False),  # needs a newer glibc than the image's
    ("x-1.0-cp312-cp312-linux_x86_64.whl", False),  # built on some machine: not a portable wheel
    ("x-1.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("not-a-wheel.whl", False),
])
def test_a_wheel_fits_the_target_by_its_tags(wheel, fits):
    assert bundle.WheelTarget.parse("3.12", ["manylinux_2_31_x86_64"]).fits(wheel) is fits


class FakePip:
    """Stands in for pip: `download` answers with a wheel for the requested Python (or fails for names in
    ``unreleased``), `wheel` builds ``built[name]`` (a wheel file name) or a pure wheel of the package."""

    def __init__(self, unreleased=(), built=None):
        self.unreleased, self.built, self.calls = set(unreleased), built or {}, []

    def __call__(self, cmd):
        self.calls.append(cmd)
        folder = Path(cmd[cmd.index("-d" if "download" in cmd else "-w") + 1])
        spec = cmd[-1]
        name, _, version = Path(spec).name.partition("==")
        if "download" in cmd:
            if name in self.unreleased:
                return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: No matching distribution found for {spec}")
            py = "cp" + cmd[cmd.index("--python-version") + 1].replace(".", "")
            (folder / f"{name.replace('-', '_')}-{version}-{py}-{py}-manylinux2014_x86_64.whl").write_bytes(b"w")
        else:
            (folder / self.built.get(name, "pipeline-0.1.0-py3-none-any.whl")).write_bytes(b"w")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_wheels_are_fetched_for_the_target_and_a_local_build_only_when_pure(tmp_path, monkeypatch):
    target = bundle.WheelTarget.parse("3.12", None)
    fake = FakePip(unreleased={"purepkg", "nativepkg"},
                   built={"purepkg": "purepkg-1.0-py3-none-any.whl",
                          "nativepkg": "nativepkg-1.0-cp312-cp312-linux_x86_64.whl"})
    monkeypatch.setattr(bundle, "run_pip", fake)
    monkeypatch.setattr(bundle, "installed", lambda names: {"simplejpeg": "1.9.0"})
    entries = bundle.build_wheels(tmp_path / "w", ["purepkg==1.0"], target)
    files = sorted(Path(e["file"]).name for e in entries)
    assert files == ["pipeline-0.1.0-py3-none-any.whl", "purepkg-1.0-py3-none-any.whl",
                     "simplejpeg-1.9.0-cp312-cp312-manylinux2014_x86_64.whl"]
    downloads = [c for c in fake.calls if "download" in c]
    assert all(c[c.index("--python-version") + 1] == "3.12" for c in downloads)
    with pytest.raises(bundle.BundleError, match=r"nativepkg==1.0: ERROR: No matching distribution"):
        bundle.build_wheels(tmp_path / "w2", ["nativepkg==1.0"], target)
    other = tmp_path / "mine-1.0-cp311-cp311-manylinux2014_x86_64.whl"  # an --extra-wheel file for 3.11
    other.write_bytes(b"w")
    with pytest.raises(bundle.BundleError, match="not installable on CPython 3.12"):
        bundle.build_wheels(tmp_path / "w3", [str(other)], target)


def test_the_command_line_refuses_a_python_version_it_cannot_read(ensemble_yaml, tmp_path, capsys):
    code = bundle.main(["--config", str(ensemble_yaml), "--out", str(tmp_path / "b"), "--python-version", "312"])
    assert code == 1 and "give the notebook's Python as MAJOR.MINOR" in capsys.readouterr().err


def test_a_bundle_runs_only_the_views_the_ensemble_fused(tmp_path, pristine_ensemble):
    import yaml

    ens = copy_of_ensemble(pristine_ensemble, tmp_path)
    tree = yaml.safe_load(ens.read_text())
    tree["ensemble"]["members"][1]["views"] = ["hflip"]
    ens.write_text(yaml.safe_dump(tree))
    result = json.loads((ensemble_dir(load_config(ens)) / ENSEMBLE_RESULT).read_text())
    plans = bundle.plan_members(load_config(ens), result)
    assert [p.views for p in plans] == [["none", "hflip"], ["hflip"]]
    tree["ensemble"]["members"][1]["views"] = ["scale1.5"]
    ens.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"member effdet.yaml \(.*oof.parquet\): views \['scale1.5'\] were not"):
        bundle.plan_members(load_config(ens), result)


def test_a_member_of_weight_zero_is_left_out_and_the_fusion_is_the_same(tmp_path, pristine_ensemble, capsys):
    from pipeline.fusion import fuse_tuned

    ens = copy_of_ensemble(pristine_ensemble, tmp_path)
    cfg = load_config(ens)
    path = ensemble_dir(cfg) / ENSEMBLE_RESULT
    result = json.loads(path.read_text())
    result["params"]["weights"] = {"frcnn": 1.0, "effdet": 0.0}  # the tuner switched EfficientDet off
    wbf = {"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg"}
    result["params"]["fold_fusion"] = {"frcnn": wbf, "effdet": wbf}
    atomic_write_text(path, json.dumps(result))
    manifest = bundle.run(cfg, tmp_path / "b", bundle.BundleOptions(wheels=False))
    assert [m["name"] for m in manifest["members"]] == ["frcnn"] and not (tmp_path / "b" / "weights" / "effdet").exists()
    assert manifest["fusion"]["weights"] == {"frcnn": 1.0} and manifest["fusion"]["fold_fusion"] == {"frcnn": wbf}
    assert "left out: effdet (weight 0 in the tuned fusion" in capsys.readouterr().out
    # what the notebook fuses without the member is what the pipeline fused with it at weight 0
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (40, 2))
    preds = pd.DataFrame({"image_id": "a", "x1": xy[:, 0], "y1": xy[:, 1], "x2": xy[:, 0] + 20, "y2": xy[:, 1] + 20,
                          "score": rng.uniform(0.1, 1, 40), "label": 0, "model": ["frcnn", "effdet"] * 20,
                          "fold": 0, "tta": "none"})
    sizes = pd.DataFrame({"image_id": ["a"], "width": [128], "height": [128]})
    params = {k: v for k, v in manifest["fusion"].items() if k != "backend"}
    two_folds = pd.concat([preds, preds.assign(fold=1, x1=preds.x1 + 2)], ignore_index=True)  # fused fold first
    both = fuse_tuned(two_folds, sizes, {**params, "weights": result["params"]["weights"],
                                         "fold_fusion": result["params"]["fold_fusion"]},
                      [(m, f, "none") for m in ("frcnn", "effdet") for f in (0, 1)], ("model", "fold", "tta"),
                      name="ens")
    alone = fuse_tuned(two_folds[two_folds.model == "frcnn"], sizes, params, [("frcnn", f, "none") for f in (0, 1)],
                       ("model", "fold", "tta"), name="ens")
    assert len(alone) > 0
    pd.testing.assert_frame_equal(both, alone)


def test_an_external_member_blocks_a_bundle_unless_the_tuner_dropped_it(tmp_path, pristine_ensemble):
    import yaml

    ens = copy_of_ensemble(pristine_ensemble, tmp_path)
    tree = yaml.safe_load(ens.read_text())
    tree["ensemble"]["members"].append({"predictions": "external/yolo", "name": "yolo", "format": "yolo_txt"})
    ens.write_text(yaml.safe_dump(tree))
    cfg = load_config(ens)
    result = json.loads((ensemble_dir(cfg) / ENSEMBLE_RESULT).read_text())
    result["members"].append("yolo")
    result["params"]["weights"]["yolo"] = 1.0
    with pytest.raises(bundle.BundleError, match="member 'yolo' is a folder of another tool's predictions"):
        bundle.plan_members(cfg, result)
    result["params"]["weights"]["yolo"] = 0.0
    assert [p.name for p in bundle.plan_members(cfg, result)] == ["frcnn", "effdet"]
