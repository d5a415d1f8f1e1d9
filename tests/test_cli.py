"""The front door: `pipeline <command>` runs the stage's own main(); without --config a stage says what it used."""
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, write_config
from pipeline import cli


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for command in ("folds", "train", "predict", "ensemble", "submission", "submit", "leaderboard"):
        assert f"  {command} " in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_names_an_importable_module_with_main():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_a_stage_without_config_uses_the_project_file_and_says_so(tmp_path, tiny_data, monkeypatch, capsys):
    config = write_config(tmp_path / "cfg", tiny_data)
    (tmp_path / "pipeline.yaml").write_text(config.read_text())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["folds", "--set", "tracking.enabled=false"]) == 0
    captured = capsys.readouterr()
    assert "using config pipeline.yaml" in captured.err
    assert (tmp_path / "cfg" / "folds" / "demo_k2_s0.csv").exists()


def test_without_a_project_file_a_stage_falls_back_to_the_demo(tmp_path, monkeypatch):
    from pipeline.config import DEMO_CONFIGS, add_config_args, config_path_from_args
    import argparse

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_config_args(parser, demo="frcnn.yaml")
    assert config_path_from_args(parser.parse_args([])) == DEMO_CONFIGS / "frcnn.yaml"
    assert config_path_from_args(parser.parse_args(["--config", "x.yaml"])).name == "x.yaml"


@pytest.mark.slow
def test_python_dash_m_pipeline_runs_the_front_door_without_library_warnings():
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "pipeline", "train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--fold" in proc.stdout and "Warning" not in proc.stderr
