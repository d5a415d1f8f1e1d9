"""pipeline.leaderboard: register -> show, record, local score, plot and Kaggle sync on recorded API responses
(a fake client: no network, no kaggle package needed). The ledger files themselves: test_ledger.py."""
import io
import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from pipeline import leaderboard as lb
from pipeline.data.readers.gwd import read_gwd_labels
from pipeline import ledger, tracking
from pipeline.config import TrackingConfig
from pipeline.formats import content_hash
from test_ledger import ENS, ENS2, OFF, ledger_rows, make_submission

KAGGLE_FIXTURE = Path(__file__).parent / "data" / "kaggle" / "competition_submissions.json"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test touches the project's mlflow.db or the user's Kaggle setup."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setattr(tracking, "_dead_uris", {})


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = lb.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two(tmp_path) -> Path:
    folder = tmp_path / "submissions"
    make_submission(folder, ENS, cv=0.70, created="2026-11-23T10:15:00")
    make_submission(folder, ENS2, cv=0.72, created="2026-11-24T08:00:00")
    return folder


# --------------------------------------------------------------------------------------------- register / show


def test_register_then_show_lists_newest_first_with_the_gap(two, capsys):
    assert set(ledger_rows(two)) == {ENS, ENS2}
    assert ledger_rows(two)[ENS]["members"] == "frcnn;effdet"
    assert run_cli(capsys, "record", ENS, "--public", "0.7123", "--dir", two)[0] == 0
    code, out, _ = run_cli(capsys, "show", "--dir", two)
    assert code == 0
    lines = out.splitlines()
    assert "submission" in lines[0] and "gap" in lines[0]
    assert ENS2 in lines[1] and ENS in lines[2]  # newest first
    assert "0.0123" in lines[2] and "frcnn,effdet" in lines[2]
    code, out, _ = run_cli(capsys, "show", "--csv", "--dir", two)
    table = pd.read_csv(io.StringIO(out))
    assert list(table.submission) == [ENS2, ENS]
    assert table.gap[1] == pytest.approx(0.7123 - 0.70) and pd.isna(table.gap[0])
    assert table["round"].isna().all()  # registered without a pseudo round: unknown, not 0
    assert table.cv_nested.isna().all()  # registered without the nested score (or before the ledger had one)
    folder = two.parent / "with-round"
    make_submission(folder, ENS, cv=0.7, created="2026-11-23T10:15:00")
    with ledger.ledger_lock(folder):
        rows = ledger.load_ledger(folder)
        rows[0]["pseudo_round"] = "0"
        ledger.save_ledger(rows, folder)
    header, line = run_cli(capsys, "show", "--dir", folder)[1].splitlines()
    assert header.split()[3] == "round" and line.split()[3] == "0"
    # the tuning scored out of fold, beside the tuned CV
    meta = make_submission(two.parent / "nested", ENS, cv=0.7, created="2026-11-23T10:15:00")
    ledger.register_submission(meta | {"cv_nested": 0.6875}, OFF, experiment="demo", ledger_dir=two.parent / "nested")
    assert ledger_rows(two.parent / "nested")[ENS]["cv_nested"] == "0.6875"
    header, line = run_cli(capsys, "show", "--dir", two.parent / "nested")[1].splitlines()
    assert header.split()[4:6] == ["cv", "cv_nested"] and line.split()[4:6] == ["0.7000", "0.6875"]


def test_sidecar_without_a_ledger_row_is_picked_up(tmp_path, capsys):
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "x.csv").write_text("image_id,PredictionString\n")
    (folder / ("x.csv" + ledger.META_SUFFIX)).write_text(json.dumps({"file": "x.csv", "cv": 0.5, "members": ["m"]}))
    code, out, _ = run_cli(capsys, "show", "--dir", folder)
    assert code == 0 and "x.csv" in out
    assert run_cli(capsys, "show", "--dir", tmp_path / "empty")[1].startswith("no submissions")


# --------------------------------------------------------------------------------------------- record


