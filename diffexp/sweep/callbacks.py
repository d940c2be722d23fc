"""The Hydra callbacks: the output folder's check (every run), and a sweep's (multirun) plan, progress after every
job, the report at the end, and a non-zero exit status if any job failed.

Works with every Hydra launcher (basic, joblib, submitit): jobs talk to each other only through the plan
(``sweep.json``: the jobs, and the folder of each once it starts) and the ``status.json`` of their folders, which
is the source of truth. Light to import (Hydra builds the callbacks before it validates a config); torch loads only
when the report is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import (
    RunStatus,
    check_output_dir,
    job_folders,
    read_plan,
    read_status,
    read_status_record,
    record_job_folder,
    write_plan,
)
from diffexp.sweep.supervisor import note

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
    """E.g. ``sweep: 4 of 6 jobs done (3 finished, 1 failed), 2 left``; jobs that died or cannot be read are
    done too, and named where there are any."""
    counts = count_statuses(sweep_dir)
    finished = counts.get(RunStatus.finished.value, 0)
    failed = counts.get(RunStatus.failed.value, 0) + counts.get(RunStatus.interrupted.value, 0)
    others = {s: counts.get(s.value, 0) for s in (RunStatus.died, RunStatus.corrupt)}
    extra = "".join(f", {n} {s.value}" for s, n in others.items() if n)
    done = finished + failed + sum(others.values())
    total = read_plan(sweep_dir)["total"]
    if total is None:
        return f"sweep: {finished} finished, {failed} failed{extra}"
    return f"sweep: {done} of {total} jobs done ({finished} finished, {failed} failed{extra}), {total - done} left"


def _is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def refuse(err: DiffexpError) -> None:
    """End the command on a clear paragraph (a callback has no run folder to record it in)."""
    print(f"\ndiffexp: {err}", file=sys.stderr)
    sys.exit(2)


def check_subdir(subdir: str, sweep_dir: str | Path, job_dir: str | Path | None = None) -> None:
    """A sweep job's folder stays inside the sweep folder: no absolute ``subdir``, no '..' in it, and (once
    known) ``job_dir`` inside ``sweep_dir``."""
    parts = str(subdir).replace(os.sep, "/").split("/")
    inside = os.path.normpath(os.path.abspath(str(sweep_dir)))
    target = None if job_dir is None else os.path.normpath(os.path.abspath(str(job_dir)))
    if os.path.isabs(str(subdir)) or ".." in parts or (target is not None and not target.startswith(inside + os.sep)):
        raise DiffexpError(
            f"hydra.sweep.subdir={subdir} is not allowed: a job's folder must stay inside the sweep folder "
            f"{inside}, so the subdir is relative and has no '..'."
        )


def check_job_dir(config: DictConfig) -> None:
    """The job's output folder is not empty and inside the folder its template names."""
    if _is_multirun(config):
        subdir = OmegaConf.to_container(config.hydra.sweep)["subdir"]
        check_subdir(subdir, config.hydra.sweep.dir, config.hydra.runtime.output_dir)
        template = f"{config.hydra.sweep.dir}/{subdir}"
        check_output_dir(template, config.hydra.runtime.output_dir, "hydra.sweep.subdir")
    else:
        check_output_dir(OmegaConf.to_container(config.hydra.run)["dir"], config.hydra.runtime.output_dir)


