import pandas as pd

from pipeline.config import SyntheticConfig
from pipeline.data.synthetic import ensure_generated, fingerprint, generate

SMALL = SyntheticConfig(seed=3, n_train=12, n_test=4, image_size=128, max_objects=12)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = fingerprint(generate(tmp_path / "a", SMALL))
    b = fingerprint(generate(tmp_path / "b", SMALL))
    c = fingerprint(generate(tmp_path / "c", SMALL.model_copy(update={"seed": 4})))
    assert a == b and a != c


def test_layout_and_content(tmp_path):
    root = generate(tmp_path, SyntheticConfig(seed=0, n_train=40, n_test=5, image_size=128))
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns) == ["image_id", "width", "height", "bbox", "source", "label"]
    images = sorted(p.stem for p in (root / "train").glob("*.jpg"))
    assert len(images) == 40
    assert set(train.image_id) < set(images), "some images must be empty (absent from train.csv)"
    assert train.source.nunique() >= 2 and train.label.nunique() == 3
    assert len(list((root / "test").glob("*.jpg"))) == 5
    sample = pd.read_csv(root / "sample_submission.csv")
    assert list(sample.columns) == ["image_id", "PredictionString"] and len(sample) == 5


def test_ensure_generated_skips_when_config_unchanged(tmp_path):
    assert ensure_generated(tmp_path, SMALL) is True
    assert ensure_generated(tmp_path, SMALL) is False
    assert ensure_generated(tmp_path, SMALL.model_copy(update={"seed": 9})) is True
