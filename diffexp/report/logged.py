"""What a sweep's runs logged, as W&B shows it: history keys, summary keys, media, configs and groups.

Read from each job's ``.wandb`` files with ``diffexp.tracking.reader`` (offline runs and the local copies of online
ones), or, for a job logged without W&B (``logger=none``), from its ``steps.jsonl``, ``metrics.json`` and
``config.yaml``. The dashboard shows only panels whose keys are in here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from diffexp.config import RunConfig
from diffexp.errors import DiffexpError
from diffexp.folders import METRICS_FILE, job_folders, read_json
from diffexp.report.jobs import flat
from diffexp.runner.wandb_run import SCHEDULER_KEY
from diffexp.tracking.reader import OfflineRun
from diffexp.tracking.session import sweep_group

STEPS_FILE = "steps.jsonl"  # a run folder's snapshot records (diffexp.runner.folder)
IMAGE_TYPE = "image-file"  # how a wandb.Image appears in a run's history


@dataclass
class Logged:
    """The union over a sweep's runs (``job_type=sample``) of what they logged."""

    sweep_dirs: list[Path]
    history: set[str] = field(default_factory=set)  # scalar keys of the history rows
    media: list[str] = field(default_factory=list)  # history keys that hold images (step slider), sorted
    summaries: list[dict[str, Any]] = field(default_factory=list)  # each run's summary
    configs: list[dict[str, Any]] = field(default_factory=list)  # each run's config, with what it resolved to
    groups: list[str] = field(default_factory=list)  # the runs' W&B groups, first seen first

    @property
    def summary(self) -> set[str]:
        return {k for s in self.summaries for k in s}

    def config_keys(self) -> set[str]:
        return {k for c in self.configs for k in flat(c)}

    def guided(self) -> bool:
        """Whether a run made more network evaluations than model calls (classifier-free guidance)."""
        return any(s.get("net_evals") not in (None, s.get("nfe")) for s in self.summaries)

    def swept(self) -> list[str]:
        """The settings (keys of the run config's schema, dotted) whose values differ across the runs. When the
        scheduler itself varies, its settings count as one: ``scheduler_label``, the scheduler with its options."""
        settings = {f.name for f in fields(RunConfig)}
        flats = [{k: v for k, v in flat(c).items() if k.split(".")[0] in settings} for c in self.configs]
        keys = sorted({k for f in flats for k in f}, key=lambda k: (k.count("."), k))
        varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        if "scheduler.name" in varying:
            return [SCHEDULER_KEY, *(k for k in varying if not k.startswith("scheduler."))]
        return varying

    def add_wandb(self, run: OfflineRun) -> None:
        if run.run is not None and run.run.job_type not in ("", "sample"):
            return
        for row in run.history:
            for k, v in row.items():
                if isinstance(v, Mapping) and v.get("_type") == IMAGE_TYPE:
                    self.media = sorted({*self.media, k})
                elif v is not None:
                    self.history.add(k)
        self.summaries.append(run.summary)
        self.configs.append(run.config)
        if run.run is not None and run.run.run_group and run.run.run_group not in self.groups:
            self.groups.append(run.run.run_group)

    def add_folder(self, folder: Path) -> None:
        """A job logged without W&B: its snapshot records, metrics and resolved config."""
        steps = folder / STEPS_FILE
        for line in steps.read_text().splitlines() if steps.exists() else ():
            self.history |= {k for k, v in json.loads(line).items() if v is not None}
        self.summaries.append(read_json(folder / METRICS_FILE) or {})
        config = folder / "config.yaml"
        self.configs.append(yaml.safe_load(config.read_text()) if config.exists() else {})


def _experiment(sweep_dir: Path) -> str | None:
    record = sweep_dir / "multirun.yaml"
    if not record.exists():
        return None
    choices = (yaml.safe_load(record.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    return choices.get("experiment")


def read_logged(sweep_dirs: Iterable[Path]) -> Logged:
    """What the jobs of these sweep folders logged; a job without ``.wandb`` files is read from its folder."""
    logged = Logged([Path(d) for d in sweep_dirs])
    for sweep_dir in logged.sweep_dirs:
        folders = job_folders(sweep_dir)
        if not folders:
            raise DiffexpError(
                f"{sweep_dir} holds no sweep jobs (no */.hydra/hydra.yaml). Pass the folder a multirun wrote, "
                "e.g. outputs/sweeps/<date>/<time>-<id>."
            )
        offline = 0
        for folder in folders:
            files = [p for p in sorted(folder.glob("wandb/*/*.wandb")) if not p.parent.is_symlink()]  # latest-run
            for path in files:
                logged.add_wandb(OfflineRun.read(path))
            if not files:
                logged.add_folder(folder)
                offline += 1
        group = sweep_group(_experiment(sweep_dir), sweep_dir)
        if offline and group and group not in logged.groups:
            logged.groups.append(group)
    return logged


def find_sweeps(groups: Sequence[str], root: Path) -> list[Path]:
    """The sweep folders under ``root`` (``outputs/sweeps/<date>/<time>-<id>``) whose groups these are: a sweep's
    group is its folder name, after the experiment's name if one was chosen."""
    found = []
    for group in groups:
        matches = [p for p in sorted(Path(root).glob("*/*")) if group == p.name or group.endswith(f"-{p.name}")]
        if not matches:
            raise DiffexpError(f"no sweep folder of group {group!r} under {root}; pass the sweep folder itself.")
        found += [m for m in matches if m not in found]
    return found