class OutputFolder(Callback):
    """Refuses an empty output folder and one outside the folder its template's fixed prefix names; a single
    run's before Hydra creates it, a sweep job's before it runs."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_dir(OmegaConf.to_container(config.hydra.run)["dir"], config.hydra.run.dir)
        except DiffexpError as err:
            refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        template = OmegaConf.to_container(config.hydra.sweep)
        try:
            check_output_dir(template["dir"], config.hydra.sweep.dir, "hydra.sweep.dir")
            if not str(template.get("subdir") or "").strip():
                raise DiffexpError("hydra.sweep.subdir is empty: every job of a sweep needs its own folder.")
            check_subdir(template["subdir"], config.hydra.sweep.dir)  # before any job folder is made
        except DiffexpError as err:
            refuse(err)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_job_dir(config)
        except DiffexpError as err:
            refuse(err)


def secondary_rank() -> bool:
    """A process of a sweep under torchrun other than rank 0: its jobs run sharded, in rank 0's folders (which
    alone keep the plan, the progress and the report)."""
    return os.environ.get("RANK", "0") != "0"


def drop_own_sweep_dir(sweep_dir: Path) -> None:
    """Another rank's own sweep folder (its own time and id): only Hydra's record and an empty plan remain."""
    if sweep_dir.is_dir() and not any(sweep_dir.glob("*/status.json")):
        shutil.rmtree(sweep_dir, ignore_errors=True)


def _is_basic_launcher(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.launcher._target_") or "").endswith("BasicLauncher")


class SweepStatus(Callback):
    """Progress after every job, a summary at the end and a non-zero exit status if any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if secondary_rank():
            return
        check_same_sweep(config, sweep_dir)
        jobs = planned_jobs(config)
        write_plan(sweep_dir, jobs)
        if _is_basic_launcher(config):  # its jobs die with this process: the supervisor resumes the sweep
            note(sweep_dir=str(sweep_dir.resolve()), job=None)
        if jobs is not None:
            before = count_statuses(sweep_dir).get(RunStatus.finished.value, 0)
            again = f" ({before} finished before: skipped)" if before else ""
            log.info("sweep: %d jobs%s -> %s", len(jobs), again, sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_multirun(config) and not secondary_rank():
            folder = Path(config.hydra.runtime.output_dir)
            record_job_folder(Path(config.hydra.sweep.dir), int(config.hydra.job.num), folder)
            if _is_basic_launcher(config):
                note(job=str(folder))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if _is_multirun(config) and not secondary_rank():
            note(job=None)
            log.info(progress_line(Path(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if secondary_rank():
            drop_own_sweep_dir(sweep_dir)
            return
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
        if secondary_rank():
            return
        from diffexp.report.dashboard import sweep_dashboard
        from diffexp.report.wandb import log_report
        from diffexp.report.write import write_report
        from diffexp.tracking.session import sweep_group

        sweep_dir = Path(config.hydra.sweep.dir)
        logger = config.logger if "logger" in config else None
        try:
            links = sweep_dashboard(None if logger is None else OmegaConf.to_object(logger), sweep_dir)
            try:
                report = write_report(sweep_dir)
            except (DiffexpError, OSError) as err:
                log.error("no comparison report: %s", err)
                return
            log.info("comparison report: %s", report.html)
            group = sweep_group(config.hydra.runtime.choices.get("experiment"), sweep_dir)
            log_report(config.get("logger"), report, group, links)
        except KeyboardInterrupt as err:  # the jobs had ended: only the report was interrupted
            err.outputs = report_interrupted(sweep_dir)  # type: ignore[attr-defined]
            raise


def report_interrupted(sweep_dir: Path) -> str:
    """What an interrupt during a sweep's report leaves: the jobs as they ended, the report to rebuild."""
    return (
        f"the sweep's jobs had all ended ({progress_line(sweep_dir)}); only its comparison report was interrupted: "
        f"python scripts/compare.py {sweep_dir} rebuilds it"
    )


def check_same_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """Re-running into an existing sweep folder is for the same sweep only (it resumes it)."""
    previous = sweep_dir / "multirun.yaml"
    if not previous.exists():
        return
    old = OmegaConf.load(previous)

    def what(c: DictConfig) -> tuple[list[str], Any]:
        params = OmegaConf.select(c, "hydra.sweeper.params")
        task = OmegaConf.to_container(c.hydra.overrides.task)
        overrides = sorted(o for o in task if not o.lstrip("+~").startswith("sweep."))  # how, not what, it runs
        return overrides, OmegaConf.to_container(params) if params is not None else None

    if what(old) != what(config):
        print(
            f"\ndiffexp: {sweep_dir} holds another sweep (overrides {what(old)[0]}, now {what(config)[0]}). "
            "A sweep folder is re-used only to resume the same sweep; leave hydra.sweep.dir out for a new one.",
            file=sys.stderr,
        )
        sys.exit(2)
