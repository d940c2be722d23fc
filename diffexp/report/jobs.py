"""The jobs of a sweep as the report sees them: one ``Job`` per job folder or planned job, each with its row label.

A row is the scheduler label plus every other setting that varies across the sweep; the columns of the grid are
step counts, so (row, steps) names a cell. The noise schedule, where it varies, is an axis of the rows: a row is a
sampler (the row without its schedule: one colour in the charts) x a schedule (one line style), and rows are grouped
sampler by sampler. A guidance scale that varies is a third axis, the facet: one grid per value, and it is left out
of the row label (``Job.series`` names row and facet together, for lines and strips).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from omegaconf import OmegaConf

from diffexp.catalog import scheduler_spec
from diffexp.errors import DiffexpError
from diffexp.folders import (
    METRICS_FILE,
    NOT_RUN,
    CorruptFile,
    RunStatus,
    job_folders,
    read_json,
    read_plan,
    read_status_record,
)
from diffexp.guidance_settings import NO_GUIDANCE
from diffexp.naming import cache_label
from diffexp.settings import compose

FACET = "guidance_scale"  # the config key that becomes the third axis of the report where it varies
FAILED = (RunStatus.failed, RunStatus.interrupted, RunStatus.died, RunStatus.corrupt)  # started, not finished


@dataclass
class Job:
    """One job folder of a sweep (or a planned job that never started)."""

    folder: Path | None
    num: int
    status: str  # a RunStatus value, or NOT_RUN
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    row: str = ""  # the scheduler label, plus the settings that vary across the sweep (except the facet)
    sampler: str = ""  # the row without its schedule
    schedule_label: str = ""  # the schedule as the row names it, where it varies ("" where it does not)
    facet: float | None = None  # the guidance scale where it varies across the sweep, else None

    @property
    def scheduler(self) -> str:
        return str(self.config["scheduler"]["name"])

    @property
    def steps(self) -> int:
        return int(self.config["steps"])

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale (1: none; sweeps from before guidance have none)."""
        g = self.config.get("guidance_scale")
        return NO_GUIDANCE if g is None else float(g)

    @property
    def method(self) -> str:
        """The guidance method (configs/guidance/; sweeps from before the group ran cfg)."""
        node = self.config.get("guidance")
        return str(node.get("name") or "cfg") if isinstance(node, Mapping) else "cfg"

    @property
    def schedule(self) -> str:
        """The noise schedule (configs/schedule/; sweeps from before the group ran the scheduler's own)."""
        node = self.config.get("schedule")
        return str(node.get("name") or "default") if isinstance(node, Mapping) else "default"

    @property
    def cache(self) -> str:
        """The cache's label (configs/cache/; none: no cache, and sweeps from before the group)."""
        return cache_label(self.config.get("cache"))

    @property
    def series(self) -> str:
        """The row, with the guidance scale where it is a facet: one line of a chart, one trajectory strip."""
        return self.row if self.facet is None else f"{self.row}, guidance {self.facet:g}"

    @property
    def finished(self) -> bool:
        return self.status == RunStatus.finished

    @property
    def failed(self) -> bool:
        """It started and did not finish (unlike a job still running or never run): failed, interrupted, died,
        or its files cannot be read."""
        return self.status in FAILED

    def samples(self) -> np.ndarray | None:
        path = self.folder / "samples.npy" if self.folder else None
        return np.load(path) if path and path.exists() else None

    def value(self, key: str) -> float | None:
        """A finite number from metrics.json, else None."""
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def stated_text(jobs: Sequence[Job], keys: Sequence[str], sep: str = " · ") -> str:
    """The values a figure is stated with (FID: ``fid_n`` and ``fid_features``) across ``jobs``: a count key
    (``*_n``) as ``n 200``, others as their value; differing values are all listed, joined by ``|``."""
    parts = []
    for key in keys:
        values = list(dict.fromkeys(str(v) for j in jobs if (v := j.metrics.get(key)) is not None))
        if values:
            parts.append(("n " if key.endswith("_n") else "") + " | ".join(values))
    return sep.join(parts)


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep in job order, with its row label; planned jobs without a folder are 'not run'."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DiffexpError(f"{sweep_dir} is not a folder. Pass the folder of a sweep, e.g. outputs/sweeps/<date>/<id>.")
    jobs = [load_job(folder, job_number(folder, n)) for n, folder in enumerate(job_folders(sweep_dir))]
    jobs += not_started(sweep_dir, {j.num for j in jobs})
    if not jobs:
        raise DiffexpError(
            f"{sweep_dir} holds no sweep jobs (no */.hydra/hydra.yaml). Pass the folder a multirun wrote, "
            "e.g. outputs/sweeps/<date>/<time>-<id>."
        )
    jobs.sort(key=lambda j: j.num)
    label_rows(jobs)
    return jobs


