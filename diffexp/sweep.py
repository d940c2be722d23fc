"""Sweeps (Hydra multiruns): a failed job never takes the others down, a re-run skips finished jobs, the
terminal shows how many jobs are done, failed and left, and the exit status is non-zero if any job failed.

Works with every Hydra launcher (basic, joblib, submitit): jobs talk to each other only through the
``status.json`` of their folders, which is the source of truth. Light to import (Hydra builds the callbacks before
it validates a config); torch loads only when a job runs.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError

log = logging.getLogger("diffexp")

SWEEP_FILE = "sweep.json"  # the planned jobs, written when a sweep starts
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """One job of a sweep. Never raises for a failed run: the failure is recorded in its folder and returned,
    so the remaining jobs still run. A job that finished before with the same config is skipped."""
    import torch

    from diffexp.files import mark_failed
    from diffexp.runner import run

    out_dir = Path(out_dir)
    done = finished_metrics(cfg, out_dir)
    if done is not None:
        log.info("skipped: %s finished before in %s", done.get("label"), out_dir)
        return done
    try:
        return run(cfg, out_dir)
    except Exception as err:  # a bad combination, NaN, out of memory: this job only
        if isinstance(err, DiffexpError):
            log.error("%s", err)
        else:
            log.exception("the run failed")
        if read_status(out_dir) != "failed":
            mark_failed(out_dir, err)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory of a failed (e.g. out-of-memory) run back to the next job
        return {"status": "failed", "error": str(err), "error_type": type(err).__name__}


def finished_metrics(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run that finished in ``out_dir`` with this very config, else None."""
    if read_status(out_dir) != "finished" or not (out_dir / "metrics.json").exists():
        return None
    stored = yaml.safe_load((out_dir / "config.yaml").read_text())
    current = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    for c in (stored, current):
        c.pop("progress", None)  # display only
    if stored != current:
        log.warning("%s holds a finished run of another config: running it again", out_dir)
        return None
    return json.loads((out_dir / "metrics.json").read_text())


def read_status(run_dir: Path) -> str | None:
    """``running``, ``finished``, ``failed`` or ``interrupted``; None for a folder that is not a run."""
    from diffexp.files import read_status

    return read_status(run_dir)


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


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: those Hydra wrote its record into."""
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/hydra.yaml"))


def count_statuses(sweep_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for folder in job_folders(sweep_dir):
        status = read_status(folder) or "starting"
        counts[status] = counts.get(status, 0) + 1
    return counts


def _planned_count(sweep_dir: Path) -> int | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()).get("total") if path.exists() else None


def progress_line(sweep_dir: Path) -> str:
    """E.g. ``sweep: 4 of 6 jobs done (3 finished, 1 failed), 2 left``."""
    counts = count_statuses(sweep_dir)
    finished, failed = counts.get("finished", 0), counts.get("failed", 0) + counts.get("interrupted", 0)
    total = _planned_count(sweep_dir)
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
        sweep_dir.mkdir(parents=True, exist_ok=True)
        plan = {
            "total": None if jobs is None else len(jobs),
            "jobs": jobs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        if jobs is not None:
            before = count_statuses(sweep_dir).get("finished", 0)
            again = f" ({before} finished before: skipped)" if before else ""
            log.info("sweep: %d jobs%s -> %s", len(jobs), again, sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if _is_multirun(config):
            log.info(progress_line(Path(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [f for f in job_folders(sweep_dir) if read_status(f) != "finished"]
        log.info("%s -> %s", progress_line(sweep_dir), sweep_dir)
        if failed:
            names = ", ".join(f.name for f in failed)
            print(f"\ndiffexp: {len(failed)} job(s) of the sweep did not finish: {names}", file=sys.stderr)
            for f in failed:
                error = json.loads((f / "status.json").read_text()).get("error") if read_status(f) else None
                print(f"  {f.name}: {error or 'no status recorded'}", file=sys.stderr)
            sys.exit(1)


class SweepReport(Callback):
    """The comparison report (diffexp.report) in the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from diffexp.report import write_report
        from diffexp.tracking import log_report, sweep_group

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
        except DiffexpError as err:
            log.error("no comparison report: %s", err)
            return
        log.info("comparison report: %s", report.html)
        log_report(config.get("logger"), report, sweep_group(config.hydra.runtime.choices.get("experiment"), sweep_dir))


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
