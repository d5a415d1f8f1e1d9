"""The ledger from submission file to leaderboard score: is CV telling the truth about the LB?

    python -m pipeline.leaderboard show [--csv]
    python -m pipeline.leaderboard record 20261123-101500_demo-ens.csv --public 0.7123 [--private 0.6901]
    python -m pipeline.leaderboard submit 20261123-101500_demo-ens.csv --competition global-wheat-detection [-m M]
    python -m pipeline.leaderboard sync --competition global-wheat-detection      # needs `pip install kaggle`
    python -m pipeline.leaderboard score 20261123-101500_demo-ens.csv --config configs/demo/base.yaml [--labels F]
    python -m pipeline.leaderboard plot [--out submissions/cv_vs_lb.png]

Every submission in ``submissions/`` has a sidecar ``<file>.meta.json`` (written by the submission stage) and a
row in ``submissions/ledger.csv``: a plain CSV, written atomically, that works without MLflow and diffs well
(the files and their columns: :mod:`pipeline.ledger`). The same facts are in MLflow as the "submission" runs
(tags ``pipeline.stage=submission``, ``pipeline.submission_hash``), which get the metrics ``lb_public`` /
``lb_private`` once scores are known. A sidecar without a ledger row (a ``submissions/`` folder copied from a
Kaggle notebook) is picked up as well.

Sending a file (``submit``, needs ``pip install kaggle`` and credentials): uploads a ledger row's file through the
kaggle API with a description that names the file, and records the submission's ref and the competition in the
row (``kaggle_ref``, ``kaggle_competition``). Code competitions take a notebook, not a file: there, run the bundle's
notebook on Kaggle (:mod:`pipeline.bundle`).

Linking Kaggle to the ledger (``sync``): a Kaggle submission matches the row that recorded its ref, else the row
whose file name (or its stem, or the first 12 characters of its content hash) appears in the submission's
description, else the one row with the same file name. Rows sent to another competition are never matched.
Code competitions name every file ``submission.csv``, so put the ledger's file name in the message when
submitting by hand: ``kaggle competitions submit -c SLUG -f submissions/X.csv -m "X.csv"``.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import ConfigError, TrackingConfig
from pipeline.formats import content_hash, read_submission
from pipeline.io import atomic_write
from pipeline.ledger import (
    DEFAULT_DIR,
    LedgerError,
    cell_number,
    cell_text,
    find_rows,
    ledger_lock,
    ledger_path,
    load_ledger,
    save_ledger,
    set_kaggle_submission,
    set_scores,
)

log = logging.getLogger(__name__)

_HASH_PREFIX = 12  # characters of the content hash that identify a submission in a Kaggle description
# what kaggle's competition_submit answers (instead of raising) when the upload itself failed
_UPLOAD_FAILED = "Could not submit to competition"


class LeaderboardError(RuntimeError):
    """A user error: printed as one clear line, exit code 1, no traceback."""


def _when(values: Any) -> Any:
    """Dates as UTC timestamps (NaT when unreadable): ISO strings, Kaggle's dates and naive dates all compare."""
    return pd.to_datetime(pd.Series(values, dtype="object"), errors="coerce", utc=True, format="mixed")


def _newer(a: str, b: str) -> bool:
    ta, tb = _when([a, b])
    return not pd.isna(ta) and (pd.isna(tb) or ta > tb)


# --------------------------------------------------------------------------------------------- finding rows


def _require_rows(rows: Sequence[Mapping[str, str]], ident: str, ledger_dir: Path) -> list[int]:
    found = find_rows(rows, ident)
    if not found:
        listed = ", ".join(r["file"] for r in rows[-5:]) or "none yet"
        raise LeaderboardError(
            f"unknown submission {ident!r}: not in {ledger_path(ledger_dir)} by file name or content hash "
            f"(latest: {listed}); the submission stage registers files, or use --dir to point at another folder")
    return found