def test_record_by_name_path_and_hash(two, capsys):
    code, out, _ = run_cli(capsys, "record", two / ENS, "--public", "0.7123", "--private", "0.6901", "--dir", two)
    assert code == 0 and "gap +0.0123" in out
    row = ledger_rows(two)[ENS]
    assert (row["public"], row["private"], row["lb_source"]) == ("0.7123", "0.6901", "manual")
    prefix = ledger_rows(two)[ENS2]["content_hash"][:10]
    assert run_cli(capsys, "record", prefix, "--private", "0.7", "--dir", two)[0] == 0
    assert ledger_rows(two)[ENS2]["private"] == "0.7"
    assert "(nested" not in out  # registered without one
    with ledger.ledger_lock(two):
        rows = ledger.load_ledger(two)
        next(r for r in rows if r["file"] == ENS)["cv_nested"] = "0.69"
        ledger.save_ledger(rows, two)
    out = run_cli(capsys, "record", ENS, "--public", "0.7123", "--dir", two)[1]
    assert out.startswith(f"{ENS}: CV 0.7000 (nested 0.6900), public 0.7123")


def test_record_unknown_submission_is_a_clear_error(two, capsys):
    code, out, err = run_cli(capsys, "record", "nope.csv", "--public", "0.5", "--dir", two)
    assert code == 1 and "unknown submission 'nope.csv'" in err and "Traceback" not in err + out
    code, _, err = run_cli(capsys, "record", ENS, "--dir", two)
    assert code == 1 and "--public" in err


@pytest.mark.slow
def test_register_and_record_reach_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "submissions"
    meta = make_submission(folder, ENS, cv=0.70, created="2026-11-23T10:15:00", tracking_cfg=TrackingConfig(uri=uri))
    row = ledger_rows(folder)[ENS]
    assert row["mlflow_run_id"] and row["tracking_uri"] == uri
    lb.record(ENS, public=0.7123, private=0.6901, ledger_dir=folder)
    run = mlflow.MlflowClient(uri).get_run(row["mlflow_run_id"])
    assert run.data.tags["pipeline.stage"] == "submission"
    assert run.data.tags["pipeline.submission_hash"] == meta["content_hash"]
    assert run.data.metrics == {"cv": 0.70, "lb_public": 0.7123, "lb_private": 0.6901}


# --------------------------------------------------------------------------------------------- score


def gwd_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"experiment: toy\nmetric: gwd\ndata:\n  name: toy\n  format: gwd_csv\n"
                      f"  root: {tmp_path / 'data'}\n  classes: [wheat]\nsubmission:\n  format: gwd\n")
    return config


@pytest.fixture
def scored(tmp_path) -> tuple[Path, Path]:
    """img1: found exactly; img2: boxes on an image the labels do not list (an empty image); img3: missed."""
    folder = tmp_path / "submissions"
    make_submission(folder, ENS, cv=0.5, created="2026-11-23T10:15:00",
                    content="image_id,PredictionString\nimg1,0.9 10 10 20 20\nimg2,0.8 5 5 10 10\nimg3,\n")
    labels = tmp_path / "labels.csv"
    labels.write_text('image_id,width,height,bbox,source\nimg1,64,64,"[10, 10, 20, 20]",s\n'
                      'img3,64,64,"[1.0, 2.0, 30.0, 30.0]",s\n')
    return folder, labels


def test_score_with_labels_records_the_local_lb(tmp_path, scored, capsys):
    folder, labels = scored
    code, out, err = run_cli(capsys, "score", ENS, "--labels", labels, "--config", gwd_config(tmp_path),
                             "--dir", folder)
    assert code == 0, err
    row = ledger_rows(folder)[ENS]
    assert float(row["public"]) == pytest.approx(1 / 3)  # mean of img1 = 1, img2 = 0 (false positive), img3 = 0
    assert row["lb_source"] == "local:labels.csv" and "0.3333" in out
    assert run_cli(capsys, "score", ENS, "--labels", labels, "--config", gwd_config(tmp_path),
                   "--as", "private", "--dir", folder)[0] == 0
    assert float(ledger_rows(folder)[ENS]["private"]) == pytest.approx(1 / 3)


def test_score_defaults_to_the_config_test_split(tmp_path, scored, monkeypatch, capsys):
    import pipeline.data

    folder, labels = scored
    table = read_gwd_labels(labels, ["wheat"])
    seen = {}
    monkeypatch.setattr(pipeline.data, "load_dataset", lambda cfg, split: seen.setdefault(split, table))
    code, _, err = run_cli(capsys, "score", ENS, "--config", gwd_config(tmp_path), "--dir", folder)
    assert code == 0, err
    assert list(seen) == ["test"]
    assert float(ledger_rows(folder)[ENS]["public"]) == pytest.approx(0.5)  # img2 is not a test image here


