"""One job of a sweep: a failed job never takes the others down, and a re-run skips finished jobs.

A job whose process died (killed, e.g. by the kernel for lack of memory; ``diffexp.sweep.supervisor`` resumes the
sweep) is tried again when the sweep resumes, until it has died ``sweep.max_deaths`` times. A job folder that
cannot be read (a corrupt status.json, metrics.json or config.yaml) is run again.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import RunStatus, deaths, mark_failed, read_status
from diffexp.runner.observers import Observer, RunInfo
from diffexp.sampling.loop import StepState

log = logging.getLogger("diffexp")

# Debugging hook for the tests of a sweep's survival: with this variable set to a run label (e.g. euler-3), the
# run of that label kills its own process with SIGKILL at its first snapshot, as the kernel's out-of-memory killer
# would. Read nowhere else.
DEBUG_SIGKILL_ENV = "DIFFEXP_DEBUG_SIGKILL"


class DebugSigkill(Observer):
    """Kills this process with SIGKILL at the first snapshot of the run labelled ``label``."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.armed = False

    def start(self, run: RunInfo) -> None:
        self.armed = run.label == self.label

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        if self.armed:
            os.kill(os.getpid(), signal.SIGKILL)


def debug_observers() -> list[Observer]:
    label = os.environ.get(DEBUG_SIGKILL_ENV)
    return [DebugSigkill(label)] if label else []


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """One job of a sweep. Never raises for a failed run: the failure is recorded in its folder and returned,
    so the remaining jobs still run. A job that finished before with the same config is skipped, and so is one
    that died ``sweep.max_deaths`` times."""
    import torch

    from diffexp.runner.claim import FolderTaken
    from diffexp.runner.run import run

    out_dir = Path(out_dir)  # a job finished before with this config: run() returns its metrics (runner/claim.py)
    died, limit = deaths(out_dir), int(OmegaConf.select(cfg, "sweep.max_deaths", default=2))
    if read_status(out_dir) == RunStatus.died and died >= limit:
        log.error(
            "skipped: the job in %s died %d times (killed, e.g. for lack of memory); sweep.max_deaths=%d. "
            "Raise sweep.max_deaths to try it again.",
            out_dir,
            died,
            limit,
        )
        return {"status": RunStatus.died.value, "error": f"died {died} times"}
    try:
        return run(cfg, out_dir, debug_observers())
    except Exception as err:  # a bad combination, NaN, out of memory: this job only
        if isinstance(err, DiffexpError):
            log.error("%s", err)
        else:
            log.exception("the run failed")
        if not isinstance(err, FolderTaken) and read_status(out_dir) != RunStatus.failed:  # never another run's
            mark_failed(out_dir, err)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory of a failed (e.g. out-of-memory) run back to the next job
        return {"status": RunStatus.failed.value, "error": str(err), "error_type": type(err).__name__}
