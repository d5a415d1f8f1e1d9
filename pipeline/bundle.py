"""Stage: an offline inference bundle for a Kaggle code competition, as a folder ready to upload as a dataset.

    python -m pipeline.bundle --config configs/demo/ensemble.yaml --out bundles/demo [--half] [--extra-wheel SPEC]
        [--python-version 3.12] [--platform manylinux_2_31_x86_64]

In a code competition the hidden test images exist only inside a Kaggle notebook with the internet off, so the
submission is code plus data: this stage packs what :mod:`pipeline.infer` needs to reproduce the ensemble's
submission there, from the files the earlier stages wrote (``result.json`` of the ensemble, the member configs,
every member x fold ``best.pt``):

- ``wheels/``: the package itself and the inference dependencies a Kaggle GPU image usually lacks
  (:data:`BUNDLED_DISTRIBUTIONS`, at the versions installed here, the ones the models were trained with), plus
  any ``--extra-wheel``. Never torch or torchvision: the image's own CUDA build must stay. Which distributions
  the image is expected to have is :data:`KAGGLE_IMAGE`; before packing, the stage imports ``pipeline.infer`` in
  a clean interpreter and refuses a bundle when something it loads is in neither list. The wheels are those of
  the notebook's Python, not this machine's (:class:`WheelTarget`: ``--python-version``, default this
  interpreter's; ``--platform``, default :data:`DEFAULT_PLATFORM`): fetched with ``pip download --only-binary``
  for that target, a wheel built here only when it is pure Python; every wheel is checked against the target's
  tags, and the notebook's first cell checks the Python version.
- ``weights/<member>/fold<K>.pt``: only the ``model`` state dict of each fold's ``best.pt`` (no optimizer, EMA or
  RNG state); ``--half`` stores floating-point tensors in fp16 (half the size; loaded back into fp32 models).
- ``configs/<member>.yaml``: each member's config, resolved (base chain and overrides applied).
- ``manifest.json``: what infer reads (members with their TTA views, folds and weight files; the fusion
  parameters tuned on OOF; classes; submission format), the CV it was tuned to, the sha256 and size of every
  file, the size report, and the upload command.
- ``dataset-metadata.json`` so that ``kaggle datasets create -p DIR --dir-mode tar`` uploads the folder as it is
  (the command is printed, never run; ``--dir-mode tar`` because the CLI skips sub-folders by default).
- ``kaggle_inference.ipynb``: the cells a Kaggle notebook needs (check the Python version against the wheels',
  install the wheels, run ``pipeline.infer``).

The folder is built beside ``--out`` and renamed into place at the end: a failed bundle never leaves half a folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import checkpoint
from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.formats import content_hash, get_format
from pipeline.io import atomic_write_text
from pipeline.layout import (BEST_CHECKPOINT, ENSEMBLE_RESULT, FoldsError, ensemble_dir, fold_dir, folds_path,
                             predictions_path, read_folds)
from pipeline.metrics import get_metric

# The bundle's table of contents; pipeline.infer reads the same name (stages share no code, only files).
MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
DATASET_METADATA = "dataset-metadata.json"
NOTEBOOK = "kaggle_inference.ipynb"
WHEELS, WEIGHTS, CONFIGS = "wheels", "weights", "configs"

# What pipeline.infer imports that a Kaggle GPU image usually lacks (checked by importing it, see module doc):
# the detection libraries (effdet and its COCO parser and config system), timm (pinned: the weights are tied to the
# architecture code of the version trained with), the metric library the config's registry imports, the strict JPEG
# decoder of pipeline.data.images, and ensemble-boxes (the fusion's reference backend, imported when
# ensemble.wbf_backend is "ensemble_boxes"). One that is not installed here is skipped: nothing can import it.
BUNDLED_DISTRIBUTIONS = ("effdet", "timm", "omegaconf", "pycocotools", "faster-coco-eval", "simplejpeg",
                         "ensemble-boxes")
# What a Kaggle GPU image ships, with what these require (as installed here). Never bundled. cv2 comes from
# opencv-python there, opencv-python-headless here; same module. attrs, charset-normalizer and cloudpickle are
# optional imports of omegaconf, numpy and pyarrow: loaded when present, which they are on the image too.
KAGGLE_IMAGE = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "opencv-python-headless", "scipy",
                "numba", "tqdm", "pyyaml", "pydantic", "albumentations", "huggingface-hub", "safetensors",
                "packaging", "attrs", "charset-normalizer", "cloudpickle")
NEVER_BUNDLED = ("torch", "torchvision")
# The platform the wheels are fetched for: Kaggle's notebook images are x86-64 Linux, Ubuntu 20.04 (glibc 2.31) or
# newer; a manylinux_2_N tag stands for every wheel a glibc 2.N system installs (2_5 to 2_N and the old aliases).
DEFAULT_PLATFORM = "manylinux_2_31_x86_64"
_MANYLINUX_ALIASES = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}  # PEP 600's legacy names

# Run in a clean interpreter: the distributions `import pipeline.infer` loads (MLflow blocked: infer must not need it).
_IMPORT_PROBE = """
import importlib.metadata as md, json, sys
before = set(sys.modules)
sys.modules["mlflow"] = None
import pipeline.infer
tops = {m.split(".")[0] for m in set(sys.modules) - before if sys.modules.get(m) is not None}
dists = md.packages_distributions()
print(json.dumps({t: sorted(set(dists.get(t, []))) for t in sorted(tops) if t not in sys.stdlib_module_names}))
"""


class BundleError(RuntimeError):
    pass


@dataclass
class MemberPlan:
    name: str
    cfg: ExperimentConfig
    views: list[str]
    folds: list[int]


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def running_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class WheelTarget:
    """The interpreter the wheels are for: the Kaggle notebook's CPython ``python`` ("3.11") on ``platforms``
    (wheel platform tags, e.g. ``manylinux_2_31_x86_64``)."""
    python: str
    platforms: tuple[str, ...] = (DEFAULT_PLATFORM,)

    @classmethod
    def parse(cls, python: str | None, platforms: list[str] | tuple[str, ...] | None) -> "WheelTarget":
        version = (python or running_python()).strip()
        if not re.fullmatch(r"3\.\d{1,2}", version):
            raise BundleError(f"--python-version {version!r}: give the notebook's Python as MAJOR.MINOR, e.g. 3.11")
        plats = tuple(platforms or (DEFAULT_PLATFORM,))
        bad = [p for p in plats if not re.fullmatch(r"[a-z0-9_]+", p)]
        if bad:
            raise BundleError(f"--platform {bad[0]!r}: expected a wheel platform tag, e.g. {DEFAULT_PLATFORM}")
        return cls(version, plats)

    @property
    def version_info(self) -> tuple[int, int]:
        major, minor = self.python.split(".")
        return int(major), int(minor)

    @property
    def abi(self) -> str:
        return "cp{}{}".format(*self.version_info)

    def platform_tags(self) -> list[str]:
        """Every platform tag the target installs: ``manylinux_2_N_<arch>`` expands to 2_N down to 2_5 plus the
        legacy names (pip's ``--platform`` does not), ``manylinux2014_<arch>`` to 2_17 and below."""
        tags: list[str] = []
        for plat in self.platforms:
            legacy = re.fullmatch(r"manylinux(2014|2010|1)_(\w+)", plat)
            modern = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
            if legacy:
                glibc = {v: k for k, v in _MANYLINUX_ALIASES.items()}[f"manylinux{legacy[1]}"]
                arch = legacy[2]
            elif modern:
                glibc, arch = int(modern[1]), modern[2]
            else:
                tags.append(plat)
                continue
            for minor in range(glibc, 4, -1):
                tags.append(f"manylinux_2_{minor}_{arch}")
                if minor in _MANYLINUX_ALIASES:
                    tags.append(f"{_MANYLINUX_ALIASES[minor]}_{arch}")
        return list(dict.fromkeys(tags))

    def fits(self, wheel_name: str) -> bool:
        """Whether pip on the target installs the wheel ``wheel_name`` (by its file name's tags)."""
        from packaging.tags import compatible_tags, cpython_tags
        from packaging.utils import InvalidWheelFilename, parse_wheel_filename

        try:
            wheel_tags = parse_wheel_filename(wheel_name)[3]
        except InvalidWheelFilename:
            return False
        plats = self.platform_tags()
        supported = set(cpython_tags(self.version_info, abis=[self.abi], platforms=plats))
        supported |= set(compatible_tags(self.version_info, self.abi, platforms=plats))
        return bool(set(wheel_tags) & supported)

    def manifest(self) -> dict:
        return {"python": self.python, "implementation": "cp", "platforms": list(self.platforms)}


# ---------------------------------------------------------------------------------------- what to pack


def read_ensemble_result(cfg: ExperimentConfig) -> dict:
    path = ensemble_dir(cfg) / ENSEMBLE_RESULT
    if not path.is_file():
        raise BundleError(f"{path} not found: run python -m pipeline.ensemble --config {cfg.source} first")
    result = json.loads(path.read_text(encoding="utf-8"))
    for key in ("members", "params", "oof"):
        if key not in result:
            raise BundleError(f"{path}: no {key!r} entry (written by an older pipeline.ensemble? run it again)")
    return result


def plan_members(cfg: ExperimentConfig, result: dict) -> list[MemberPlan]:
    """Each member as the ensemble fused it on test: its folds (every trained fold) and its TTA views (those its
    OOF predictions hold, as the fusion was tuned on them), in the ensemble's member order. A member the tuner
    gave weight 0 is left out: the fusion drops its boxes, so running it would only cost the notebook time."""
    plans = []
    weights = tuned_weights(result)
    for spec in cfg.ensemble.members:
        member_cfg = None if spec.config is None else cfg.load_sibling(spec.config)
        if weights.get(str(spec.name) if member_cfg is None else member_cfg.run) == 0:
            continue
        if member_cfg is None:  # predictions made by another tool: there is no model of ours to run offline
            raise BundleError(f"member {spec.name!r} is a folder of another tool's predictions: a bundle can only "
                              "run models trained here; bundle an ensemble without it, or run that tool in the "
                              "notebook and fuse its predictions yourself")
        oof_path = predictions_path(member_cfg, "oof")
        if not oof_path.is_file():
            raise BundleError(f"{oof_path} not found: run python -m pipeline.predict --config {member_cfg.source} "
                              "--split oof")
        # as the ensemble reads them; only the column needed (an OOF table can hold millions of boxes)
        views = spec.chosen_views(pd.read_parquet(oof_path, columns=["tta"]).tta.unique(), oof_path)
        folds = sorted(int(f) for f in read_folds(folds_path(member_cfg)).fold.unique())
        test_path = predictions_path(member_cfg, "test")
        if test_path.is_file():
            test_folds = sorted(int(f) for f in pd.read_parquet(test_path, columns=["fold"]).fold.unique())
            if test_folds != folds:  # a fold with no test box at all was left out of the pipeline's own fusion
                print(f"warning: {test_path} holds folds {test_folds}, the folds file {folds}: the bundle runs "
                      "every fold, so its fused scores can differ from the pipeline's test fusion", file=sys.stderr)
        for fold in folds:
            if not (fold_dir(member_cfg, fold) / BEST_CHECKPOINT).is_file():
                raise BundleError(f"{fold_dir(member_cfg, fold) / BEST_CHECKPOINT} not found: train fold {fold} "
                                  f"(python -m pipeline.train --config {member_cfg.source} --fold {fold})")
        plans.append(MemberPlan(member_cfg.run, member_cfg, list(views), folds))
    names = [p.name for p in plans]
    if names != [m for m in result["members"] if weights.get(m) != 0]:
        raise BundleError(f"{ensemble_dir(cfg) / ENSEMBLE_RESULT} was tuned for members {result['members']}, the "
                          f"config names {names}: run python -m pipeline.ensemble --config {cfg.source} again")
    return plans


def tuned_weights(result: dict) -> dict[str, float]:
    """The member weights the ensemble stage tuned (``{}``: none, every member 1)."""
    return dict(result["params"].get("weights") or {})


def bundled_fusion(result: dict, backend: str) -> dict:
    """The tuned fusion as the notebook runs it: without the members of weight 0, which the bundle leaves out
    (fusing them at weight 0 and leaving them out give the same boxes: their rows are dropped before fusing)."""
    params = dict(result["params"])
    if params.get("weights"):
        params["weights"] = {m: w for m, w in params["weights"].items() if w != 0}
        if params.get("fold_fusion"):  # each kept member's WBF over its fold models
            params["fold_fusion"] = {m: f for m, f in params["fold_fusion"].items() if m in params["weights"]}
    return {**params, "backend": backend}


# ----------------------------------------------------------------------------------------------- writing


def model_weights(state: dict, half: bool) -> dict:
    """A checkpoint's ``model`` state dict; ``half``: floating-point tensors in fp16 (integer buffers, e.g.
    BatchNorm's step counter, stay as they are)."""
    if half:
        return {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    return state


def write_members(plans: list[MemberPlan], staging: Path, half: bool) -> list[dict]:
    """Resolved configs and fold weights into ``staging``; the manifest's member entries."""
    entries = []
    for plan in plans:
        config_rel = f"{CONFIGS}/{plan.name}.yaml"
        atomic_write_text(staging / config_rel, plan.cfg.to_yaml())
        folds = []
        for fold in plan.folds:
            source = fold_dir(plan.cfg, fold) / BEST_CHECKPOINT
            rel = f"{WEIGHTS}/{plan.name}/fold{fold}.pt"
            best = checkpoint.load(source)
            checkpoint.save({"model": model_weights(best["model"], half)}, staging / rel)
            folds.append({"fold": fold, "weights": rel, "epoch": best.get("epoch"), "score": best.get("score")})
        entries.append({"name": plan.name, "config": config_rel, "views": plan.views, "folds": folds,
                        "model": {"name": plan.cfg.model.name, "arch": plan.cfg.model.arch,
                                  "image_size": plan.cfg.model.image_size}})
    return entries


def kaggle_slug(text: str) -> str:
    """A Kaggle dataset slug: lowercase letters, digits and hyphens, 6 to 50 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:50].strip("-")
    return slug if len(slug) >= 6 else f"{slug}-bundle".strip("-")


def dataset_metadata(slug: str, user: str, title: str) -> dict:
    # the title must be 6 to 50 characters; private by default (kaggle datasets create without --public)
    return {"title": title[:50].ljust(6, "-"), "id": f"{user}/{slug}", "licenses": [{"name": "CC0-1.0"}]}


def python_check_cell(target: WheelTarget) -> str:
    """The notebook's first cell: stop, saying what to do, when the notebook's Python is not the wheels' one."""
    major, minor = target.version_info
    return (
        f"# The bundle's wheels are for CPython {target.python} ({', '.join(target.platforms)}; manifest.json "
        "\"target\"):\n"
        "# compiled wheels install on that Python only. Check before installing anything.\n"
        "import sys\n"
        "here = f\"{sys.version_info.major}.{sys.version_info.minor}\"\n"
        f"if sys.version_info[:2] != ({major}, {minor}):\n"
        f"    raise RuntimeError(f\"this notebook runs Python {{here}}, the bundle's wheels are for Python "
        f"{target.python}: build the bundle again with python -m pipeline.bundle ... --python-version {{here}}\")\n"
        f"print(f\"Python {{here}}: the bundle's wheels are for {target.python}, as needed\")"
    )


def notebook_cells(slug: str, competition: str, cfg: ExperimentConfig, cv: float,
                   target: WheelTarget | None = None) -> list[str]:
    """The cells, as source text: check the Python version, install the wheels offline, then run every member x
    fold x view and fuse."""
    target = target or WheelTarget.parse(None, None)
    bundle = f"/kaggle/input/{slug}"
    data = f"/kaggle/input/{competition}"
    out = f"/kaggle/working/submission{get_format(cfg.submission.format).suffix}"
    install = (
        "# Notebook settings: Internet off, Accelerator GPU; Add Input: this dataset and the competition's data.\n"
        "# --no-deps: the image keeps its own torch/torchvision; the wheels hold what it lacks (see manifest.json).\n"
        f"!pip install --no-index --no-deps {bundle}/{WHEELS}/*.whl"
    )
    sample = f" \\\n    --sample-submission {data}/{cfg.data.sample_submission}" if cfg.data.sample_submission else ""
    infer = (
        f"# {cfg.ensemble.name}: every member x fold x TTA view, fused with the WBF parameters tuned on OOF "
        f"({cfg.metric} CV {cv:.4f}).\n"
        f"!python -m pipeline.infer --bundle {bundle} --images {data}/{cfg.data.test_images or 'test'} \\\n"
        f"    --out {out}{sample}"
    )
    return [python_check_cell(target), install, infer]


def notebook(cells: list[str]) -> dict:
    """An nbformat 4.5 notebook of code cells (built here: no nbformat dependency)."""
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
                   "source": source.splitlines(keepends=True)} for i, source in enumerate(cells, 1)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# ------------------------------------------------------------------------------------------------ wheels


def infer_import_distributions() -> dict[str, list[str]]:
    """Top-level module -> distributions, for every module `import pipeline.infer` loads in a clean interpreter."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"import pipeline.infer failed in a clean interpreter:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_requirements(names) -> set[str]:
    """``names`` and everything they require (installed metadata, environment markers evaluated), canonical."""
    from packaging.requirements import Requirement

    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def uncovered_imports(imported: dict[str, list[str]], bundled: set[str], on_image: set[str]) -> dict[str, list[str]]:
    """Modules infer imports whose distribution is neither bundled, nor on the image, nor the package itself."""
    covered = {canonical(n) for n in bundled} | with_requirements(on_image) | {"pipeline"}
    return {module: dists for module, dists in imported.items()
            if dists and not any(canonical(d) in covered for d in dists)}


def package_source() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"the bundle builds the package's wheel from its source checkout, but {root} has no "
                          "pyproject.toml: run from a checkout (pip install -e .)")
    return root


def pip_wheel_command(args: list[str], wheels: Path) -> list[str]:
    """Build (or take from pip's cache) wheels for this interpreter."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), *args]


def pip_download_command(specs: list[str], wheels: Path, target: WheelTarget) -> list[str]:
    """Fetch the released wheels of ``specs`` for ``target`` (never an sdist: it would be built for this machine)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", target.python, "-q", "-d", str(wheels)]
    for tag in target.platform_tags():
        cmd += ["--platform", tag]
    return cmd + list(specs)


def run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def pip_wheel(args: list[str], wheels: Path) -> None:
    cmd = pip_wheel_command(args, wheels)
    done = run_pip(cmd)
    if done.returncode != 0:
        raise BundleError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def fetch_for_target(specs: list[str], wheels: Path, target: WheelTarget) -> None:
    """Each requirement's wheel for ``target``: its released wheel (pip download), else a wheel built here when
    that one is pure Python (it then fits any target); BundleError naming those that have neither."""
    failed: dict[str, str] = {}
    for spec in specs:
        done = run_pip(pip_download_command([spec], wheels, target))
        if done.returncode == 0:
            continue
        with tempfile.TemporaryDirectory(prefix="pipeline-wheel-") as tmp:
            built = run_pip(pip_wheel_command([spec], Path(tmp)))
            made = sorted(Path(tmp).glob("*.whl"))
            if built.returncode == 0 and made and all(target.fits(w.name) for w in made):
                for wheel in made:
                    shutil.move(str(wheel), wheels / wheel.name)
                continue
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"pip exit {done.returncode}"
        failed[spec] = reason
    if failed:
        listed = "; ".join(f"{spec}: {why}" for spec, why in failed.items())
        raise BundleError(f"no wheel for CPython {target.python} on {', '.join(target.platforms)} ({listed}). "
                          "Check --python-version / --platform against the notebook's image; a version with wheels "
                          "for it (--extra-wheel NAME==VERSION), or --on-image NAME when the image has it")


def spec_name(spec: str) -> str:
    """The distribution an ``--extra-wheel`` names: a .whl file's name part, or the requirement's name."""
    from packaging.requirements import InvalidRequirement, Requirement

    if spec.endswith(".whl"):
        return canonical(Path(spec).name.split("-")[0])
    try:
        return canonical(Requirement(spec).name)
    except InvalidRequirement as exc:
        raise BundleError(f"--extra-wheel {spec!r}: neither a .whl file nor a requirement ({exc})") from None


def pinned(spec: str) -> str:
    """A requirement for ``pip wheel``: a bare name of an installed distribution is pinned to the version here."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec):
        try:
            return f"{spec}=={metadata.version(spec)}"
        except metadata.PackageNotFoundError:
            return spec
    return spec


def build_wheels(wheels: Path, extra: list[str], target: WheelTarget | None = None) -> list[dict]:
    """The package's wheel (built from a clean copy of its source; pure Python) and the pinned dependency wheels
    for ``target`` (default: this interpreter's version on :data:`DEFAULT_PLATFORM`). BundleError when a wheel
    would not install there."""
    target = target or WheelTarget.parse(None, None)
    wheels.mkdir(parents=True, exist_ok=True)
    root = package_source()
    with tempfile.TemporaryDirectory(prefix="pipeline-src-") as tmp:
        # a copy: setuptools writes build/ beside the source, and a stale build/ would ship deleted modules
        shutil.copytree(root / "pipeline", Path(tmp) / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, Path(tmp) / name)
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        pip_wheel([*isolation, tmp], wheels)
    specs = [f"{name}=={version}" for name, version in installed(BUNDLED_DISTRIBUTIONS).items()]
    files = [Path(s) for s in extra if s.endswith(".whl")]
    for path in files:
        if not path.is_file():
            raise BundleError(f"--extra-wheel {path}: no such file")
        shutil.copy2(path, wheels / path.name)
    fetch_for_target(specs + [pinned(s) for s in extra if not s.endswith(".whl")], wheels, target)
    unfit = [p.name for p in sorted(wheels.glob("*.whl")) if not target.fits(p.name)]
    if unfit:
        raise BundleError(f"{', '.join(unfit)}: not installable on CPython {target.python} "
                          f"({', '.join(target.platforms)}), the notebook's Python: give a wheel built for it")
    return [wheel_entry(p) for p in sorted(wheels.glob("*.whl"))]


def installed(names) -> dict[str, str]:
    """name -> version here, of those of ``names`` that are installed (the versions the models were trained with)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def wheel_entry(path: Path) -> dict:
    name, version = path.name.split("-")[:2]
    name = canonical(name)
    role = ("package" if name == "pipeline" else
            "inference dependency" if name in {canonical(n) for n in BUNDLED_DISTRIBUTIONS} else "extra")
    if name in NEVER_BUNDLED:
        raise BundleError(f"{path.name}: torch and torchvision are never bundled (the image's CUDA build stays)")
    return {"file": f"{WHEELS}/{path.name}", "distribution": name, "version": version, "role": role}


# ------------------------------------------------------------------------------------- sizes, manifest


def file_table(root: Path) -> dict[str, dict]:
    """Every file under ``root`` (but the manifest): relative path -> sha256 and bytes."""
    return {p.relative_to(root).as_posix(): {"sha256": content_hash(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


def size_report(files: dict[str, dict]) -> list[dict]:
    """Bytes per part: the package wheel, the dependency wheels, each member's weights, configs, the rest."""
    def part(rel: str) -> str:
        top = rel.split("/")
        if top[0] == WHEELS:
            return "wheels: pipeline" if canonical(top[1].split("-")[0]) == "pipeline" else "wheels: dependencies"
        if top[0] == WEIGHTS:
            return f"weights: {top[1]}"
        return "configs" if top[0] == CONFIGS else "notebook, metadata"

    table = pd.DataFrame([{"part": part(rel), "bytes": f["bytes"]} for rel, f in files.items()])
    rows = table.groupby("part", sort=False).bytes.agg(["count", "sum"]).reset_index()
    return [{"part": r.part, "files": int(r["count"]), "bytes": int(r["sum"])} for _, r in rows.iterrows()]


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_size_report(rows: list[dict], manifest_bytes: int) -> None:
    rows = rows + [{"part": MANIFEST, "files": 1, "bytes": manifest_bytes}]
    width = max(len(r["part"]) for r in rows)
    print(f"{'part':<{width}}  files        size")
    for r in rows:
        print(f"{r['part']:<{width}}  {r['files']:>5}  {human(r['bytes']):>10}")
    print(f"{'total':<{width}}  {sum(r['files'] for r in rows):>5}  {human(sum(r['bytes'] for r in rows)):>10}")


@dataclass
class BundleOptions:
    half: bool = False
    extra_wheels: tuple[str, ...] = ()
    wheels: bool = True  # False: configs, weights and manifest only (no pip, no network)
    on_image: tuple[str, ...] = ()  # more distributions the target image is known to have
    kaggle_user: str | None = None
    slug: str | None = None
    competition: str | None = None
    overwrite: bool = False
    target: WheelTarget | None = None  # the notebook's Python; None: this interpreter's, on DEFAULT_PLATFORM


def boxes_per_image(cfg: ExperimentConfig) -> int | None:
    """``submission.max_boxes_per_image`` resolved as the submission stage resolves it ("metric": what the
    metric's scorer reads), so infer cuts the same boxes."""
    value = cfg.submission.max_boxes_per_image
    return get_metric(cfg.metric).boxes_read if value == "metric" else value


def manifest_for(cfg: ExperimentConfig, result: dict, members: list[dict], classes: list[str], wheels: list[dict],
                 opts: BundleOptions, upload: str) -> dict:
    on_image = installed(sorted(set(KAGGLE_IMAGE) | set(opts.on_image)))
    return {
        "bundle_format": BUNDLE_FORMAT,
        "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "experiment": cfg.experiment, "ensemble": cfg.ensemble.name, "config": str(cfg.source),
        "metric": cfg.metric, "cv": result["oof"], "cv_nested": result.get("nested_oof"), "classes": list(classes),
        "submission": {"format": cfg.submission.format, "coord_decimals": cfg.submission.coord_decimals,
                       "max_boxes_per_image": boxes_per_image(cfg)},
        "fusion": bundled_fusion(result, cfg.ensemble.wbf_backend),
        "members": members,
        "half": opts.half,
        "wheels": wheels,
        # trained with these; the image's own are used
        "environment": {"python": platform.python_version(), "platform": platform.machine(), "on_image": on_image},
        # the notebook's Python the wheels are for (the notebook's first cell checks it)
        "target": (opts.target or WheelTarget.parse(None, None)).manifest(),
        "upload_command": upload,
    }


def run(cfg: ExperimentConfig, out: Path, opts: BundleOptions | None = None) -> dict:
    """Build the bundle in ``out``; returns the manifest (with ``files`` and ``sizes``)."""
    opts = opts or BundleOptions()
    if opts.target is None:
        opts = dataclasses.replace(opts, target=WheelTarget.parse(None, None))
    out = Path(out)
    refused = sorted({spec_name(s) for s in opts.extra_wheels} & set(NEVER_BUNDLED))
    if refused:
        raise BundleError(f"--extra-wheel {', '.join(refused)}: torch and torchvision are never bundled (the "
                          "image's own CUDA build must stay)")
    slug = opts.slug or kaggle_slug(f"{cfg.experiment}-{cfg.ensemble.name}-bundle")
    if kaggle_slug(slug) != slug:
        raise BundleError(f"--slug {slug!r}: Kaggle wants 6 to 50 lowercase letters, digits and hyphens, "
                          f"e.g. {kaggle_slug(slug)!r}")
    user = opts.kaggle_user or os.environ.get("KAGGLE_USERNAME") or "INSERT_KAGGLE_USERNAME"
    if out.exists() and any(out.iterdir()):
        if not (opts.overwrite and (out / MANIFEST).is_file()):
            raise BundleError(f"{out} exists and is not empty: choose a new --out, or --overwrite a bundle there")
    result = read_ensemble_result(cfg)
    plans = plan_members(cfg, result)
    left_out = [m for m in result["members"] if m not in {p.name for p in plans}]
    if left_out:
        print(f"left out: {', '.join(left_out)} (weight 0 in the tuned fusion: none of their boxes is fused)")
    classes = load_dataset(cfg.data, "train").classes  # the order the models were trained with
    if opts.wheels:  # before the slow part: a bundle that would fail on Kaggle is refused here
        bundled = set(BUNDLED_DISTRIBUTIONS) | {spec_name(s) for s in opts.extra_wheels}
        missing = uncovered_imports(infer_import_distributions(), bundled, set(KAGGLE_IMAGE) | set(opts.on_image))
        if missing:
            listed = ", ".join(f"{m} ({'/'.join(d)})" for m, d in missing.items())
            raise BundleError(f"pipeline.infer imports {listed}: neither bundled nor expected on a Kaggle image; "
                              "add --extra-wheel NAME (or --on-image NAME if the image has it)")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        members = write_members(plans, staging, opts.half)
        wheels = build_wheels(staging / WHEELS, list(opts.extra_wheels), opts.target) if opts.wheels else []
        atomic_write_text(staging / DATASET_METADATA, json.dumps(
            dataset_metadata(slug, user, f"{cfg.experiment} {cfg.ensemble.name} bundle"), indent=2))
        cells = notebook_cells(slug, opts.competition or "COMPETITION-SLUG", cfg, result["oof"], opts.target)
        atomic_write_text(staging / NOTEBOOK, json.dumps(notebook(cells), indent=1))
        upload = f"kaggle datasets create -p {out} --dir-mode tar"
        manifest = manifest_for(cfg, result, members, classes, wheels, opts, upload)
        manifest["files"] = file_table(staging)
        manifest["sizes"] = size_report(manifest["files"])
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print_size_report(manifest["sizes"], (out / MANIFEST).stat().st_size)
    wheels_for = (f"wheels for CPython {opts.target.python} on {', '.join(opts.target.platforms)}" if opts.wheels
                  else "no wheels: the notebook's image must have pipeline and its libraries")
    print(f"wrote {out} ({len(members)} members, {sum(len(m['folds']) for m in members)} fold models"
          f"{', fp16 weights' if opts.half else ''}; CV {result['oof']:.4f}; {wheels_for})")
    if user == "INSERT_KAGGLE_USERNAME":
        print(f"edit {out / DATASET_METADATA} (id: your Kaggle user name), or pass --kaggle-user / set KAGGLE_USERNAME")
    print(f"upload (not run here):\n  {upload}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack the ensemble into an offline inference bundle for Kaggle.")
    add_config_args(parser, demo="ensemble.yaml")
    parser.add_argument("--out", type=Path, required=True, help="the bundle folder (must be new or a bundle)")
    parser.add_argument("--half", action="store_true", help="store the weights in fp16 (half the size)")
    parser.add_argument("--extra-wheel", action="append", default=[], metavar="SPEC",
                        help="one more wheel: a requirement (a bare installed name is pinned to its version here) "
                             "or a .whl file; repeatable")
    parser.add_argument("--on-image", action="append", default=[], metavar="NAME",
                        help="a distribution the target image has (not bundled, not flagged); repeatable")
    parser.add_argument("--no-wheels", action="store_true", help="configs, weights and manifest only (no pip)")
    parser.add_argument("--kaggle-user", default=None, help="dataset owner (default: $KAGGLE_USERNAME)")
    parser.add_argument("--slug", default=None, help="dataset slug (default: <experiment>-<ensemble>-bundle)")
    parser.add_argument("--competition", default=None, help="competition slug, for the notebook's input paths")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--python-version", default=None, metavar="X.Y",
                        help=f"the Kaggle notebook's Python, whose wheels are packed (default: this one's, "
                             f"{running_python()}); give it when the image's differs (`!python --version` there)")
    parser.add_argument("--platform", action="append", default=None, metavar="TAG",
                        help=f"wheel platform tag of the image (default {DEFAULT_PLATFORM}: x86-64 Linux, glibc "
                             "2.31 or newer); repeatable")
    args = parser.parse_args(argv)
    try:
        target = WheelTarget.parse(args.python_version, args.platform)
        opts = BundleOptions(half=args.half, extra_wheels=tuple(args.extra_wheel), wheels=not args.no_wheels,
                             on_image=tuple(args.on_image), kaggle_user=args.kaggle_user, slug=args.slug,
                             competition=args.competition, overwrite=args.overwrite, target=target)
        run(config_from_args(args), args.out, opts)
    except (ConfigError, DataError, FoldsError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
