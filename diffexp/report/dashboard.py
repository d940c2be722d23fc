"""The W&B dashboard of a sweep: a saved workspace (view) and a report that compare schedulers.

Sections: "Quality vs cost" (each final quality metric against NFE and sampling time), "Guidance methods" (where the
method varies: quality against network evaluations; method, scale, cost and quality joined), "Trajectories" (x and
x0 with the step slider, convergence curves against step and NFE), "Schedulers" (the effective scheduler configs
side by side, the swept settings against a quality metric) and "Cost" (throughput, memory, load time). The runs
are the sweep's group(s), ``job_type=sample``, grouped by ``scheduler_label``.

Every key comes from a declaration (the metrics' ``Key`` s, the snapshot record's ``SNAPSHOT_KEYS``, the cost keys
of ``diffexp.runner.summary``) or from what the runs logged (media, swept settings), and a panel appears only when
the sweep's runs logged its keys: a metric declared later appears by itself, one switched off leaves no empty panel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr

from diffexp.config import LoggerConfig
from diffexp.folders import DASHBOARD_FILE, write_json
from diffexp.metrics.base import Key
from diffexp.metrics.suite import METRICS, QUALITY
from diffexp.report.logged import Logged, flat, read_logged
from diffexp.runner.summary import COST_AXES, COST_KEYS, SNAPSHOT_KEYS, STEP_AXES
from diffexp.runner.wandb_run import SCHEDULER_KEY
from diffexp.tracking.session import has_credentials, reason

log = logging.getLogger("diffexp")

SAMPLE_JOB = "sample"  # the job type of sampling runs (the sweep's compare run is left out)

TEXT = {
    "Quality vs cost": (
        "Each point is a finished run, coloured by scheduler (its label names the options in force). Compare at "
        "equal NFE, not at equal steps: second-order schedulers (Heun, KDPM2, DPM-Solver-SDE) call the model about "
        "twice per step. The best scheduler reaches a given quality with the fewest model calls; sampling time "
        "adds each scheduler's own overhead. In a guided sweep, every model call evaluates the network twice: "
        "`net_evals` counts both."
    ),
    "Guidance methods": (
        "Each point is a finished run; compare guidance methods at equal `net_evals` (network evaluations per "
        "sample), not at equal steps: PAG and SLG evaluate the network three times per perturbed call, the others "
        "twice. The parallel coordinates join each run's method and scale to its cost and quality."
    ),
    "Trajectories": (
        "Drag the step slider of `x` (the current sample) and `x0` (the predicted clean image) to scrub the "
        "trajectories of the selected runs together; x0 settles long before x stops being noisy. The curves show "
        "convergence: a scheduler whose curve drops first against NFE reaches its final image with fewest model "
        "calls."
    ),
    "Schedulers": (
        "The run comparer lists each run's effective scheduler: the class, every setting in force and a short "
        "hash of them (switch on 'diff only' to see what differs). Runs with the same `effective_scheduler.hash` "
        "sampled with identical settings, whatever their names. The parallel coordinates join each run's swept "
        "settings to its quality."
    ),
    "Cost": (
        "What each run cost besides model calls: images per second, peak accelerator memory and the time to load "
        "the model (and to compile it or decode latents, where runs log them). Sampling time is measured after the "
        "model is loaded and the metrics are prepared."
    ),
}


@dataclass
class Dashboard:
    """The sections (name, text, panels), what was left out and why, the workspace and the report."""

    entity: str
    project: str
    groups: list[str]
    metric: str | None
    sections: list[tuple[str, list[Any]]]
    left_out: list[str]
    workspace: ws.Workspace = field(init=False)
    report: wr.Report = field(init=False)

    def __post_init__(self) -> None:
        self.workspace = ws.Workspace(
            entity=self.entity,
            project=self.project,
            name=f"diffexp: {', '.join(self.groups)}",
            sections=[
                ws.Section(name=name, panels=panels, is_open=True, layout_settings=ws.SectionLayoutSettings(columns=3))
                for name, panels in self.sections
            ],
            runset_settings=ws.RunsetSettings(filters=self.filters(), groupby=[ws.Config(SCHEDULER_KEY)]),
        )
        runset = wr.Runset(name="sweep", filters=self.filters(), groupby=[f"config.{SCHEDULER_KEY}"])
        blocks: list[Any] = [wr.MarkdownBlock(intro(self.groups))]
        for name, panels in self.sections:
            blocks += [wr.H2(name), wr.MarkdownBlock(TEXT[name]), wr.PanelGrid(runsets=[runset], panels=panels)]
        self.report = wr.Report(
            entity=self.entity,
            project=self.project,
            title=f"Schedulers compared: {', '.join(self.groups)}",
            description="diffexp: quality against cost, trajectories, scheduler configs and cost of a sweep",
            blocks=blocks,
            width="fluid",
        )

    def filters(self) -> list[expr.FilterExpr]:
        return [expr.Metric("Group").isin(self.groups), expr.Metric("JobType") == SAMPLE_JOB]

    def to_json(self) -> dict[str, Any]:
        """The specification as W&B's own models (what saving sends), with a readable outline."""
        return {
            "entity": self.entity,
            "project": self.project,
            "groups": self.groups,
            "metric": self.metric,
            "outline": [
                {"section": name, "text": TEXT[name], "panels": [title(p) for p in ps]} for name, ps in self.sections
            ],
            "left_out": self.left_out,
            "workspace": self.workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True),
            "report": self.report._to_model().model_dump(mode="json", by_alias=True, exclude_none=True),
        }

    def write(self, path: Path) -> Path:
        write_json(path, self.to_json())
        return path

    def save(self) -> dict[str, str]:
        """Save both to W&B (needs an API key and the server), in the API key's entity if none was given; their
        URLs."""
        if not self.entity:
            import wandb

            self.entity = self.workspace.entity = self.report.entity = str(wandb.Api().default_entity or "")
        self.workspace.save()
        self.report.save()
        return {"workspace": self.workspace.url, "report": self.report.url}


