"""One run per folder: a run locks its folder, and refuses a folder that holds another run.

A folder is free when it holds nothing but Hydra's record. It holds this very run (the same config, the keys in
``NOT_COMPARED`` aside) when started again in it: finished, there is nothing to do; unfinished (failed,
interrupted, killed), it continues from its finished chunks when ``resume`` is on. Any other run in it is refused,
unless ``overwrite=true`` clears it first. The lock (``flock`` on ``.lock``) is the kernel's, so a killed process
never leaves a stale one behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffexp.errors import DiffexpError
from diffexp.folders import METRICS_FILE, RunStatus, read_json, read_status_record
from diffexp.samples import MANIFEST_FILE, chunk_files, damaged_chunks
from diffexp.settings import RunSettings

LOCK_FILE = ".lock"
KEEP = (".hydra", LOCK_FILE)  # what Hydra and the lock put in a folder before a run starts, with Hydra's *.log
# keys that change how a run is watched, never what it samples: a run started again may change them
NOT_COMPARED = ("progress", "logger", "observers", "resume", "overwrite", "oom_retry", "sweep")


class FolderTaken(DiffexpError):
    """The folder belongs to another run (or another process); nothing in it was touched."""


@dataclass
class Claim:
    """A folder this process may write: the lock, and what an earlier try of the same run left."""

    out_dir: Path
    lock: int | None = None  # the locked file descriptor; None on ranks other than 0
    finished: dict[int, Path] = field(default_factory=dict)  # chunk number -> its file, to reuse
    done: dict[str, Any] | None = None  # the metrics of this run, finished before: nothing to do

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)  # closing the descriptor drops the flock
            self.lock = None


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys where two configs differ."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def kept(path: Path) -> bool:
    """Hydra's record and job log, and the lock: written before the run starts, never another run's."""
    return path.name in KEEP or path.suffix == ".log"


def lock(out_dir: Path) -> int:
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        record = read_status_record(out_dir) or {}
        who = f" (pid {record['pid']} on {record.get('host', '?')})" if "pid" in record else ""
        raise FolderTaken(
            f"Another process{who} is running in {out_dir} right now. Two runs never share a folder: wait for it, "
            "or start this one in another hydra.run.dir."
        ) from None
    return fd


def clear(out_dir: Path) -> None:
    """``overwrite=true``: remove the earlier run's files, keeping Hydra's record of this one."""
    for p in out_dir.iterdir():
        if not kept(p):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def claim(out_dir: Path, settings: RunSettings) -> Claim:
    """Lock ``out_dir`` for this run, or refuse it with a clear ``FolderTaken``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = lock(out_dir)
    try:
        return Claim(out_dir, fd, *inspect(out_dir, settings))
    except BaseException:
        os.close(fd)
        raise


def inspect(out_dir: Path, settings: RunSettings) -> tuple[dict[int, Path], dict[str, Any] | None]:
    """What this run may reuse in ``out_dir``: finished chunks, or the metrics of a finished run."""
    record = read_status_record(out_dir)  # a damaged status.json reads "corrupt": some run was here
    if record is None:
        others = sorted(p.name for p in out_dir.iterdir() if not kept(p))
        if others:
            raise FolderTaken(
                f"{out_dir} is not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}) and holds no "
                "diffexp run: start the run in an empty or new hydra.run.dir."
            )
        return {}, None
    if settings.overwrite:
        clear(out_dir)
        return {}, None
    stored_file = out_dir / "config.yaml"
    stored = yaml.safe_load(stored_file.read_text()) if stored_file.is_file() else {}
    current = settings.config
    changed = differences(comparable(stored or {}), comparable(current))
    status = record.get("status")
    if changed:
        raise FolderTaken(
            f"{out_dir} holds another run ({record.get('label', '?')}, {status}) whose config differs in "
            f"{', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}. Runs never mix in a folder: start "
            "this one in another hydra.run.dir, or set overwrite=true to delete that run first."
        )
    damaged: dict[int, str] = {}
    if status == RunStatus.finished:
        metrics = read_json(out_dir / METRICS_FILE) or {}
        damaged = damaged_chunks(out_dir, metrics.get("chunks"))
        if not damaged:
            return {}, metrics
        status = "finished, but its chunk files no longer verify"  # resumed: the damaged chunks are sampled again
    if not settings.resume:
        raise FolderTaken(
            f"{out_dir} holds an unfinished run of this config ({status}). resume=true continues it from its "
            "finished chunks; overwrite=true deletes it and starts again."
        )
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # rewritten when the run finishes again
    return {i: p for i, p in chunk_files(out_dir).items() if i not in damaged}, None
