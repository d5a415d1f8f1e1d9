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


# ------------------------------------------------------------------------------- model.image_size: [W, H]

DATA = "data: {name: d, format: voc, root: x}\n"


def test_image_size_is_a_side_or_width_and_height(tmp_path):
    from pipeline.config import input_wh, size_text

    path = write(tmp_path / "c.yaml", DATA + "model: {image_size: [1280, 736]}\n")
    cfg = load_config(path)
    assert cfg.model.image_size == (1280, 736) and cfg.model.input_wh == (1280, 736)
    assert size_text(cfg.model.image_size) == "1280x736"
    assert load_config(path, ["model.image_size=512"]).model.input_wh == (512, 512)
    assert load_config(path, ["model.image_size=640x384"]).model.image_size == (640, 384)  # the folder/CLI form
    assert load_config(path, ["model.image_size=[512, 512]"]).model.image_size == 512  # a square pair is the side
    assert input_wh(512) == (512, 512) and input_wh([736, 1280]) == (736, 1280)
    # the resolved config (what a run writes and a resume compares) reads back as the same size
    reread = write(tmp_path / "resolved.yaml", cfg.to_yaml())
    assert load_config(reread).model.image_size == (1280, 736)


@pytest.mark.parametrize("size, problem", [("[1280, 16]", r">= 32 px, got \[1280, 16\] \(width, height\)"),
                                           ("16", ">= 32 px, got 16"),
                                           ("[1280, 736, 3]", r"one side .* or \[width, height\]"),
                                           ("true", r"one side .* or \[width, height\]"),
                                           ("wide", "WIDTHxHEIGHT")])
def test_a_bad_image_size_names_the_key_and_the_rule(tmp_path, size, problem):
    path = write(tmp_path / "c.yaml", DATA)
    with pytest.raises(ConfigError, match=rf"(?s)model.image_size.*{problem}"):
        load_config(path, [f"model.image_size={size}"])


def test_efficientdet_needs_each_side_a_multiple_of_128(tmp_path):
    path = write(tmp_path / "c.yaml", DATA + "model: {name: efficientdet, image_size: [1280, 720]}\n")
    with pytest.raises(ConfigError, match=r"1280x720: EfficientDet needs each side a multiple of 128.*720 is not "
                                          r"\(use 640 or 768\)"):
        load_config(path)
    assert load_config(path, ["model.image_size=[1280, 768]"]).model.input_wh == (1280, 768)


def test_multiscale_with_a_non_square_input_takes_width_height_pairs_only(tmp_path):
    path = write(tmp_path / "c.yaml", DATA + "model: {image_size: [1280, 736]}\n")
    cfg = load_config(path, ["train.multiscale=[[960, 544], [1280, 736]]"])
    assert cfg.train.multiscale == [(960, 544), (1280, 736)]
    with pytest.raises(ConfigError, match=r"train.multiscale \[1024\]: model.image_size is 1280x736 .* \[width, "
                                          r"height\] pair, e.g. \[\[960, 544\], \[1280, 736\]\]"):
        load_config(path, ["train.multiscale=[1024, [1280, 736]]"])
    with pytest.raises(ConfigError, match="repeated"):
        load_config(path, ["train.multiscale=[[1280, 736], 1280x736]"])
    with pytest.raises(ConfigError, match=r"train.multiscale.*entry \[960, 8\].*>= 32"):
        load_config(path, ["train.multiscale=[[960, 8]]"])
    # a square input keeps its sides, and may mix in pairs
    square = load_config(write(tmp_path / "s.yaml", DATA), ["train.multiscale=[384, [512, 384]]"])
    assert square.train.multiscale == [384, (512, 384)]


def test_a_member_fuses_the_views_its_entry_names_in_the_ensembles_order(tmp_path):
    from pipeline.config import MemberConfig

    assert MemberConfig(config="m.yaml").chosen_views(["hflip", "none", "hflip"], "f") == ["none", "hflip"]
    chosen = MemberConfig(config="m.yaml", views=["scale1.25", "none"])
    assert chosen.chosen_views(["hflip", "scale1.25", "none"], "f") == ["none", "scale1.25"]
    with pytest.raises(ConfigError, match=r"member m.yaml \(f.parquet\): views \['vflip'\] were not predicted; "
                                          r"the predictions hold \['none', 'hflip'\]"):
        MemberConfig(config="m.yaml", views=["vflip", "none"]).chosen_views(["hflip", "none"], "f.parquet")
    for bad in ("[]", "[none, none]"):
        path = write(tmp_path / "e.yaml", "data: {name: d, format: voc, root: x}\n"
                     f"ensemble: {{members: [{{config: m.yaml, views: {bad}}}]}}\n")
        with pytest.raises(ConfigError, match="views must be distinct and at least one"):
            load_config(path)