def title(panel: Any) -> str:
    return getattr(panel, "title", None) or type(panel).__name__


def intro(groups: list[str]) -> str:
    return (
        f"The sampling runs of {', '.join(f'`{g}`' for g in groups)}, grouped by `{SCHEDULER_KEY}`. Every run "
        "started from the same noise; each panel shows only keys the runs logged."
    )


def _present(keys: list[Key] | tuple[Key, ...], logged: set[str], left_out: list[str], where: str) -> list[str]:
    names = list(dict.fromkeys(k.name for k in keys))
    left_out += [f"{n}: not in the runs' {where}" for n in names if n not in logged]
    return [n for n in names if n in logged]


def build(logged: Logged, entity: str, project: str, metric: str | None = None) -> Dashboard:
    """The dashboard of what ``logged`` holds; ``metric`` is the quality key of the parallel coordinates (default:
    the first declared quality metric the runs logged)."""
    left_out: list[str] = []
    summary, swept = logged.summary, logged.swept()
    quality = _present([Key(n, b) for n, b in QUALITY.items()], summary, left_out, "summary")
    axes = [wr.SummaryMetric(n) for n in _present(COST_AXES, summary, left_out, "summary")]
    if not logged.guided():  # net_evals equals nfe without guidance: one of them is enough
        axes = [a for a in axes if a.name != "net_evals"]
    else:
        axes += [wr.Config(k) for k in swept if _numeric(logged, k)]

    def scatter(q: str, x: Any) -> wr.ScatterPlot:  # cost on a log axis, a swept setting on a linear one
        log_x = isinstance(x, wr.SummaryMetric)
        return wr.ScatterPlot(title=f"{q} vs {x.name}", x=x, y=wr.SummaryMetric(q), log_x=log_x)

    trajectories: list[Any] = [wr.MediaBrowser(title=m, media_keys=[m], mode="gallery", gallery_axis="step")
                               for m in logged.media]  # fmt: skip
    snapshot = [k for k in (*SNAPSHOT_KEYS, *(k for m in METRICS for k in m.keys)) if k.when == "snapshot"]
    curves = _present([k for k in snapshot if k.better], logged.history, left_out, "history")
    x_steps = [a for a in STEP_AXES if a in logged.history and (a != "net_evals" or logged.guided())]
    trajectories += [wr.LinePlot(title=f"{c} vs {x}", x=x, y=[c], log_y=True) for c in curves for x in x_steps]

    metric = metric if metric in quality else (quality[0] if quality else None)
    schedulers: list[Any] = [wr.RunComparer(diff_only="split")]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in swept]
    if columns and metric:
        columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric)))
        schedulers.append(wr.ParallelCoordinatesPlot(title=f"swept settings and {metric}", columns=columns))
    cost = [
        wr.BarPlot(title=k, metrics=[wr.SummaryMetric(k)], orientation="v")
        for k in _present(COST_KEYS, summary, left_out, "summary")
    ]
    methods: list[Any] = []  # the guidance method as an axis: quality at equal network evaluations, per method
    if "guidance.name" in swept and "net_evals" in summary:
        methods = [scatter(q, wr.SummaryMetric("net_evals")) for q in quality]
        keys = [wr.Config(k) for k in ("guidance.name", "guidance_scale") if k in swept]
        keys += [wr.SummaryMetric("net_evals"), *([wr.SummaryMetric(metric)] if metric else [])]
        title = f"guidance method, scale, net evals{f' and {metric}' if metric else ''}"
        columns = [wr.ParallelCoordinatesPlotColumn(metric=k) for k in keys]
        methods.append(wr.ParallelCoordinatesPlot(title=title, columns=columns))
    sections = [
        ("Quality vs cost", [scatter(q, x) for q in quality for x in axes]),
        ("Guidance methods", methods),
        ("Trajectories", trajectories),
        ("Schedulers", schedulers),
        ("Cost", cost),
    ]
    return Dashboard(entity, project, logged.groups, metric, [(n, p) for n, p in sections if p], left_out)


