"""The Hydra callbacks of a sweep (multirun): its plan, progress after every job, the report at the end, and a
non-zero exit status if any job failed.

Works with every Hydra launcher (basic, joblib, submitit): jobs talk to each other only through the
``status.json`` of their folders, which is the source of truth. Light to import (Hydra builds the callbacks before
it validates a config); torch loads only when the report is written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import RunStatus, job_folders, read_plan, read_status, read_status_record, write_plan

log = logging.getLogger("diffexp")

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job of this multirun, as Hydra's basic sweeper expands them; None for other
    sweepers (they decide as they go)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != _BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task))
    overrides = OverridesParser.create().parse_overrides(arguments)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def count_statuses(sweep_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for folder in job_folders(sweep_dir):
        status = read_status(folder) or "starting"
        counts[status] = counts.get(status, 0) + 1
    return counts


def progress_line(sweep_dir: Path) -> str:
    """E.g. ``sweep: 4 of 6 jobs done (3 finished, 1 failed), 2 left``."""
    counts = count_statuses(sweep_dir)
    finished = counts.get(RunStatus.finished.value, 0)
    failed = counts.get(RunStatus.failed.value, 0) + counts.get(RunStatus.interrupted.value, 0)
    total = read_plan(sweep_dir)["total"]
    if total is None:
        return f"sweep: {finished} finished, {failed} failed"
    return f"sweep: {finished + failed} of {total} jobs done ({finished} finished, {failed} failed), " + (
        f"{total - finished - failed} left"
    )


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class SweepStatus(Callback):
    """Progress after every job, a summary at the end and a non-zero exit status if any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        check_same_sweep(config, sweep_dir)
        jobs = planned_jobs(config)
        write_plan(sweep_dir, jobs)
        if jobs is not None:
            before = count_statuses(sweep_dir).get(RunStatus.finished.value, 0)
            again = f" ({before} finished before: skipped)" if before else ""
            log.info("sweep: %d jobs%s -> %s", len(jobs), again, sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if _is_multirun(config):
            log.info(progress_line(Path(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [f for f in job_folders(sweep_dir) if read_status(f) != RunStatus.finished]
        log.info("%s -> %s", progress_line(sweep_dir), sweep_dir)
        if failed:
            names = ", ".join(f.name for f in failed)
            print(f"\ndiffexp: {len(failed)} job(s) of the sweep did not finish: {names}", file=sys.stderr)
            for f in failed:
                error = (read_status_record(f) or {}).get("error")
                print(f"  {f.name}: {error or 'no status recorded'}", file=sys.stderr)
            sys.exit(1)


class SweepReport(Callback):
    """The comparison report (diffexp.report) in the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from diffexp.report.dashboard import sweep_dashboard
        from diffexp.report.wandb import log_report
        from diffexp.report.write import write_report
        from diffexp.tracking.session import sweep_group

        sweep_dir = Path(config.hydra.sweep.dir)
        links = sweep_dashboard(config.get("logger"), sweep_dir)  # logger.dashboard=true: dashboard.json, saved online
        try:
            report = write_report(sweep_dir)
        except DiffexpError as err:
            log.error("no comparison report: %s", err)
            return
        log.info("comparison report: %s", report.html)
        group = sweep_group(config.hydra.runtime.choices.get("experiment"), sweep_dir)
        log_report(config.get("logger"), report, group, links)


def check_same_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """Re-running into an existing sweep folder is for the same sweep only (it resumes it)."""
    previous = sweep_dir / "multirun.yaml"
    if not previous.exists():
        return
    old = OmegaConf.load(previous)

    def what(c: DictConfig) -> tuple[list[str], Any]:
        params = OmegaConf.select(c, "hydra.sweeper.params")
        overrides = sorted(OmegaConf.to_container(c.hydra.overrides.task))
        return overrides, OmegaConf.to_container(params) if params is not None else None

    if what(old) != what(config):
        print(
            f"\ndiffexp: {sweep_dir} holds another sweep (overrides {what(old)[0]}, now {what(config)[0]}). "
            "A sweep folder is re-used only to resume the same sweep; leave hydra.sweep.dir out for a new one.",
            file=sys.stderr,
        )
        sys.exit(2)
