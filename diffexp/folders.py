"""The on-disk formats: a run folder's status and metrics, a sweep folder's plan and jobs, atomic writes.

A run folder (sampling or training) holds ``status.json``, whose ``status`` is one of ``RunStatus``, with the
process that writes it (pid, host) and a heartbeat; ``metrics.json`` exists only beside ``finished``. A sweep
folder holds ``sweep.json`` (the planned jobs and, once each starts, its folder) and one folder per job, each with
Hydra's record in ``.hydra/``. This module imports nothing of diffexp but errors.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from diffexp.errors import DiffexpError

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
SWEEP_FILE = "sweep.json"  # the planned jobs, written when a sweep starts
DASHBOARD_FILE = "dashboard.json"  # a sweep's W&B workspace and report specification (scripts/dashboard.py)


class RunStatus(str, Enum):
    """The lifecycle of a run folder: a writer writes ``running``, then exactly one of finished, failed or
    interrupted. Readers (``read_status``) also see ``died`` and ``corrupt``, which nobody writes."""

    running = "running"
    finished = "finished"
    failed = "failed"
    interrupted = "interrupted"  # Ctrl-C, SIGTERM, SIGUSR2
    died = "died"  # read only: ``running``, but its process is gone (killed, e.g. out of memory)
    corrupt = "corrupt"  # read only: status.json (or a finished run's metrics.json) cannot be read

    @classmethod
    def of_error(cls, error: BaseException) -> RunStatus:
        return cls.interrupted if isinstance(error, KeyboardInterrupt) else cls.failed


WRITTEN = (RunStatus.running, RunStatus.finished, RunStatus.failed, RunStatus.interrupted)
NOT_RUN = "not run"  # a planned sweep job without a status (not a RunStatus: nothing was written)
# a running folder of another host is taken for dead once its heartbeat is this old (snapshots and training
# checkpoints beat it; a longer silence than this means the process is gone)
STALE_AFTER_S = 3600.0


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
    """A JSON object, None for a missing file; ``CorruptFile`` for one that is not a JSON object."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise CorruptFile(path, str(err)) from None
    if not isinstance(data, dict):
        raise CorruptFile(path, f"a JSON {type(data).__name__}, not an object")
    return data


class CorruptFile(ValueError):
    """A run file that cannot be read (cut short, overwritten, edited by hand)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path} cannot be read ({why})")


def read_status_record(run_dir: Path) -> dict[str, Any] | None:
    """The whole ``status.json`` of a run folder, with ``status`` as a reader sees it (``died``, ``corrupt``);
    None for a folder that is not a run."""
    try:
        record = read_json(Path(run_dir) / STATUS_FILE)
    except CorruptFile as err:
        return {"status": RunStatus.corrupt.value, "error": str(err)}
    if record is None:
        return None
    status = record.get("status")
    if status not in {s.value for s in WRITTEN}:
        return record | {"status": RunStatus.corrupt.value, "error": f"status.json has no valid status ({status!r})"}
    if status == RunStatus.running and not alive(record):
        return record | {"status": RunStatus.died.value, "error": died_reason(record)}
    if status == RunStatus.finished:
        try:
            read_json(Path(run_dir) / METRICS_FILE)
        except CorruptFile as err:
            return record | {"status": RunStatus.corrupt.value, "error": str(err)}
    return record


def read_status(run_dir: Path) -> str | None:
    """A ``RunStatus`` value as a reader sees it; None for a folder that is not a run."""
    record = read_status_record(run_dir)
    return None if record is None else str(record["status"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def alive(record: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the process that wrote a ``running`` record may still run: on this host its pid is alive; on
    another host its heartbeat is recent. A record without pid or host (older diffexp) is given the benefit."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or not host:
        return True
    if host == socket.gethostname():
        return pid_alive(pid)
    beat = record.get("heartbeat")
    return not isinstance(beat, (int, float)) or time.time() - beat < stale_after_s


def died_reason(record: dict[str, Any]) -> str:
    where = f"pid {record.get('pid')} on {record.get('host')}"
    return (
        f"the process ({where}) ended without recording an end, e.g. killed by the kernel for lack of memory "
        f"or by a job scheduler; last heartbeat {record.get('heartbeat_at', '?')}"
    )


def _process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(), "heartbeat_at": now()}


def write_status(run_dir: Path, status: RunStatus, **fields: Any) -> dict[str, Any]:
    """The one writer of ``status.json``: the status, this process (pid, host), a heartbeat and ``fields``.
    A folder that died before keeps count: ``deaths`` lists the earlier processes that vanished in it."""
    previous = read_status_record(run_dir) or {}
    deaths = list(previous.get("deaths") or [])
    if previous.get("status") == RunStatus.died:
        deaths.append({k: previous.get(k) for k in ("pid", "host", "started", "heartbeat_at")})
    record = {"status": RunStatus(status).value, **_process(), **fields} | ({"deaths": deaths} if deaths else {})
    write_json(Path(run_dir) / STATUS_FILE, record)
    return record


def heartbeat(run_dir: Path, record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Say that the run in ``run_dir`` is alive (and update ``fields``, e.g. a training ``step``): rewrites
    ``record``, which stays ``running``."""
    record |= {**_process(), **fields}
    write_json(Path(run_dir) / STATUS_FILE, record)
    return record