def test_score_errors_are_clear(tmp_path, scored, capsys):
    folder, labels = scored
    bad = tmp_path / "bad.csv"
    bad.write_text('image_id,bbox\nimg1,"[1, 2, 3]"\n')
    code, _, err = run_cli(capsys, "score", ENS, "--labels", bad, "--config", gwd_config(tmp_path), "--dir", folder)
    assert code == 1 and "line 2" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "score", ENS, "--labels", labels, "--config", tmp_path / "no.yaml",
                           "--dir", folder)
    assert code == 1 and "config file not found" in err


# --------------------------------------------------------------------------------------------- plot


def test_plot_writes_a_png_and_needs_scores(two, capsys, tmp_path):
    code, _, err = run_cli(capsys, "plot", "--dir", two)
    assert code == 1 and "nothing to plot" in err
    lb.record(ENS, public=0.71, private=None, ledger_dir=two)
    lb.record(ENS2, public=0.74, private=None, ledger_dir=two)
    code, out, _ = run_cli(capsys, "plot", "--dir", two, "--out", tmp_path / "p" / "cv_lb.png")
    assert code == 0 and "Pearson r = 1.000" in out
    assert (tmp_path / "p" / "cv_lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lb.pearson([0.1], [0.2]) is None
    assert "nested" not in out  # no row has a nested CV
    with ledger.ledger_lock(two):  # nested CVs that rank the two the other way round from the LB
        rows = ledger.load_ledger(two)
        for row, nested in zip(sorted(rows, key=lambda r: r["file"]), ("0.69", "0.68")):
            row["cv_nested"] = nested
        ledger.save_ledger(rows, two)
    png, r, r_nested = lb.plot(two, tmp_path / "n.png")
    assert r == pytest.approx(1.0) and r_nested == pytest.approx(-1.0)  # ENS: 0.69 nested, public 0.71
    assert run_cli(capsys, "plot", "--dir", two, "--out", tmp_path / "n.png")[1].strip().endswith(
        f"nested CV r = {r_nested:.3f})")


# --------------------------------------------------------------------------------------------- Kaggle sync


class FakeKaggle:
    """Stands in for kaggle's KaggleApi: returns recorded ``competition_submissions`` responses."""

    def __init__(self, submissions):
        self.submissions, self.calls = submissions, []

    def competition_submissions(self, competition):
        self.calls.append(competition)
        return self.submissions


def test_sync_on_recorded_responses_updates_scores(two, monkeypatch, capsys):
    fake = FakeKaggle(json.loads(KAGGLE_FIXTURE.read_text()))
    monkeypatch.setattr(lb, "kaggle_api", lambda: fake)
    code, out, err = run_cli(capsys, "sync", "--competition", "global-wheat-detection", "--dir", two)
    assert code == 0, err
    assert fake.calls == ["global-wheat-detection"]
    rows = ledger_rows(two)
    # matched by description (fileName is the notebook's submission.csv); the newest scored one wins
    assert (rows[ENS2]["public"], rows[ENS2]["private"], rows[ENS2]["kaggle_ref"]) == ("0.7301", "0.7012",
                                                                                       "40000005")
    # matched by fileName; private score still hidden
    assert (rows[ENS]["public"], rows[ENS]["private"], rows[ENS]["lb_source"]) == ("0.7123", "", "kaggle")
    assert "old_experiment.csv" in out and "2 submission(s) not scored yet" in out


def test_sync_accepts_kagglesdk_objects(two, monkeypatch):
    status = types.SimpleNamespace(name="COMPLETE")  # kagglesdk's SubmissionStatus enum member
    sub = types.SimpleNamespace(ref=7, file_name="submission.csv", date=pd.Timestamp("2026-11-25T10:00:00"),
                                description=f"{ENS} again", status=status, public_score="0.75",
                                private_score="")
    report = lb.sync("gwd", ledger_dir=two, api=FakeKaggle([sub]))
    assert report["updated"] == [(ENS, 0.75, None)] and ledger_rows(two)[ENS]["public"] == "0.75"


def test_sync_without_credentials_is_a_clear_message(two, monkeypatch, tmp_path, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    code, out, err = run_cli(capsys, "sync", "--competition", "gwd", "--dir", two)
    assert code == 1 and "no Kaggle credentials" in err and "kaggle.json" in err and "Traceback" not in err


def test_sync_without_the_kaggle_package_says_pip_install(two, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.setitem(sys.modules, "kaggle", None)  # as if not installed, even where it is
    code, _, err = run_cli(capsys, "sync", "--competition", "gwd", "--dir", two)
    assert code == 1 and "pip install kaggle" in err


# --------------------------------------------------------------------------------------------- Kaggle submit


def ApiCreateSubmissionResponse(message: str, ref: int) -> types.SimpleNamespace:
    """What kaggle >= 1.7's ``KaggleApi.competition_submit`` returns (kagglesdk ``ApiCreateSubmissionResponse``:
    ``message`` str, ``ref`` int; ref 0 and "Could not submit to competition" when the upload failed)."""
    return types.SimpleNamespace(message=message, ref=ref)


class FakeSubmitKaggle(FakeKaggle):
    """Also answers ``competition_submit(file_name, message, competition, quiet=False)`` like kaggle 2.x: it reads
    the file (the real one uploads it) and returns the recorded response."""

    def __init__(self, response, submissions=()):
        super().__init__(list(submissions))
        self.response, self.submitted = response, []

    def competition_submit(self, file_name, message, competition, quiet=False):
        self.submitted.append({"file": file_name, "message": message, "competition": competition,
                               "bytes": Path(file_name).read_bytes()})
        if isinstance(self.response, Exception):
            raise self.response
        return self.response


@pytest.fixture
def hashed(tmp_path) -> Path:
    """Two submissions registered with the content hash of their bytes, as the submission stage registers them."""
    folder = tmp_path / "submissions"
    folder.mkdir()
    for name, cv in ((ENS, 0.70), (ENS2, 0.72)):
        (folder / name).write_text(f"image_id,PredictionString\nimg_{name},0.9 1 1 5 5\n")
        ledger.register_submission({"file": name, "cv": cv, "members": ["frcnn", "effdet"],
                                    "created": "2026-11-23T10:15:00", "content_hash": content_hash(folder / name)},
                                   TrackingConfig(enabled=False), ledger_dir=folder)
    return folder


def test_submit_sends_the_file_and_records_its_ref_then_sync_finds_it_by_ref(hashed, monkeypatch, capsys):
    fake = FakeSubmitKaggle(ApiCreateSubmissionResponse("Successfully submitted to Global Wheat Detection",
                                                        40000007))
    monkeypatch.setattr(lb, "kaggle_api", lambda: fake)
    before = ledger_rows(hashed)[ENS2]
    code, out, err = run_cli(capsys, "submit", ENS, "--competition", "global-wheat-detection", "-m", "wbf tuned",
                             "--dir", hashed)
    assert code == 0, err
    (sent,) = fake.submitted
    assert Path(sent["file"]) == hashed / ENS and sent["bytes"] == (hashed / ENS).read_bytes()
    assert sent["competition"] == "global-wheat-detection" and sent["message"] == f"{ENS}: wbf tuned"
    assert "Kaggle ref 40000007" in out and "leaderboard sync --competition global-wheat-detection" in out
    rows = ledger_rows(hashed)
    assert (rows[ENS]["kaggle_ref"], rows[ENS]["kaggle_competition"]) == ("40000007", "global-wheat-detection")
    assert rows[ENS]["public"] == "" and rows[ENS2] == before  # no score yet; the other row untouched
    # Kaggle lists it under the notebook's file name with a description edited on the website: only the ref links it
    fake.submissions = [
        {"ref": 40000007, "fileName": "submission.csv", "date": "2026-11-25T10:00:00.000Z",
         "description": "edited on the website", "status": "complete", "publicScore": "0.7412",
         "privateScore": "0.7305"},
    ]
    code, out, err = run_cli(capsys, "sync", "--competition", "global-wheat-detection", "--dir", hashed)
    assert code == 0, err
    row = ledger_rows(hashed)[ENS]
    assert (row["public"], row["private"], row["lb_source"], row["kaggle_ref"]) == ("0.7412", "0.7305", "kaggle",
                                                                                    "40000007")


def test_sync_never_gives_a_row_the_scores_of_another_competition(hashed, monkeypatch):
    fake = FakeSubmitKaggle(ApiCreateSubmissionResponse("Successfully submitted to Other", 51))
    lb.submit(ENS, competition="other-competition", ledger_dir=hashed, api=fake)
    assert fake.submitted[0]["message"] == ENS  # no message: the file name alone
    same_name = {"ref": 9, "fileName": ENS, "date": "2026-11-25T10:00:00Z", "description": f"{ENS} by hand",
                 "status": "complete", "publicScore": "0.5", "privateScore": ""}
    report = lb.sync("global-wheat-detection", ledger_dir=hashed, api=FakeKaggle([same_name]))
    assert report["updated"] == [] and len(report["unmatched"]) == 1
    assert ledger_rows(hashed)[ENS]["public"] == ""


def test_submit_accepts_a_hash_and_a_dict_response_without_ref(hashed, caplog):
    digest = ledger_rows(hashed)[ENS2]["content_hash"]
    fake = FakeSubmitKaggle({"message": "Successfully submitted to Global Wheat Detection"})  # kaggle < 1.7
    row = lb.submit(digest[:10], competition="gwd", message=f"{ENS2} again", ledger_dir=hashed, api=fake)
    assert fake.submitted[0]["message"] == f"{ENS2} again"  # already names the file: kept as written
    assert (row["file"], row["kaggle_ref"], row["kaggle_competition"]) == (ENS2, "", "gwd")
    assert "did not return the submission's ref" in caplog.text


@pytest.mark.parametrize("response, expected", [
    (ApiCreateSubmissionResponse("Could not submit to competition", 0), "failed (Could not submit to competition)"),
    (RuntimeError("400 Client Error: Bad Request (daily submission limit reached)"), "daily submission limit"),
])
def test_a_refused_submission_is_a_clear_error_and_leaves_the_ledger(hashed, monkeypatch, capsys, response,
                                                                     expected):
    before = ledger.ledger_path(hashed).read_text()
    monkeypatch.setattr(lb, "kaggle_api", lambda: FakeSubmitKaggle(response))
    code, out, err = run_cli(capsys, "submit", ENS, "--competition", "gwd", "--dir", hashed)
    assert code == 1 and expected in err and "Traceback" not in err + out
    assert ledger.ledger_path(hashed).read_text() == before


def test_submit_refuses_a_file_that_changed_or_is_not_in_the_ledger(hashed, monkeypatch, capsys):
    fake = FakeSubmitKaggle(ApiCreateSubmissionResponse("ok", 1))
    monkeypatch.setattr(lb, "kaggle_api", lambda: fake)
    code, _, err = run_cli(capsys, "submit", "nope.csv", "--competition", "gwd", "--dir", hashed)
    assert code == 1 and "unknown submission 'nope.csv'" in err
    (hashed / ENS).write_text("image_id,PredictionString\nedited,\n")
    code, _, err = run_cli(capsys, "submit", ENS, "--competition", "gwd", "--dir", hashed)
    assert code == 1 and "changed since it was registered" in err
    (hashed / ENS).unlink()
    code, _, err = run_cli(capsys, "submit", ENS, "--competition", "gwd", "--dir", hashed)
    assert code == 1 and "not found" in err
    assert fake.submitted == []


def no_kaggle_credentials(monkeypatch, tmp_path):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_submit_without_credentials_or_package_says_what_to_do(hashed, monkeypatch, tmp_path, capsys):
    no_kaggle_credentials(monkeypatch, tmp_path)
    code, out, err = run_cli(capsys, "submit", ENS, "--competition", "gwd", "--dir", hashed)
    assert code == 1 and "no Kaggle credentials" in err and "~/.kaggle/kaggle.json" in err
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in err and "Traceback" not in err + out
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.setitem(sys.modules, "kaggle", None)  # as if not installed, even where it is
    code, _, err = run_cli(capsys, "submit", ENS, "--competition", "gwd", "--dir", hashed)
    assert code == 1 and "pip install kaggle" in err
    assert ledger_rows(hashed)[ENS]["kaggle_ref"] == ""


def test_a_kaggle_that_exits_while_authenticating_is_a_clear_error(monkeypatch):
    """kaggle >= 2 prints help and calls exit(1) when no authentication method works."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "expired")

    class ExitingApi:
        def authenticate(self):
            raise SystemExit(1)

    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = ExitingApi
    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    monkeypatch.setitem(sys.modules, "kaggle.api", types.ModuleType("kaggle.api"))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", extended)
    with pytest.raises(lb.LeaderboardError, match="Kaggle authentication failed"):
        lb.kaggle_api()
