"""MLflow experiment log that never loses data and never stops training.

Every stage logs one MLflow run (tag ``pipeline.stage``) into the experiment ``cfg.experiment``:

    with stage_run(cfg, "train", name="fold0", parent=model_key(cfg)) as tracker:
        tracker.log_params(cfg.model_dump(mode="json"))      # nested dicts become "train.lr" style params
        tracker.log_epoch({"epoch": 1, "train_loss": 0.8, "val_score": 0.41, "lr": 1e-3})
        tracker.log_artifact(fold_dir / "metrics.jsonl")

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<working directory>/mlflow.db``
(``make ui`` opens it). Runs with the same ``parent`` key (one model: ``"<experiment>/<run>"``) are the children of
one parent run, found by its tag ``pipeline.model_key`` rather than held in memory, so folds trained as separate
processes (even at the same time) still land under one parent. Parent creation is serialised by a lock file in the
run folder; processes that share no folder (other machines) can, in a rare race, create a second parent run with
the same key: harmless, every child also carries ``pipeline.model_key``, so filter on that tag to group for sure.

Failure mode: a store that cannot be reached or errors (bad URI, locked database, server down) never raises into
the stage. The run goes on, one warning is logged per process, and everything that would have been logged is
appended as JSON lines to ``<run folder>/tracking_fallback.jsonl``; ``python -m pipeline.tracking replay FILE``
sends it to the store later. ``tracking.enabled: false`` turns all of this into no-ops.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from pipeline.config import ExperimentConfig, TrackingConfig
from pipeline.layout import run_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

FALLBACK_NAME = "tracking_fallback.jsonl"
LOCK_NAME = ".tracking.lock"
# MLflow's own limits (mlflow.utils.validation): longer values are rejected, so they are cut here
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PER_BATCH = 100  # params or tags per log_batch call
# "database is locked" on SQLite: a few retries with backoff, then the fallback file
RETRIES = 3
BACKOFF_S = 0.25
RETRY_DEADLINE_S = 15.0
PROBE_TIMEOUT_S = 2.0

# Errors of one logging call (a param logged twice with another value, ...): that call goes to the fallback file,
# the store stays in use. Any other error means the store is unusable for the rest of the run.
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}

_warned = False  # one warning per process, however many runs fall back
_dead_uris: dict[str, str] = {}  # uri -> why; later runs in this process skip a store that already failed
_experiment_ids: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------------- plain helpers


def resolve_uri(tracking: TrackingConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if tracking is not None and tracking.uri:
        return tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"


def model_key(cfg: ExperimentConfig) -> str:
    """The key that groups one model's runs (folds, predictions) under one parent run."""
    return f"{cfg.experiment}/{cfg.run}"


@functools.lru_cache(maxsize=8)
def git_state(cwd: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout at ``cwd``; (None, None) outside a checkout or without git.

    Dirty means tracked files differ from the commit: the logged commit alone would not reproduce the run.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set, dict)):
        text = json.dumps(list(value) if isinstance(value, set) else value, default=str)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``; lists become JSON, values are cut to 6000 chars."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
        else:
            out[name[:MAX_KEY_LENGTH]] = _param_value(value)
    return out


def _key(name: str) -> str:
    """A valid MLflow metric/tag key: letters, digits and ``_-. /`` only."""
    clean = "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(name))
    return clean[:MAX_KEY_LENGTH] or "_"