def load_job(folder: Path, num: int) -> Job:
    """A job folder: its config, status, error and (once finished) metrics; ``corrupt`` where its files cannot
    be read (the config then comes from Hydra's record, or the folder's name)."""
    record = read_status_record(folder) or {}
    status, error = str(record.get("status") or NOT_RUN), record.get("error")
    config = None
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):  # the resolved config; Hydra's record
        try:
            config = yaml.safe_load(path.read_text()) if path.exists() else None
        except (OSError, yaml.YAMLError) as err:
            status, error = RunStatus.corrupt.value, f"{path} cannot be read ({str(err).splitlines()[0]})"
        if isinstance(config, dict) and isinstance(config.get("scheduler"), dict) and "steps" in config:
            break
        config = None
    if config is None:
        config = {"scheduler": {"name": folder.name}, "steps": 0}
        status, error = RunStatus.corrupt.value, error or f"{folder} holds no readable config"
    try:
        metrics = (read_json(folder / METRICS_FILE) or {}) if status == RunStatus.finished else {}
    except CorruptFile as err:
        status, error, metrics = RunStatus.corrupt.value, str(err), {}
    return Job(folder, num, status, config, metrics, error)


def job_number(folder: Path, fallback: int) -> int:
    """The job's number in its sweep, from Hydra's record (``fallback`` where it cannot be read)."""
    try:
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        return int(hydra_cfg["hydra"]["job"].get("num") or 0)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return fallback


def not_started(sweep_dir: Path, seen: set[int]) -> list[Job]:
    """Planned jobs (sweep.json) that have no folder: an interrupted sweep's remainder."""
    planned = read_plan(sweep_dir).get("jobs") or []
    jobs = []
    for num, overrides in enumerate(planned):
        if num in seen:
            continue
        try:
            config = OmegaConf.to_container(compose(overrides), resolve=True, enum_to_str=True)
        except Exception as err:  # configs changed since: still list the job
            config = {"scheduler": {"name": " ".join(overrides)}, "steps": 0}
            jobs.append(Job(None, num, NOT_RUN, config, error=f"cannot compose {overrides}: {err}"))
            continue
        jobs.append(Job(None, num, NOT_RUN, config, error="the sweep stopped before this job started"))
    return jobs


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _varies(flats: Sequence[Mapping[str, Any]], key: str) -> bool:
    return len({json.dumps(f.get(key), default=str) for f in flats}) > 1


def _own_options(jobs: Sequence[Job], flats: Sequence[Mapping[str, Any]], job: Job, group: str, attr: str) -> list[str]:
    """The ``group.*`` options (other than its name) that vary among the runs of ``job``'s ``attr`` (its method, its
    schedule), in key order."""
    picked = [f for f, j in zip(flats, jobs, strict=True) if getattr(j, attr) == getattr(job, attr)]
    keys = sorted({k for f in picked for k in f if k.startswith(f"{group}.") and k != f"{group}.name"})
    return [k for k in keys if _varies(picked, k)]


