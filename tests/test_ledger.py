"""pipeline.ledger: sidecars and ledger rows, registering, finding a submission by name or content, scores."""
import csv
import json
from pathlib import Path

import pytest

from pipeline import ledger, tracking
from pipeline.config import TrackingConfig
from pipeline.formats import content_hash

OFF = TrackingConfig(enabled=False)
ENS = "20261123-101500_demo-ens.csv"
ENS2 = "20261124-080000_demo-ens2.csv"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test touches the project's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setattr(tracking, "_dead_uris", {})


def make_submission(folder: Path, name: str, *, cv: float, created: str, content: str | None = None,
                    members=("frcnn", "effdet"), tracking_cfg=OFF, fmt: str = "gwd") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(content or f"image_id,PredictionString\nimg_{name},0.9 1 1 5 5\n")
    meta = {"file": name, "created": created, "ensemble": "ens", "members": list(members), "cv": cv,
            "metric": "gwd", "format": fmt, "content_hash": f"hash-{name}-{len(path.read_text())}-0123456789",
            "config": "configs/demo/ensemble.yaml", "mlflow_run_id": None}
    path.with_name(name + ledger.META_SUFFIX).write_text(json.dumps(meta))
    ledger.register_submission(meta, tracking_cfg, experiment="demo", ledger_dir=folder)
    return meta