def _tag(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text[:MAX_TAG_LENGTH]


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only (None, text, NaN and inf are left out), so a metrics row with extra fields logs fine."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[_key(name)] = number
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- store checks


def _sqlite_problem(uri: str) -> str | None:
    """Why a ``sqlite:///`` store cannot be opened, or None. Checked up front: MLflow retries a failing engine
    for ~100 s before giving up, which would stall the stage."""
    path = sqlite_file(uri)
    if path is None:
        return None
    if path.exists():
        if path.is_dir():
            return f"{path} is a folder, not a database file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not readable and writable"
        folder = path.parent
    else:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.is_dir():
        return f"cannot create the folder of {path} ({folder} is not a folder)"
    if not os.access(folder, os.W_OK | os.X_OK):  # SQLite writes its journal next to the database
        return f"{folder} is not writable"
    return None


def _http_problem(uri: str) -> str | None:
    """Why an ``http(s)://`` tracking server is unreachable (a 2 s connect), or None.

    Also caps MLflow's own HTTP retries (default: ~4 minutes of backoff) unless the user set them.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to {parsed.hostname}:{port} ({exc})"


def store_problem(uri: str) -> str | None:
    """A quick check of the store at ``uri`` before MLflow touches it; None when it looks usable."""
    if uri in _dead_uris:
        return _dead_uris[uri]
    try:
        if uri.startswith("sqlite:"):
            return _sqlite_problem(uri)
        if uri.startswith(("http://", "https://")):
            return _http_problem(uri)
    except (ValueError, OSError) as exc:  # "http://host:abc", a path the OS rejects, ...
        return f"unusable tracking URI ({exc})"
    return None


def _is_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return ("locked" in text or "busy" in text
            or getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE")


def _with_retries(fn: Callable[[], T]) -> T:
    """``fn()``, retried with backoff on SQLite's 'database is locked' (two processes writing at once).

    MLflow already waits up to 20 s on a locked SQLite file per call; no retry starts after RETRY_DEADLINE_S, so
    a store locked for good costs a stage well under a minute before the fallback file takes over.
    """
    deadline = time.monotonic() + RETRY_DEADLINE_S
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == RETRIES or not _is_transient(exc) or time.monotonic() > deadline:
                raise
            time.sleep(BACKOFF_S * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s", message)
    else:
        log.debug("%s", message)


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock on the file ``path`` between processes (POSIX flock); no lock where that is impossible
    (Windows, a read-only folder, ``path`` None): callers must stay correct, if less tidy, without it."""
    handle = None
    try:
        import fcntl  # POSIX only

        path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        handle = open(path, "a")  # type: ignore[arg-type]
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError, AttributeError, TypeError):
        if handle is not None:
            handle.close()
        handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the flock


# --------------------------------------------------------------------------------------------- the tracker