def deaths(run_dir: Path) -> int:
    """How many processes died in this run folder (the current one included, if it reads ``died``)."""
    record = read_status_record(run_dir) or {}
    return len(record.get("deaths") or []) + (record.get("status") == RunStatus.died)


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
    earlier = (read_status_record(run_dir) or {}).get("deaths")
    end_status(run_dir, {"deaths": earlier} if earlier else {}, error)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics, else None (also for a corrupt file)."""
    if read_status(run_dir) != RunStatus.finished:
        return None
    return read_json(Path(run_dir) / METRICS_FILE)


def write_plan(sweep_dir: Path, jobs: list[list[str]] | None) -> None:
    """``sweep.json``: the overrides of every planned job (None when the sweeper decides as it goes); the folders
    recorded by an earlier start of the same sweep are kept."""
    from filelock import FileLock

    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(sweep_dir) / (SWEEP_FILE + ".lock"))):
        folders = _read_plan_file(sweep_dir).get("folders") or {}
        plan = {"total": None if jobs is None else len(jobs), "jobs": jobs, "folders": folders, "started": now()}
        write_json(Path(sweep_dir) / SWEEP_FILE, plan)


def record_job_folder(sweep_dir: Path, num: int, folder: Path) -> None:
    """Note in ``sweep.json`` where job ``num`` writes (its path relative to the sweep folder), as it starts;
    parallel jobs take turns through a lock file."""
    from filelock import FileLock

    sweep_dir = Path(sweep_dir)
    with FileLock(str(sweep_dir / (SWEEP_FILE + ".lock"))):
        plan = _read_plan_file(sweep_dir) or {"total": None, "jobs": None, "started": now()}
        plan["folders"] = (plan.get("folders") or {}) | {str(num): os.path.relpath(folder, sweep_dir)}
        write_json(sweep_dir / SWEEP_FILE, plan)


def _read_plan_file(sweep_dir: Path) -> dict[str, Any]:
    try:
        return read_json(Path(sweep_dir) / SWEEP_FILE) or {}
    except CorruptFile:
        return {}


def read_plan(sweep_dir: Path) -> dict[str, Any]:
    return {"total": None, "jobs": None, "folders": {}} | _read_plan_file(sweep_dir)


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep, in job order, as its plan records them (each job notes its folder when it
    starts); a sweep written before plans held folders: those Hydra wrote its record into."""
    sweep_dir = Path(sweep_dir)
    recorded = read_plan(sweep_dir).get("folders") or {}
    if recorded:
        ordered = sorted(recorded.items(), key=lambda kv: int(kv[0]))
        return [sweep_dir / rel for _, rel in ordered if (sweep_dir / rel / ".hydra" / "hydra.yaml").exists()]
    return sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/hydra.yaml"))


def safe_name(text: object) -> str:
    """A name fit for a folder: only ``[A-Za-z0-9._+-]`` (anything else becomes ``_``), never ``..``, never
    starting with a dot, never empty."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", str(text))
    name = re.sub(r"\.{2,}", ".", name).lstrip(".")
    return name or "_"


def check_output_dir(template: str, resolved: str | Path, key: str = "hydra.run.dir") -> None:
    """Refuse an empty output folder, and one that ends up outside the folder its template's fixed prefix names
    (``outputs/runs/${now:...}-...`` must stay inside ``outputs/runs``)."""
    if not str(template).strip():
        raise DiffexpError(
            f"{key} is empty: a run needs its own folder (leave {key} out for the default under outputs/)."
        )
    prefix = str(template).split("${", 1)[0]
    if not prefix:  # the template starts with an interpolation: no fixed root to stay in
        return
    root = os.path.normpath(os.path.abspath(prefix if prefix.endswith(("/", os.sep)) else os.path.dirname(prefix)))
    target = os.path.normpath(os.path.abspath(str(resolved)))
    if target != root and not target.startswith(root.rstrip(os.sep) + os.sep):
        raise DiffexpError(
            f"The output folder {target} is outside {root}, the folder that {key}={template} names; a value in "
            "the folder's name (e.g. a '..') leads out of it. Use names without '/' and '..'."
        )