def _numeric(logged: Logged, key: str) -> bool:
    values = [flat(c).get(key) for c in logged.configs]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)


def offline_reason(mode: str | None = None) -> str | None:
    """Why the dashboard cannot be saved to W&B now, without touching the network; None if it may try."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode in ("offline", "disabled", "dryrun"):
        return f"W&B is in {mode} mode"
    if not has_credentials():
        return "no W&B API key is configured"
    return None


def sweep_dashboard(logger: LoggerConfig | None, sweep_dir: Path) -> dict[str, str] | None:
    """``logger.dashboard=true``: at the end of a sweep, write its ``dashboard.json`` and, online, save the
    workspace and report (of the groups its runs logged to); their URLs, or None (said in the log) when it is off,
    offline or W&B fails."""
    if logger is None or not logger.dashboard:
        return None
    try:
        logged = read_logged([sweep_dir])
        mode = logger.mode
        why = offline_reason(getattr(mode, "value", mode))
        dashboard = build(logged, logger.entity or "", logger.project)
        path = dashboard.write(Path(sweep_dir) / DASHBOARD_FILE)
        if why:
            log.info("W&B dashboard not saved (%s); its specification is in %s. Save it once the runs are synced: "
                     "python scripts/dashboard.py %s", why, path, sweep_dir)  # fmt: skip
            return None
        urls = dashboard.save()
    except Exception as err:
        log.warning("W&B dashboard not saved (%s); the sweep folder is complete.", reason(err))
        return None
    log.info("W&B workspace: %s\nW&B report: %s", urls["workspace"], urls["report"])
    return urls