class Tracker:
    """One MLflow run, or its stand-in: every call goes to MLflow, or to the fallback file when MLflow fails.

    No method raises. ``run_id`` is None when the run could not be created in the store.
    """

    def __init__(self, uri: str, experiment: str, stage: str, name: str, *, parent: str | None = None,
                 fallback_dir: str | Path | None = None, enabled: bool = True) -> None:
        self.uri, self.experiment, self.stage, self.name, self.parent = uri, experiment, stage, name, parent
        self.fallback_path = Path(fallback_dir) / FALLBACK_NAME if fallback_dir is not None else None
        self.enabled = enabled
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.uid = uuid.uuid4().hex  # ties the fallback lines of one run together
        self._client: Any = None
        self._fallback_failed = False
        self._status = "RUNNING"

    # ----------------------------------------------------------------- lifecycle

    @property
    def active(self) -> bool:
        """True while calls reach MLflow (False: disabled, or falling back to the file)."""
        return self.enabled and self._client is not None and self.run_id is not None

    def start(self, tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> "Tracker":
        """Create the run (or attach to the existing ``run_id``); on failure switch to the fallback file."""
        if not self.enabled:
            return self
        all_tags = self._standard_tags() | {_key(k): _tag(v) for k, v in (tags or {}).items() if v is not None}
        problem = store_problem(self.uri)
        if problem is None:
            try:
                self._client = self._make_client()
                if run_id is not None:
                    if not self._run_exists(run_id):  # a stale id (store replaced): this run only, not the store
                        log.warning("tracking: run %s is not in %s; its data goes to %s", run_id,
                                    safe_uri(self.uri), self.fallback_path)
                        self._client, self.run_id = None, run_id
                        self._fallback("start", {"tags": all_tags})
                        return self
                    self.run_id = run_id
                    self._call(lambda: self._set_tags_now(all_tags), "tags", all_tags)
                    return self
                experiment_id = self._experiment_id()
                if self.parent:
                    self.parent_run_id = self._find_or_create_parent(experiment_id)
                    all_tags["mlflow.parentRunId"] = self.parent_run_id
                run = _with_retries(lambda: self._client.create_run(experiment_id, run_name=self.name, tags=all_tags))
                self.run_id = run.info.run_id
                return self
            except Exception as exc:  # noqa: BLE001 - any store failure: fall back, never raise
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._store_failed(problem)
        self.run_id = run_id
        self._fallback("start", {"tags": all_tags})
        return self

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); a parent run is marked ended with its last child."""
        if not self.enabled or self._status != "RUNNING":
            return
        self._status = status
        if self.active:
            run_id = self.run_id
            ok = self._call(lambda: self._client.set_terminated(run_id, status), "end", {"status": status})
            if ok and self.parent_run_id:
                self._call(lambda: self._client.set_terminated(self.parent_run_id, "FINISHED"), "end_parent", {})
        else:
            self._fallback("end", {"status": status})

    # ----------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested dicts are flattened to ``a.b`` keys, values cut to MLflow's 6000 characters."""
        flat = flatten_params(params)
        if not self.enabled or not flat:
            return
        items = list(flat.items())
        for i in range(0, len(items), MAX_PER_BATCH):
            chunk = dict(items[i : i + MAX_PER_BATCH])
            self._call(lambda c=chunk: self._log_batch(params=c), "params", chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; None, text and non-finite values are skipped."""
        values = _finite_metrics(metrics)
        if not self.enabled or not values:
            return
        stamp = _now_ms()
        self._call(lambda: self._log_batch(metrics=values, step=int(step or 0), stamp=stamp), "metrics", values,
                   step=step)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One row of a fold's ``metrics.jsonl`` (``{"epoch": 3, "train_loss": ..., "val_score": ...}``)."""
        step = record.get("epoch")
        self.log_metrics({k: v for k, v in record.items() if k != "epoch"},
                         step=int(step) if isinstance(step, (int, float)) else None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        clean = {_key(k): _tag(v) for k, v in tags.items() if v is not None}
        if self.enabled and clean:
            self._call(lambda: self._set_tags_now(clean), "tags", clean)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Copy a file (or a folder's files) into the run's artifacts; the fallback file records the path.
        True when MLflow has it."""
        path = Path(path)
        if not self.enabled:
            return False
        if not path.exists():
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return False
        data = {"path": str(path.resolve()), "artifact_path": artifact_path}

        def upload() -> None:
            send = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
            send(self.run_id, str(path), artifact_path)

        return self._call(upload, "artifact", data, store_level=False)

    def log_dict(self, data: Any, name: str) -> None:
        """Write ``data`` as a JSON (``.json``) or CSV (a DataFrame, ``.csv``) artifact called ``name``."""
        if not self.enabled:
            return
        if not self.active:  # keep the content itself: there is no artifact store to hold it
            self._fallback("artifact", {"name": name, "content": _jsonable(data)})
            return
        try:
            with tempfile.TemporaryDirectory(prefix="pipeline-artifact-") as tmp:
                target = Path(tmp) / name
                if hasattr(data, "to_csv"):
                    data.to_csv(target, index=False)
                else:
                    target.write_text(json.dumps(_jsonable(data), indent=2, default=str), encoding="utf-8")
                if self.log_artifact(target):
                    return
        except Exception as exc:  # noqa: BLE001 - a local write failed
            log.warning("tracking: could not write artifact %s (%s)", name, exc)
        self._fallback("artifact", {"name": name, "content": _jsonable(data)})  # the temp file is gone: keep content

    # ----------------------------------------------------------------- internals

    def _standard_tags(self) -> dict[str, str]:
        commit, dirty = git_state()
        tags = {"pipeline.stage": self.stage, "pipeline.experiment": self.experiment}
        if commit is not None:
            tags |= {"pipeline.git_commit": commit, "pipeline.git_dirty": _tag(dirty),
                     "mlflow.source.git.commit": commit}
        if self.parent:
            tags["pipeline.model_key"] = self.parent
        return tags

    def _make_client(self) -> Any:
        return make_client(self.uri)

    def _run_exists(self, run_id: str) -> bool:
        try:
            _with_retries(lambda: self._client.get_run(run_id))
        except Exception as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _experiment_id(self) -> str:
        cache_key = (self.uri, self.experiment)
        if cache_key in _experiment_ids:
            return _experiment_ids[cache_key]
        experiment = _with_retries(lambda: self._client.get_experiment_by_name(self.experiment))
        if experiment is None:
            try:
                experiment_id = _with_retries(lambda: self._client.create_experiment(
                    self.experiment, artifact_location=_artifact_location(self.uri)))
            except Exception as exc:  # another process created it first
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self._client.get_experiment_by_name(self.experiment).experiment_id
        elif experiment.lifecycle_stage == "deleted":
            _with_retries(lambda: self._client.restore_experiment(experiment.experiment_id))
            experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        _experiment_ids[cache_key] = experiment_id
        return experiment_id

    def _parents(self, experiment_id: str) -> list[Any]:
        key = self.parent.replace("'", "_")  # type: ignore[union-attr]
        query = f"tags.`pipeline.model_key` = '{key}' and tags.`pipeline.role` = 'parent'"
        runs = _with_retries(lambda: self._client.search_runs(
            [experiment_id], query, max_results=50, order_by=["attributes.start_time ASC"]))
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _find_or_create_parent(self, experiment_id: str) -> str:
        """The parent run of ``self.parent``: found by tag, else created, under a lock in the run folder."""
        with file_lock(self.fallback_path.with_name(LOCK_NAME) if self.fallback_path else None):
            found = self._parents(experiment_id)
            if found:
                return found[0].info.run_id
            tags = self._standard_tags() | {"pipeline.role": "parent", "pipeline.stage": "model"}
            name = self.parent.rsplit("/", 1)[-1]  # type: ignore[union-attr]
            mine = _with_retries(lambda: self._client.create_run(experiment_id, run_name=name, tags=tags))
            # a process on another machine may have raced us: the oldest parent wins, ours is deleted if it lost
            found = self._parents(experiment_id)
            if found and found[0].info.run_id != mine.info.run_id:
                with contextlib.suppress(Exception):
                    self._client.delete_run(mine.info.run_id)
                return found[0].info.run_id
            return mine.info.run_id

    def _log_batch(self, *, params: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
                   step: int = 0, stamp: int = 0) -> None:
        from mlflow.entities import Metric, Param  # here, not at the top: only reached while MLflow works

        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in (params or {}).items()],
                               metrics=[Metric(k, v, stamp, step) for k, v in (metrics or {}).items()])

    def _set_tags_now(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + MAX_PER_BATCH])

    def _call(self, fn: Callable[[], Any], op: str, data: Any, *, step: int | None = None,
              store_level: bool = True) -> bool:
        """Run one MLflow call; on failure write ``data`` to the fallback file. True when MLflow took it."""
        if self.active:
            try:
                _with_retries(fn)
                return True
            except Exception as exc:  # noqa: BLE001 - never raise into the stage
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if store_level and getattr(exc, "error_code", None) not in _REJECTED:
                    self._store_failed(reason)
                else:
                    log.warning("tracking: MLflow rejected %s for run %s (%s); kept in %s", op, self.name, reason,
                                self.fallback_path)
        self._fallback(op, data, step=step)
        return False

    def _store_failed(self, reason: str) -> None:
        _dead_uris.setdefault(self.uri, reason)
        self._client = None
        where = self.fallback_path or "nowhere (no fallback folder given)"
        _warn_once(f"MLflow tracking store {safe_uri(self.uri)} is unusable ({reason}); training goes on and "
                   f"tracking data goes to {where} (replay it with: python -m pipeline.tracking replay FILE)")

    def _fallback(self, op: str, data: Any, *, step: int | None = None) -> None:
        if self.fallback_path is None or self._fallback_failed:
            return
        record = {"time": _now_iso(), "uid": self.uid, "uri": safe_uri(self.uri), "experiment": self.experiment,
                  "stage": self.stage, "name": self.name, "parent": self.parent, "run_id": self.run_id,
                  "op": op, "data": _jsonable(data)}
        if step is not None:
            record["step"] = step
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps(record, default=str) + "\n"
            with open(self.fallback_path, "a", encoding="utf-8") as f:
                f.write(line)  # one write per line: concurrent writers append whole lines
        except OSError as exc:
            self._fallback_failed = True
            log.warning("tracking: cannot write the fallback file %s (%s); tracking data of %s is lost",
                        self.fallback_path, exc, self.name)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store and for an in-memory one."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or not path or path == ":memory:":
        return None
    return Path(path)


def make_client(uri: str) -> Any:
    """An ``MlflowClient`` whose store is open. A SQLite store is first opened under a lock file
    (``<db>-lock``): MLflow creates a fresh database's tables on first use, and two processes doing that at
    once (folds started together) break each other's migrations."""
    from mlflow import MlflowClient

    db = sqlite_file(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    with file_lock(db.with_name(db.name + "-lock")):
        client = MlflowClient(tracking_uri=uri)
        _with_retries(lambda: client.search_experiments(max_results=1))  # opens (and migrates) the store
    return client


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts next to the database (``<db folder>/mlruns``) whatever the working directory."""
    db = sqlite_file(uri)
    return (db.resolve().parent / "mlruns").as_uri() if db is not None else None


def safe_uri(uri: str) -> str:
    """The URI without a password (it ends up in log lines and files)."""
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri


def _jsonable(data: Any) -> Any:
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a DataFrame
        return data.to_dict(orient="records")
    if isinstance(data, Mapping):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [_jsonable(v) for v in data]
    if isinstance(data, Path):
        return str(data)
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if data is None or isinstance(data, (str, int, float, bool)):
        return data
    if hasattr(data, "item"):  # numpy scalar
        return data.item()
    return str(data)


# --------------------------------------------------------------------------------------------- entry points


def open_run(tracking: TrackingConfig | None, experiment: str, stage: str, name: str | None = None, *,
             parent: str | None = None, tags: Mapping[str, Any] | None = None,
             fallback_dir: str | Path | None = None, run_id: str | None = None) -> Tracker:
    """Start a run (or attach to ``run_id``) and return its Tracker; call ``tracker.close()`` at the end."""
    tracking = tracking or TrackingConfig()
    tracker = Tracker(resolve_uri(tracking), experiment, stage, name or stage, parent=parent,
                      fallback_dir=fallback_dir, enabled=tracking.enabled)
    return tracker.start(tags, run_id=run_id)


@contextlib.contextmanager
def stage_run(cfg: ExperimentConfig, stage: str, name: str | None = None, *, parent: str | None = None,
              tags: Mapping[str, Any] | None = None, fallback_dir: str | Path | None = None) -> Iterator[Tracker]:
    """A run of ``stage`` in ``cfg.experiment``, ended FINISHED (FAILED / KILLED if the body raises; the body's
    exception always propagates). ``parent``: a model key (``model_key(cfg)``) to nest the run under that model's
    parent run. Fallback file: ``<fallback_dir or the run directory>/tracking_fallback.jsonl``."""
    tracker = open_run(cfg.tracking, cfg.experiment, stage, name, parent=parent, tags=tags,
                       fallback_dir=fallback_dir if fallback_dir is not None else run_dir(cfg))
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.close(status)


# --------------------------------------------------------------------------------------------- per-stage helpers


def log_submission(meta: Mapping[str, Any], tracking: TrackingConfig | None = None, *, experiment: str,
                   fallback_dir: str | Path) -> str | None:
    """A submission run (tag ``pipeline.stage=submission``, ``pipeline.submission_hash``): file, hash, CV, metric,
    members, their pseudo-label round. Registering the same content again reuses its run. Called by
    :func:`pipeline.ledger.register_submission`; returns the run id."""
    content_hash = str(meta.get("content_hash") or "")
    run_id = find_submission_run(tracking, content_hash) if content_hash else None
    tags = {"pipeline.submission_hash": content_hash, "pipeline.submission_file": meta.get("file"),
            "pipeline.members": ",".join(str(m) for m in meta.get("members") or []),
            "pipeline.source_run_id": meta.get("mlflow_run_id")}
    tracker = open_run(tracking, experiment, "submission", Path(str(meta.get("file", "submission"))).name,
                       tags=tags, fallback_dir=fallback_dir, run_id=run_id)
    if run_id is None:  # a new run: log its content once (params cannot change)
        tracker.log_params({k: meta.get(k) for k in ("file", "created", "ensemble", "members", "metric", "format",
                                                     "content_hash", "config", "pseudo_round", "pseudo_members")
                            if k in meta})
        tracker.log_metrics({"cv": meta.get("cv"), "cv_nested": meta.get("cv_nested")})  # None: not logged
        tracker.close()
    return tracker.run_id


def find_submission_run(tracking: TrackingConfig | None, content_hash: str) -> str | None:
    """The id of the submission run tagged with ``content_hash`` in any experiment, or None (also on errors)."""
    tracking = tracking or TrackingConfig()
    uri = resolve_uri(tracking)
    if not tracking.enabled or not content_hash or store_problem(uri) is not None:
        return None
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        return None  # no store yet: do not create an empty one just to look
    try:
        client = make_client(uri)
        ids = [e.experiment_id for e in _with_retries(client.search_experiments)]
        query = f"tags.`pipeline.submission_hash` = '{content_hash.replace(chr(39), '_')}'"
        runs = _with_retries(lambda: client.search_runs(ids, query, max_results=1,
                                                        order_by=["attributes.start_time ASC"])) if ids else []
    except Exception as exc:  # noqa: BLE001
        log.debug("tracking: submission run lookup failed: %s", exc)
        return None
    return runs[0].info.run_id if runs else None


def log_lb_scores(tracking: TrackingConfig | None, run_id: str | None, scores: Mapping[str, float | None], *,
                  experiment: str = "submissions", fallback_dir: str | Path | None = None,
                  tags: Mapping[str, Any] | None = None) -> bool:
    """Attach leaderboard scores (``lb_public``, ``lb_private``) to an existing submission run. True if logged."""
    if not run_id:
        return False
    tracker = open_run(tracking, experiment, "submission", run_id, fallback_dir=fallback_dir, run_id=run_id)
    tracker.log_metrics(scores)
    if tags:
        tracker.set_tags(tags)
    return tracker.active


# --------------------------------------------------------------------------------------------- replay


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a killed process
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def replay_fallback(path: str | Path, uri: str | None = None) -> int:
    """Send the runs of a fallback file to the store (``uri``, else the one each line names, else the default).

    Returns the number of runs sent. Lines of runs that still fail stay in a new fallback file next to ``path``;
    the replayed file is renamed ``*.replayed`` so a second replay does not duplicate runs.
    """
    path = Path(path)
    runs: dict[str, list[dict]] = {}
    for row in _read_jsonl(path):
        runs.setdefault(str(row.get("uid")), []).append(row)
    done_path = path.with_name(path.name + ".replayed")
    os.replace(path, done_path)  # new failures below append to a fresh file at ``path``
    sent = 0
    for rows in runs.values():
        first = rows[0]
        target = uri or (first.get("uri") if "***" not in str(first.get("uri")) else None) or resolve_uri()
        start_tags = next((r["data"].get("tags", {}) for r in rows if r["op"] == "start"), {})
        tracker = Tracker(target, first["experiment"], first["stage"], first["name"], parent=first.get("parent"),
                          fallback_dir=path.parent)
        tracker.uid = str(first.get("uid"))
        tracker.start(start_tags, run_id=first.get("run_id"))
        status = "FINISHED"
        for row in rows:
            op, data = row["op"], row.get("data") or {}
            if op == "params":
                tracker.log_params(data)
            elif op == "metrics":
                tracker.log_metrics(data, step=row.get("step"))
            elif op == "tags":
                tracker.set_tags(data)
            elif op == "artifact" and "path" in data:
                tracker.log_artifact(data["path"], data.get("artifact_path"))
            elif op == "artifact" and "content" in data:
                tracker.log_dict(data["content"], data.get("name", "artifact.json"))
            elif op == "end":
                status = data.get("status", "FINISHED")
        sent += tracker.active
        tracker.close(status)
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="send a tracking_fallback.jsonl to the MLflow store")
    replay.add_argument("file", type=Path)
    replay.add_argument("--uri", help="tracking URI (default: the one in the file, else $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.file.is_file():
        print(f"error: {args.file} not found", file=sys.stderr)
        return 1
    runs = len({str(row.get("uid")) for row in _read_jsonl(args.file)})
    sent = replay_fallback(args.file, args.uri)
    print(f"replayed {sent} of {runs} run(s) from {args.file}")
    if sent < runs:  # the store is still unreachable: not a success, though nothing is lost
        print(f"error: {runs - sent} run(s) could not be sent and are back in {args.file}: is the store up? (--uri "
              "names another)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