def ledger_rows(folder: Path) -> dict[str, dict]:
    with open(folder / ledger.LEDGER_NAME, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def set_public(folder: Path, file: str, public: float) -> None:
    with ledger.ledger_lock(folder):
        rows = ledger.load_ledger(folder)
        for i in ledger.find_rows(rows, file):
            ledger.set_scores(rows, i, public=public, source="manual")
        ledger.save_ledger(rows, folder)


@pytest.fixture
def two(tmp_path) -> Path:
    folder = tmp_path / "submissions"
    make_submission(folder, ENS, cv=0.70, created="2026-11-23T10:15:00")
    make_submission(folder, ENS2, cv=0.72, created="2026-11-24T08:00:00")
    return folder


def test_registering_again_keeps_scores_unless_the_content_changed(two):
    set_public(two, ENS, 0.71)
    meta = json.loads((two / (ENS + ledger.META_SUFFIX)).read_text())
    ledger.register_submission(meta, OFF, ledger_dir=two)
    assert len(ledger.load_ledger(two)) == 2 and ledger_rows(two)[ENS]["public"] == "0.71"
    ledger.register_submission(meta | {"content_hash": "different"}, OFF, ledger_dir=two)
    assert ledger_rows(two)[ENS]["public"] == ""


def test_rows_are_text_cells_in_the_ledger_columns(two):
    row = ledger_rows(two)[ENS]
    assert list(row) == ledger.LEDGER_COLUMNS
    assert (row["members"], row["cv"], row["experiment"], row["mlflow_run_id"]) == ("frcnn;effdet", "0.7", "demo", "")
    assert [ledger.cell_text(v) for v in (None, float("nan"), 0.1, ["a", "b"], 3)] == ["", "", "0.1", "a;b", "3"]
    assert [ledger.cell_number(v) for v in ("0.25", "", "inf", None, "x")] == [0.25, None, None, None, None]


def test_register_defaults_the_ledger_to_the_folder_of_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "subs"
    folder.mkdir()
    ledger.register_submission({"file": str(folder / "a.csv"), "cv": 0.5}, OFF)
    assert list(ledger_rows(folder)) == ["a.csv"]
    monkeypatch.chdir(tmp_path)
    ledger.register_submission({"file": "b.csv"}, OFF)  # a bare name: the default folder
    assert list(ledger_rows(tmp_path / ledger.DEFAULT_DIR)) == ["b.csv"]
    with pytest.raises(ValueError, match="no 'file'"):
        ledger.register_submission({"cv": 0.5}, OFF)


def test_sidecars_are_written_beside_the_file_and_read_as_rows(tmp_path, caplog):
    folder = tmp_path / "copied"
    meta = {"file": str(folder / "x.csv"), "cv": 0.5, "members": ["m", "n"], "mlflow_run_id": "r1"}
    path = ledger.write_sidecar(meta)
    assert path == folder / "x.csv.meta.json" == ledger.sidecar_path(folder / "x.csv")
    assert path.read_text() == json.dumps(meta, indent=2)
    (folder / ("broken.csv" + ledger.META_SUFFIX)).write_text("{not json")
    (folder / ("list.csv" + ledger.META_SUFFIX)).write_text("[]")
    rows = ledger.load_ledger(folder)  # no ledger.csv yet: the sidecars are the rows; bad ones are skipped
    assert [(r["file"], r["members"], r["source_run_id"]) for r in rows] == [("x.csv", "m;n", "r1")]
    assert "not a readable submission sidecar" in caplog.text and "expected a JSON object" in caplog.text
    assert not ledger.ledger_path(folder).exists()
    with pytest.raises(ValueError, match="no 'file'"):
        ledger.write_sidecar({"cv": 0.5})


def test_unknown_columns_survive_and_a_non_ledger_is_refused(tmp_path):
    path = ledger.ledger_path(tmp_path)
    path.write_text("file,cv,note\na.csv,0.5,keep me\n")
    rows = ledger.load_ledger(tmp_path)
    assert rows[0]["note"] == "keep me" and rows[0]["public"] == ""  # a column added later reads as empty
    ledger.save_ledger(rows, tmp_path)
    assert path.read_text().splitlines()[0] == ",".join(ledger.LEDGER_COLUMNS + ["note"])
    path.write_text("image_id,PredictionString\n")
    with pytest.raises(ledger.LedgerError, match="not a ledger"):
        ledger.load_ledger(tmp_path)


def test_find_rows_by_name_path_hash_prefix_or_content(tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    (folder / ENS).write_text("image_id,PredictionString\nimg0,\n")
    digest = content_hash(folder / ENS)
    ledger.register_submission({"file": ENS, "content_hash": digest}, OFF, ledger_dir=folder)
    make_submission(folder, ENS2, cv=0.72, created="2026-11-24T08:00:00")
    rows = ledger.load_ledger(folder)
    assert ledger.find_rows(rows, ENS2) == ledger.find_rows(rows, str(folder / ENS2)) == [1]
    assert ledger.find_rows(rows, digest) == ledger.find_rows(rows, digest[:6].upper()) == [0]
    assert ledger.find_rows(rows, digest[:5]) == []  # too short to name one submission
    copy = tmp_path / "renamed.csv"  # the same bytes under another name: found by content
    copy.write_bytes((folder / ENS).read_bytes())
    assert ledger.find_rows(rows, str(copy)) == [0]
    assert ledger.find_rows(rows, "nope.csv") == []


def test_set_scores_keeps_what_it_is_not_given(two):
    rows = ledger.load_ledger(two)
    ledger.set_scores(rows, 0, public=0.7, private=0.6, source="kaggle", ref="40000005")
    row = ledger.set_scores(rows, 0, private=0.65, source="manual")
    assert (row["public"], row["private"], row["lb_source"], row["kaggle_ref"]) == ("0.7", "0.65", "manual",
                                                                                     "40000005")
    assert row["lb_updated"].endswith("+00:00")


def test_cells_stay_text_and_a_spreadsheets_save_still_reads(tmp_path):
    """Finding 2 (ids are strings wherever they are read back) and 1 (text in another encoding): cells such as
    ``NA``, ``None`` or ``007`` come back as written; a BOM is dropped; Latin-1 is a LedgerError naming the file."""
    folder = tmp_path / "submissions"
    odd = {"file": "NA.csv", "ensemble": "None", "members": ["nan", "null"], "cv": None, "config": "007",
           "created": "2026-11-23T10:15:00", "content_hash": "abc123def456"}
    row = ledger.register_submission(odd, OFF, experiment="NA", ledger_dir=folder)
    assert row["file"] == "NA.csv"
    (back,) = ledger.load_ledger(folder)
    assert (back["file"], back["ensemble"], back["members"], back["cv"], back["config"], back["experiment"]) == \
        ("NA.csv", "None", "nan;null", "", "007", "NA")
    path = ledger.ledger_path(folder)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # saved again by a spreadsheet
    assert ledger.load_ledger(folder)[0]["file"] == "NA.csv"
    path.write_bytes("file,ensemble\nblé.csv,x\n".encode("latin-1"))
    with pytest.raises(ledger.LedgerError, match=r"ledger\.csv: not UTF-8 text \(line 2"):
        ledger.load_ledger(folder)
