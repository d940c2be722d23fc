"""The on-disk formats: a run folder's status and metrics, a sweep folder's plan and jobs, atomic writes.

A run folder (sampling or training) holds ``status.json``, whose ``status`` is one of ``RunStatus``;
``metrics.json`` exists only beside ``finished``. A sweep folder holds ``sweep.json`` (the planned jobs) and one
folder per job, each with Hydra's record in ``.hydra/``. This module imports nothing of diffexp but errors.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
SWEEP_FILE = "sweep.json"  # the planned jobs, written when a sweep starts
DASHBOARD_FILE = "dashboard.json"  # a sweep's W&B workspace and report specification (scripts/dashboard.py)


class RunStatus(str, Enum):
    """The lifecycle of a run folder: ``running``, then exactly one of the others."""

    running = "running"
    finished = "finished"
    failed = "failed"
    interrupted = "interrupted"  # Ctrl-C

    @classmethod
    def of_error(cls, error: BaseException) -> RunStatus:
        return cls.interrupted if isinstance(error, KeyboardInterrupt) else cls.failed


NOT_RUN = "not run"  # a planned sweep job without a status (not a RunStatus: nothing was written)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Write to the yielded temporary path; it becomes ``path`` only once complete (a reader, a crash or a full
    disk never leaves half a file under the final name). The name is unique per process and thread."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")  # keeps the suffix
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a reader never sees half a file."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def read_status_record(run_dir: Path) -> dict[str, Any] | None:
    """The whole ``status.json`` of a run folder; None for a folder that is not a run."""
    return read_json(Path(run_dir) / STATUS_FILE)


def read_status(run_dir: Path) -> str | None:
    """A ``RunStatus`` value; None for a folder that is not a run."""
    record = read_status_record(run_dir)
    return None if record is None else str(record["status"])


def write_status(run_dir: Path, status: RunStatus, **fields: Any) -> dict[str, Any]:
    record = {"status": RunStatus(status).value, **fields}
    write_json(Path(run_dir) / STATUS_FILE, record)
    return record


def end_status(run_dir: Path, record: dict[str, Any], error: BaseException | None, **fields: Any) -> dict[str, Any]:
    """Close a status record: ``finished``, or ``failed`` / ``interrupted`` with the error."""
    if error is None:
        record |= {"status": RunStatus.finished.value, "finished": now(), **fields}
    else:
        kind = RunStatus.of_error(error).value
        record |= {"status": kind, "error": str(error) or type(error).__name__, "error_type": type(error).__name__}
        if getattr(error, "reason", None):  # e.g. "oom"
            record["reason"] = error.reason
        record |= fields
    write_json(Path(run_dir) / STATUS_FILE, record)
    return record


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Record a run that failed before it started sampling."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    end_status(run_dir, {}, error)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics, else None."""
    if read_status(run_dir) != RunStatus.finished:
        return None
    return read_json(Path(run_dir) / METRICS_FILE)


def write_plan(sweep_dir: Path, jobs: list[list[str]] | None) -> None:
    """``sweep.json``: the overrides of every planned job (None when the sweeper decides as it goes)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    plan = {"total": None if jobs is None else len(jobs), "jobs": jobs, "started": now()}
    write_json(Path(sweep_dir) / SWEEP_FILE, plan)


def read_plan(sweep_dir: Path) -> dict[str, Any]:
    return read_json(Path(sweep_dir) / SWEEP_FILE) or {"total": None, "jobs": None}


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: those Hydra wrote its record into."""
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/hydra.yaml"))
