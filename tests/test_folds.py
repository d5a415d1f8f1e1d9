import numpy as np
import pandas as pd
import pytest

from pipeline.data.table import AnnotationTable
from pipeline.folds import balance_table, make_folds, write_folds
from pipeline.layout import FoldsError, read_folds


def table(n=60, groups=False, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"im{i:03d}" for i in range(n)]
    images = pd.DataFrame({
        "image_id": ids, "path": [f"{i}.jpg" for i in ids], "width": 100, "height": 100,
        "source": [f"s{i % 3}" for i in range(n)],
        "group": [f"g{i // 4}" for i in range(n)] if groups else "",
    })
    rows = []
    for i in ids:
        for _ in range(int(rng.integers(0, 8))):
            rows.append((i, 1.0, 1.0, 10.0, 10.0, int(rng.integers(0, 2))))
    boxes = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    return AnnotationTable(images, boxes, ["a", "b"])


def test_deterministic_and_seed_sensitive():
    t = table()
    a, b = make_folds(t, 4, 7, [0, 1, 4]), make_folds(t, 4, 7, [0, 1, 4])
    assert a.equals(b)
    assert not a.equals(make_folds(t, 4, 8, [0, 1, 4]))
    # input order does not matter
    shuffled = AnnotationTable(t.images.sample(frac=1, random_state=1), t.boxes, t.classes)
    assert make_folds(shuffled, 4, 7, [0, 1, 4]).equals(a)


def test_every_image_once_and_balanced():
    t = table(90)
    folds = make_folds(t, 3, 0, [0, 1, 4])
    assert sorted(folds.image_id) == sorted(t.images.image_id)
    assert set(folds.fold) == {0, 1, 2}
    sizes = folds.fold.value_counts()
    assert sizes.max() - sizes.min() <= 3
    balance = balance_table(t, folds)
    assert balance.images.sum() == 90 and balance.boxes.sum() == len(t.boxes)
    per_source = balance[[c for c in balance.columns if c.startswith("src:")]]
    assert (per_source.max() - per_source.min()).max() <= 3


def test_groups_never_cross_folds():
    t = table(80, groups=True)
    folds = make_folds(t, 4, 0, [0, 1, 4]).merge(t.images[["image_id", "group"]])
    assert (folds.groupby("group").fold.nunique() == 1).all()


def test_empty_images_are_kept():
    t = table(40)
    empties = set(t.images.image_id) - set(t.boxes.image_id)
    assert empties
    assert empties <= set(make_folds(t, 2, 0, [0, 1]).image_id)


def test_too_few_images():
    with pytest.raises(FoldsError, match="cannot make"):
        make_folds(table(3), 5, 0, [0, 1])


def test_rewrite_needs_force_and_reports_change(tmp_path):
    t = table()
    path = tmp_path / "f.csv"
    a = make_folds(t, 3, 0, [0, 1])
    assert "wrote" in write_folds(a, path, force=False)
    assert "up to date" in write_folds(a, path, force=False)
    b = make_folds(t, 3, 1, [0, 1])
    with pytest.raises(FoldsError, match="--force"):
        write_folds(b, path, force=False)
    assert read_folds(path).equals(a)
    message = write_folds(b, path, force=True)
    assert "change fold" in message
    assert read_folds(path).equals(b)


# ------------------------------------------------------------------ end to end, through the CLI and the readers
from pathlib import Path  # noqa: E402

from pipeline import folds as folds_stage  # noqa: E402

BCCD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bccd"


@pytest.mark.slow
def test_cli_on_synthetic_dataset_is_reproducible(tmp_path, capsys):
    args = ["--config", "configs/demo/base.yaml", "--set", f"data.root={tmp_path / 'demo'}",
            "--set", f"folds.dir={tmp_path / 'folds'}", "--set", "data.synthetic.n_train=30",
            "--set", "data.synthetic.n_test=3"]
    assert folds_stage.main(args) == 0
    path = tmp_path / "folds" / "demo_k3_s42.csv"
    first = path.read_bytes()
    assert folds_stage.main(args) == 0
    assert path.read_bytes() == first
    out = capsys.readouterr().out
    assert "up to date" in out and "empty" in out and "cls:ring" in out
    assert folds_stage.main(args + ["--set", "folds.seed=42", "--set", "folds.k=4"]) == 0  # another file
    assert (tmp_path / "folds" / "demo_k4_s42.csv").exists()


@pytest.mark.slow
def test_cli_refuses_to_replace_without_force(tmp_path, capsys):
    args = ["--config", "configs/demo/base.yaml", "--set", f"data.root={tmp_path / 'demo'}",
            "--set", f"folds.dir={tmp_path / 'folds'}", "--set", "data.synthetic.n_train=30"]
    assert folds_stage.main(args) == 0
    changed = args + ["--set", "folds.box_count_bins=[0, 3]"]
    assert folds_stage.main(changed) == 1
    assert "--force" in capsys.readouterr().err
    assert folds_stage.main(changed + ["--force"]) == 0
    assert "change fold" in capsys.readouterr().out


@pytest.mark.skipif(not BCCD.exists(), reason="needs ../shared/data/bccd")
def test_bccd_folds_cover_trainval_only(tmp_path):
    from pipeline.config import load_config

    cfg = load_config("configs/bccd/base.yaml", [f"data.root={BCCD}", f"folds.dir={tmp_path}",
                                                    "tracking.enabled=false"])
    path, balance = folds_stage.run(cfg)
    folds = read_folds(path)
    root = BCCD / "ImageSets" / "Main"
    trainval = set((root / "trainval.txt").read_text().split())
    test = set((root / "test.txt").read_text().split())
    assert set(folds.image_id) == trainval and not set(folds.image_id) & test
    assert sorted(folds.fold.unique()) == list(range(cfg.folds.k))
    assert balance.images.sum() == 292