def label_rows(jobs: Sequence[Job]) -> None:
    """Row = scheduler label (its non-default options), the schedule where it varies (and the schedule's options
    that vary among its own runs), the guidance method where it varies (likewise with its options), plus any other
    setting that varies across the sweep; a guidance scale that varies is the facet instead. Rows x facets is then
    the grid of methods x scales; ``sampler`` is the row without its schedule."""
    flats = [
        {k: v for k, v in flat(j.config).items() if not k.startswith("scheduler.") and k not in ("steps", "progress")}
        for j in jobs
    ]
    keys = sorted({k for f in flats for k in f})
    own = ("guidance.", "schedule.", "cache.")  # the groups whose options join a row only among their own runs
    varying = [k for k in keys if _varies(flats, k) and k != FACET and not k.startswith(own)]
    methods = len({j.method for j in jobs}) > 1
    schedules = len({j.schedule for j in jobs}) > 1
    caches = len({j.cache for j in jobs}) > 1  # a cache is an axis like the method: named in the row
    faceted = len({j.guidance for j in jobs}) > 1  # a run without the key (an older one) counts as scale 1
    for job, settings in zip(jobs, flats, strict=True):
        method = _own_options(jobs, flats, job, "guidance", "method")
        schedule = _own_options(jobs, flats, job, "schedule", "schedule")
        job.schedule_label = " ".join(
            [*([job.schedule] if schedules else []), *(f"{k}={settings.get(k)}" for k in schedule)]
        )
        label = scheduler_spec(job.config["scheduler"]).label
        rest = [*([job.method] if methods else []), *([job.cache] if caches else [])]
        rest += [f"{k}={settings.get(k)}" for k in [*method, *varying]]
        job.sampler = " ".join([label, *rest])
        job.row = " ".join([label, *([job.schedule_label] if job.schedule_label else []), *rest])
        job.facet = job.guidance if faceted else None


def in_row_order(jobs: Sequence[Job]) -> list[Job]:
    """The jobs grouped sampler by sampler, each sampler's schedules in turn (both in order of first appearance),
    then in job order."""
    samplers = list(dict.fromkeys(j.sampler for j in jobs))
    schedules = list(dict.fromkeys(j.schedule_label for j in jobs))
    return sorted(jobs, key=lambda j: (samplers.index(j.sampler), schedules.index(j.schedule_label), j.num))


def facets(jobs: Sequence[Job]) -> list[tuple[float | None, list[Job]]]:
    """The jobs of each guidance scale, ascending, where it varies; else one group, facet None."""
    values = sorted({j.facet for j in jobs if j.facet is not None})
    if not values:
        return [(None, list(jobs))]
    return [(g, [j for j in jobs if j.facet == g]) for g in values]


def facet_title(g: float) -> str:
    """A guidance facet's heading, in the grid and on the page."""
    return f"guidance scale {g:g}"


def series_order(jobs: Sequence[Job]) -> list[str]:
    """Every series (row, and facet if any) in grid order: facet by facet, rows in row order."""
    return list(dict.fromkeys(j.series for _, group in facets(jobs) for j in in_row_order(group)))


def guided(jobs: Sequence[Job]) -> bool:
    """Does a finished run count network evaluations apart from NFE (a guided call evaluates the network twice)?"""
    return any(j.value("net_evals") not in (None, j.value("nfe")) for j in jobs if j.finished)


def options_text(scheduler: Mapping[str, Any]) -> str:
    """The options that differ from the diffusers class default, as key=value."""
    return ", ".join(f"{k}={v}" for k, v in scheduler_spec(scheduler).non_default_options().items())


class Layout(NamedTuple):
    """The grid of a sweep: rows (sampler by sampler, schedules within), step counts (ascending) and the job shown
    in each cell."""

    rows: list[str]
    steps: list[int]
    cells: dict[tuple[str, int], Job]


def layout(jobs: Sequence[Job]) -> Layout:
    rows = list(dict.fromkeys(j.row for j in in_row_order(jobs)))
    steps = sorted({j.steps for j in jobs})
    cells: dict[tuple[str, int], Job] = {}
    for j in jobs:  # a later attempt of the same cell wins only if it finished
        if (j.row, j.steps) not in cells or j.finished:
            cells[(j.row, j.steps)] = j
    return Layout(rows, steps, cells)