# --------------------------------------------------------------------------------------------- scores -> MLflow


def _store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is missing: recording a score must not create an empty store."""
    db = tracking.sqlite_file(uri)
    return db is None or db.is_file()


def _log_lb(row: Mapping[str, str], ledger_dir: Path, tracking_uri: str | None) -> None:
    uri = tracking_uri or row.get("tracking_uri") or tracking.resolve_uri()
    if not _store_exists(uri):
        return
    cfg = TrackingConfig(uri=uri)
    run_id = row.get("mlflow_run_id") or tracking.find_submission_run(cfg, row.get("content_hash", ""))
    scores = {"lb_public": cell_number(row.get("public")), "lb_private": cell_number(row.get("private"))}
    tags = {"pipeline.lb_source": row.get("lb_source"), "pipeline.kaggle_ref": row.get("kaggle_ref") or None}
    if run_id and tracking.log_lb_scores(cfg, run_id, scores, experiment=row.get("experiment") or "submissions",
                                         fallback_dir=ledger_dir, tags=tags):
        log.info("MLflow: lb scores logged on run %s", run_id)


def record(ident: str, *, public: float | None, private: float | None, ledger_dir: Path = DEFAULT_DIR,
           source: str = "manual", tracking_uri: str | None = None) -> list[dict[str, str]]:
    """Attach leaderboard scores to a submission (ledger row and its MLflow run). Returns the updated rows."""
    if public is None and private is None:
        raise LeaderboardError("give --public and/or --private")
    with ledger_lock(ledger_dir):
        rows = load_ledger(ledger_dir)
        updated = [set_scores(rows, i, public=public, private=private, source=source)
                   for i in _require_rows(rows, ident, ledger_dir)]
        save_ledger(rows, ledger_dir)
    for row in updated:
        _log_lb(row, ledger_dir, tracking_uri)
    return updated


# --------------------------------------------------------------------------------------------- local scoring

def _with_images(table, image_ids: Sequence[str]):
    """``table`` plus the images of ``image_ids`` it lacks, as images without boxes."""
    from pipeline.data import AnnotationTable

    missing = sorted(set(image_ids) - set(table.images.image_id))
    if not missing:
        return table
    extra = pd.DataFrame({"image_id": missing, "path": "", "width": 0, "height": 0})
    return AnnotationTable(pd.concat([table.images, extra], ignore_index=True), table.boxes, table.classes)


def score_submission(submission: Path, *, fmt: str, cfg, labels: Path | None = None):
    """Score a submission file against held-out labels with ``cfg.metric``: the GWD-style ``labels`` CSV (images
    only in the submission count as empty images), or the config's test split (``load_dataset(cfg.data, "test")``,
    whose boxes come from ``data.test_csv`` & co). Returns the ``MetricResult``."""
    from pipeline.data import load_dataset
    from pipeline.data.readers.gwd import read_gwd_labels
    from pipeline.metrics import evaluate  # lazy: heavy, and only this command needs it

    try:
        if labels is not None:
            gt = read_gwd_labels(labels, cfg.data.classes)
            preds = read_submission(submission, fmt, gt.classes)
            gt = _with_images(gt, [str(i) for i in pd.unique(preds["image_id"])])
            return evaluate(cfg.metric, gt, preds)
        gt = load_dataset(cfg.data, "test")
        if len(gt.boxes) == 0:
            raise LeaderboardError(
                f"the test split of {cfg.data.name} has no labels (data.test_csv / test_json / test_split): "
                "pass --labels FILE")
        preds = read_submission(submission, fmt, gt.classes)
        return evaluate(cfg.metric, gt, preds, list(gt.images.image_id))
    except ValueError as exc:  # bad labels, a submission that does not fit the classes: the user's to fix
        raise LeaderboardError(f"cannot score {submission.name}: {exc}") from None


def score(ident: str, *, config: Path, overrides: Sequence[str] = (), labels: Path | None = None,
          as_: str = "public", ledger_dir: Path = DEFAULT_DIR, tracking_uri: str | None = None) -> float:
    """``score`` command: score the submission locally and record the score as its public or private LB."""
    from pipeline.config import load_config

    cfg = load_config(config, list(overrides))
    rows = load_ledger(ledger_dir)
    index = _require_rows(rows, ident, ledger_dir)[0]
    row = rows[index]
    path = Path(ledger_dir) / row["file"]
    if not path.is_file():
        raise LeaderboardError(f"submission file {path} not found")
    if row["metric"] and row["metric"] != cfg.metric:
        log.warning("%s was made for metric %s; scoring with the config's %s", row["file"], row["metric"],
                    cfg.metric)
    result = score_submission(path, fmt=row["format"] or cfg.submission.format, cfg=cfg, labels=labels)
    source = f"local:{labels.name if labels else cfg.data.name + '/test'}"
    record(row["file"], public=result.score if as_ == "public" else None,
           private=result.score if as_ == "private" else None, ledger_dir=ledger_dir, source=source,
           tracking_uri=tracking_uri)
    return float(result.score)


# --------------------------------------------------------------------------------------------- Kaggle sync


def kaggle_credentials() -> str | None:
    """Where Kaggle credentials are (env vars or a token file), or None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    folders += [Path.home() / ".kaggle", Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kaggle"]
    for folder in folders:
        for name in ("kaggle.json", "access_token", "credentials.json"):  # credentials.json: `kaggle auth login`
            if (folder / name).is_file():
                return str(folder / name)
    return None


def kaggle_api() -> Any:
    """An authenticated ``kaggle`` API client; LeaderboardError with what to do when that is impossible."""
    import importlib.util

    try:
        installed = importlib.util.find_spec("kaggle") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        installed = False
    if kaggle_credentials() is None:
        raise LeaderboardError(
            "no Kaggle credentials: create an API token on kaggle.com (Settings > API) and save it as "
            "~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY"
            + ("" if installed else "; the kaggle package is also needed: pip install kaggle"))
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise LeaderboardError("the kaggle package is not installed: pip install kaggle") from None
    api = KaggleApi()
    try:
        api.authenticate()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - kaggle >= 2 calls exit(1) when no method works
        raise LeaderboardError(f"Kaggle authentication failed ({exc!r}): check the token in "
                               f"{kaggle_credentials()}, or create a new one on kaggle.com (Settings > API)") from None
    return api


def _field(obj: Any, *names: str) -> Any:
    """A field of a Kaggle submission: a dict (recorded JSON) or an object, camelCase (kaggle <= 1.6) or
    snake_case (kaggle >= 1.7, kagglesdk ``ApiSubmission``)."""
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value not in (None, ""):
            return value
    return None


def normalise_kaggle(sub: Any) -> dict[str, Any]:
    """Fields used from ``api.competition_submissions(slug)``: ref, fileName, date, description, status,
    publicScore, privateScore (snake_case twins accepted)."""
    status = _field(sub, "status")
    status = getattr(status, "name", status)  # kagglesdk: SubmissionStatus.COMPLETE
    date = _field(sub, "date")
    return {
        "ref": cell_text(_field(sub, "ref")),
        "file_name": cell_text(_field(sub, "fileName", "file_name")),
        "date": date.isoformat() if hasattr(date, "isoformat") else cell_text(date),
        "description": cell_text(_field(sub, "description")),
        "status": str(status or "").rsplit(".", 1)[-1].lower(),
        "public": cell_number(_field(sub, "publicScore", "public_score")),
        "private": cell_number(_field(sub, "privateScore", "private_score")),
    }


def match_kaggle(rows: Sequence[Mapping[str, str]], sub: Mapping[str, Any],
                 competition: str | None = None) -> int | None:
    """The ledger row a normalised Kaggle submission of ``competition`` belongs to (see the module docstring), or
    None. Rows whose ``kaggle_competition`` names another competition are left out."""
    candidates = [i for i, r in enumerate(rows)
                  if not competition or r.get("kaggle_competition", "") in ("", competition)]
    by_ref = [i for i in candidates if sub["ref"] and rows[i].get("kaggle_ref") == sub["ref"]]
    if len(by_ref) == 1:
        return by_ref[0]
    desc = sub["description"]
    best, best_len = None, 0
    for i in candidates:
        row = rows[i]
        keys = [row["file"], Path(row["file"]).stem]
        if len(row["content_hash"]) >= _HASH_PREFIX:
            keys.append(row["content_hash"][:_HASH_PREFIX])
        for key in keys:
            if key and key in desc and len(key) > best_len:  # the longest match: "ens-2" over "ens"
                best, best_len = i, len(key)
    if best is not None:
        return best
    same_name = [i for i in candidates if sub["file_name"] and rows[i]["file"] == sub["file_name"]]
    return same_name[0] if len(same_name) == 1 else None


def sync(competition: str, *, ledger_dir: Path = DEFAULT_DIR, api: Any = None,
         tracking_uri: str | None = None) -> dict[str, list]:
    """Fetch the user's Kaggle submissions and copy their scores into the ledger.

    Only scored (complete) submissions update rows; for a row matched by several, the newest wins. kaggle >= 1.7
    returns the most recent page of submissions (about 20), which is what a running competition needs.
    Returns ``{"updated": [(file, public, private)], "unmatched": [kaggle dicts], "pending": [kaggle dicts]}``.
    """
    api = api if api is not None else kaggle_api()
    try:
        raw = api.competition_submissions(competition)
    except Exception as exc:  # noqa: BLE001 - network / 403 / unknown competition, all reported the same way
        raise LeaderboardError(f"Kaggle: cannot list submissions of {competition!r}: {exc}") from None
    subs = [normalise_kaggle(s) for s in raw or []]
    report: dict[str, list] = {"updated": [], "unmatched": [], "pending": []}
    with ledger_lock(ledger_dir):
        rows = load_ledger(ledger_dir)
        chosen: dict[int, dict[str, Any]] = {}
        for sub in subs:
            if sub["status"] != "complete" or (sub["public"] is None and sub["private"] is None):
                report["pending"].append(sub)
                continue
            index = match_kaggle(rows, sub, competition)
            if index is None:
                report["unmatched"].append(sub)
            elif index not in chosen or _newer(sub["date"], chosen[index]["date"]):
                chosen[index] = sub
        for index, sub in sorted(chosen.items()):
            row = set_scores(rows, index, public=sub["public"], private=sub["private"], source="kaggle",
                             ref=sub["ref"])
            row["kaggle_competition"] = competition
            report["updated"].append((row["file"], sub["public"], sub["private"]))
        if chosen:
            save_ledger(rows, ledger_dir)
    for index in chosen:
        _log_lb(rows[index], ledger_dir, tracking_uri)
    return report


# --------------------------------------------------------------------------------------------- Kaggle submit


def kaggle_description(file: str, message: str | None) -> str:
    """The Kaggle submission description: the user's message, led by the ledger's file name unless it already
    names it, so that ``sync`` can link the submission by its description too (the ref is the first key)."""
    message = (message or "").strip()
    if not message:
        return file
    return message if file in message else f"{file}: {message}"


def _file_to_send(row: Mapping[str, str], ident: str, ledger_dir: Path) -> Path:
    """The bytes the ledger row describes: the file in the submissions folder, else the path given (a copy with
    the same content). Refused when they differ from the registered content hash."""
    candidates = [Path(ledger_dir) / row["file"], Path(ident)]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise LeaderboardError(f"submission file {candidates[0]} not found (the ledger row {row['file']!r} "
                               "has no file beside it)")
    if row["content_hash"] and content_hash(path) != row["content_hash"]:
        raise LeaderboardError(f"{path} changed since it was registered (its sha256 is not the ledger's "
                               f"{row['content_hash'][:12]}...): the row's CV would not describe what Kaggle "
                               "scores; write it again with the submission stage")
    return path


def submit(ident: str, *, competition: str, message: str | None = None, ledger_dir: Path = DEFAULT_DIR,
           api: Any = None) -> dict[str, str]:
    """Send a ledger row's file to a Kaggle competition (``api.competition_submit``) and record the submission's
    ref and the competition in its row. Returns the updated row; LeaderboardError when Kaggle refuses it."""
    rows = load_ledger(ledger_dir)
    found = _require_rows(rows, ident, ledger_dir)
    if len(found) > 1:
        names = ", ".join(rows[i]["file"] for i in found)
        raise LeaderboardError(f"{ident!r} names {len(found)} ledger rows ({names}): give the file name")
    row = rows[found[0]]
    path = _file_to_send(row, ident, ledger_dir)
    if row.get("kaggle_ref"):
        log.warning("%s was sent before (Kaggle submission %s, %s): sending it again", row["file"],
                    row["kaggle_ref"], row.get("kaggle_competition") or "competition not recorded")
    api = api if api is not None else kaggle_api()
    description = kaggle_description(row["file"], message)
    try:
        response = api.competition_submit(str(path), description, competition, quiet=True)
    except Exception as exc:  # noqa: BLE001 - HTTP 400/403/404 (limit reached, rules not accepted, unknown slug)
        raise LeaderboardError(f"Kaggle refused {row['file']} for {competition!r}: {exc}") from None
    answer = cell_text(_field(response, "message"))
    ref = _field(response, "ref")
    if answer == _UPLOAD_FAILED or response is None:
        raise LeaderboardError(f"Kaggle: uploading {path} to {competition!r} failed ({answer or 'no answer'}); "
                               "nothing was submitted")
    ref = cell_text(ref) if ref not in (None, 0, "0") else ""  # kaggle < 1.7 answers a message without the ref
    if not ref:
        log.warning("Kaggle did not return the submission's ref (kaggle < 1.7?): sync will link it by its "
                    "description %r", description)
    with ledger_lock(ledger_dir):  # read again: another stage may have written while the file uploaded
        rows = load_ledger(ledger_dir)
        index = next((i for i, r in enumerate(rows) if r["file"] == row["file"]), None)
        if index is None:
            raise LeaderboardError(f"{row['file']} was submitted (Kaggle ref {ref or '?'}) but its ledger row "
                                   f"is gone from {ledger_path(ledger_dir)}")
        updated = set_kaggle_submission(rows, index, ref=ref, competition=competition)
        save_ledger(rows, ledger_dir)
    return dict(updated) | {"kaggle_message": answer, "kaggle_description": description}


# --------------------------------------------------------------------------------------------- show / plot


def ledger_table(rows: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """submission, date, members, round (the highest pseudo-label round a member trained on; missing for rows
    registered before rounds were recorded), cv, cv_nested (the tuning scored out of fold, when it ran), public,
    private, gap (public - cv), metric, lb_source; newest first."""
    columns = ["submission", "date", "members", "round", "cv", "cv_nested", "public", "private", "metric",
               "lb_source"]
    df = pd.DataFrame({
        "submission": [r["file"] for r in rows],
        "date": [r["created"] for r in rows],
        "members": [r["members"].replace(";", ",") for r in rows],
        "round": pd.Series([r.get("pseudo_round") or None for r in rows], dtype="object"),
        "cv": [cell_number(r["cv"]) for r in rows],
        "cv_nested": [cell_number(r.get("cv_nested")) for r in rows],
        "public": [cell_number(r["public"]) for r in rows],
        "private": [cell_number(r["private"]) for r in rows],
        "metric": [r["metric"] for r in rows],
        "lb_source": [r["lb_source"] for r in rows],
    }, columns=columns)
    for col in ("cv", "cv_nested", "public", "private"):
        df[col] = df[col].astype("float64")
    df.insert(columns.index("private") + 1, "gap", df.public - df.cv)
    df["_when"] = _when(df.date)
    df = df.sort_values(["_when", "submission"], ascending=False, na_position="last", kind="stable")
    return df.drop(columns="_when").reset_index(drop=True)


def show(ledger_dir: Path = DEFAULT_DIR, *, as_csv: bool = False) -> str:
    rows = load_ledger(ledger_dir)
    if not rows:
        return f"no submissions in {ledger_path(ledger_dir)} yet"
    table = ledger_table(rows)
    if as_csv:
        return table.to_csv(index=False)
    return table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r, or None with fewer than 2 points or no spread."""
    if len(x) < 2:
        return None
    s = pd.Series(list(x), dtype="float64")
    t = pd.Series(list(y), dtype="float64")
    if s.std() == 0 or t.std() == 0:
        return None
    return float(s.corr(t))


def plot(ledger_dir: Path = DEFAULT_DIR, out: Path | None = None) -> tuple[Path, float | None, float | None]:
    """A PNG scatter of CV against public LB (y = x line, Pearson r, one label per point), and of the nested CV
    (``cv_nested``) of the rows that have one, hollow, with its own r: which of the two follows the LB. Returns
    (png, r, nested r)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    table = ledger_table(load_ledger(ledger_dir)).dropna(subset=["cv", "public"])
    if table.empty:
        raise LeaderboardError(
            f"nothing to plot: no submission in {ledger_path(ledger_dir)} has both a CV and a public LB score; "
            "add scores with `record FILE --public X` or `sync --competition SLUG`")
    r = pearson(table.cv, table.public)
    nested = table.dropna(subset=["cv_nested"])
    r_nested = pearson(nested.cv_nested, nested.public)
    fig = Figure(figsize=(6.5, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(table.cv, table.public, zorder=3, label="CV (tuned OOF)")
    if len(nested):
        ax.scatter(nested.cv_nested, nested.public, zorder=3, facecolors="none", edgecolors="C1",
                   label=f"nested CV (n = {len(nested)}, r = {'n/a' if r_nested is None else f'{r_nested:.3f}'})")
    for name, x, y in zip(table.submission, table.cv, table.public):
        ax.annotate(Path(name).stem, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lo = min(table.cv.min(), table.public.min(), nested.cv_nested.min() if len(nested) else np.inf)
    hi = max(table.cv.max(), table.public.max(), nested.cv_nested.max() if len(nested) else -np.inf)
    pad = max(hi - lo, 1e-3) * 0.1
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="grey", label="y = x (LB = CV)")
    metric = next((m for m in table.metric if m), "score")
    ax.set_xlabel(f"CV ({metric}, out-of-fold)")
    ax.set_ylabel("public LB")
    ax.set_title(f"CV vs public LB: n = {len(table)}, Pearson r = {r:.3f}" if r is not None
                 else f"CV vs public LB: n = {len(table)}, Pearson r needs 2+ distinct points")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(ledger_dir) / "cv_vs_lb.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(out, "wb") as f:
        f.write(buffer.getvalue())
    return out, r, r_nested


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="submissions folder (default: submissions)")
    common.add_argument("--tracking-uri", help="MLflow store for lb metrics (default: the one the row was logged to)")
    parser = argparse.ArgumentParser(prog="python -m pipeline.leaderboard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", parents=[common], help="print the ledger, newest first")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p = sub.add_parser("record", parents=[common], help="attach leaderboard scores to a submission")
    p.add_argument("submission", help="file name, path or content hash")
    p.add_argument("--public", type=float)
    p.add_argument("--private", type=float)
    p = sub.add_parser("submit", parents=[common], help="send a ledger file to a Kaggle competition (pip install "
                       "kaggle); sync fetches its scores later")
    p.add_argument("submission", help="file name, path or content hash of a ledger row")
    p.add_argument("--competition", required=True, help="competition slug, e.g. global-wheat-detection")
    p.add_argument("--message", "-m", default=None,
                   help="submission description (the file name is put in front unless it names it)")
    p = sub.add_parser("sync", parents=[common], help="copy scores from your Kaggle submissions (pip install kaggle)")
    p.add_argument("--competition", required=True, help="competition slug, e.g. global-wheat-detection")
    p = sub.add_parser("score", parents=[common], help="score a submission locally and record it as the LB")
    p.add_argument("submission")
    p.add_argument("--config", required=True, type=Path, help="YAML config (metric, classes, test split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--labels", type=Path, help="train.csv-style GWD labels (default: the config's test split)")
    p.add_argument("--as", dest="as_", choices=["public", "private"], default="public")
    p = sub.add_parser("plot", parents=[common], help="PNG of CV against public LB")
    p.add_argument("--out", type=Path, help="PNG path (default: <dir>/cv_vs_lb.png)")
    return parser


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _run(args: argparse.Namespace) -> int:
    if args.command == "show":
        print(show(args.dir, as_csv=args.csv), end="" if args.csv else "\n")
    elif args.command == "record":
        for row in record(args.submission, public=args.public, private=args.private, ledger_dir=args.dir,
                          tracking_uri=args.tracking_uri):
            cv, nested, public, private = (cell_number(row.get(c)) for c in ("cv", "cv_nested", "public", "private"))
            gap = f", gap {public - cv:+.4f}" if cv is not None and public is not None else ""
            nested_cv = f" (nested {nested:.4f})" if nested is not None else ""
            print(f"{row['file']}: CV {_fmt(cv)}{nested_cv}, public {_fmt(public)}, private {_fmt(private)}{gap}")
    elif args.command == "submit":
        row = submit(args.submission, competition=args.competition, message=args.message, ledger_dir=args.dir)
        print(f"submitted {row['file']} to {args.competition}: Kaggle ref {row['kaggle_ref'] or '? (not returned)'}"
              f"{'; ' + row['kaggle_message'] if row['kaggle_message'] else ''}")
        print(f"scores later: python -m pipeline.leaderboard sync --competition {args.competition}"
              f"{'' if args.dir == DEFAULT_DIR else f' --dir {args.dir}'}")
    elif args.command == "sync":
        report = sync(args.competition, ledger_dir=args.dir, tracking_uri=args.tracking_uri)
        for file, public, private in report["updated"]:
            print(f"updated {file}: public {_fmt(public)}, private {_fmt(private)}")
        for s in report["unmatched"]:
            print(f"not in the ledger: Kaggle {s['ref'] or '?'} {s['file_name']!r} ({s['description']!r}) "
                  f"public {_fmt(s['public'])}; put the ledger file name in the submission message to link it")
        if report["pending"]:
            print(f"{len(report['pending'])} submission(s) not scored yet (pending or failed)")
        if not report["updated"]:
            print("no ledger row updated")
    elif args.command == "score":
        value = score(args.submission, config=args.config, overrides=args.overrides, labels=args.labels,
                      as_=args.as_, ledger_dir=args.dir, tracking_uri=args.tracking_uri)
        print(f"{Path(args.submission).name}: local {args.as_} score {value:.4f}")
    elif args.command == "plot":
        out, r, r_nested = plot(args.dir, args.out)
        nested = "" if r_nested is None else f"; nested CV r = {r_nested:.3f}"
        print(f"wrote {out} (Pearson r = {'n/a' if r is None else f'{r:.3f}'}{nested})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.data import DataError

    try:
        return _run(args)
    except (LeaderboardError, LedgerError, ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
