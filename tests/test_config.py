import pytest

from pipeline.config import ConfigError, load_config
from pipeline.layout import folds_path


def write(path, text):
    path.write_text(text)
    return path


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "data: {name: d, format: voc, root: x}\ntrain: {epochs: 5, lr: 0.01}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {epochs: 7}\nmodel: {name: efficientdet, image_size: 256}\n")
    cfg = load_config(child, ["train.batch_size=3", "model.options={fpn_channels: 32}"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01 and cfg.train.batch_size == 3
    assert cfg.model.options == {"fpn_channels": 32}
    assert folds_path(cfg).name == "d_k5_s42.csv"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {name: d, format: voc, root: x}\ntrain: {epoch: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epoch" in str(err.value) and "unknown key" in str(err.value) and "c.yaml" in str(err.value)


def test_wrong_type_in_override_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {name: d, format: voc, root: x}\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["train.epochs"])


def test_efficientdet_size_must_be_multiple_of_128(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {name: d, format: voc, root: x}\nmodel: {name: efficientdet, image_size: 300}\n")
    with pytest.raises(ConfigError, match="multiple of 128"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "data: [unclosed\n"))


@pytest.mark.parametrize("name", ["configs/demo/base.yaml", "configs/bccd/base.yaml", "configs/wheat/base.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(name)
    assert cfg.data.name in name


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*/*.yaml")))
def test_every_shipped_config_loads_and_builds_its_augmentation(path):
    from pipeline.augment import build_train

    cfg = load_config(path)
    build_train(cfg.augment, cfg.model.image_size, mosaic=cfg.augment.mosaic_prob > 0)


def test_bare_on_off_mean_the_words(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {name: d, format: voc, root: x}\ntrain: {amp: off, channels_last: on}\n")
    cfg = load_config(path, ["train.channels_last=off"])
    assert cfg.train.amp == "off" and cfg.train.channels_last == "off"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(path, ["train.amp=on"])  # "on" is not an AMP mode: still an error, naming the key
