"""The report's charts: each quality metric against cost with its Pareto front, sampling time against NFE, the noise
levels of each schedule and (where the guidance scale varies) each quality metric against the guidance scale.

A line is one series (a row, and a guidance scale where it varies): its colour is the sampler, its dash the schedule
where schedules vary (else the guidance scale), its marker the guidance scale where it varies (else the schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from diffexp.report.jobs import Job, facets, guided, in_row_order, layout, series_order, stated_text

if TYPE_CHECKING:
    from diffexp.metrics.base import Better

COSTS: dict[str, str] = {"nfe": "NFE (model calls)", "wall_s": "sampling time (s)"}  # metrics.json key -> axis
DASHES, MARKERS = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v")  # per schedule or guidance facet
NET_EVALS = {"net_evals": "net evals (network evaluations per sample)"}  # the third cost of guided runs


def cost_axes(jobs: Sequence[Job]) -> dict[str, str]:
    """The costs to plot quality against: NFE and time, and net evals where guided runs count them apart."""
    return {**COSTS, **NET_EVALS} if guided(jobs) else dict(COSTS)


def pareto_front(x: Sequence[float], y: Sequence[float], better: Better) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and better y, sorted by x."""
    sign = 1.0 if better == "lower" else -1.0
    order = sorted(range(len(x)), key=lambda i: (x[i], sign * y[i]))
    front, best = [], math.inf
    for i in order:
        if sign * y[i] < best:
            front.append(i)
            best = sign * y[i]
    return front


def colors(n: int) -> list[Any]:
    """One colour per row: tab10, or tab20 beyond ten rows."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plain_log_ticks(ax: Any, *axes: str) -> None:
    """Log axes labelled 2, 5, 10, 20, 50 rather than 5x10^0."""

    def minor(v: float, _: Any) -> str:
        mantissa = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""

    for a in axes:
        axis = ax.xaxis if a == "x" else ax.yaxis
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(minor))


def _points(jobs: Sequence[Job], x: str, y: str) -> list[tuple[float, float]]:
    """The (x, y) metrics of the finished runs that hold both, sorted by x."""
    values = [(j.value(x), j.value(y)) for j in jobs if j.finished]
    return sorted(p for p in values if None not in p)  # type: ignore[misc]


@dataclass(frozen=True)
class Line:
    """One line of a chart: a series, its sampler and schedule, its style and its (x, y) points."""

    series: str
    sampler: str
    schedule: str  # "" where the schedule does not vary
    color: Any
    linestyle: str
    marker: str
    points: tuple[tuple[float, float], ...] = ()


def lines(jobs: Sequence[Job], x: str | None = None, y: str | None = None) -> list[Line]:
    """Every series in grid order, styled (colour: sampler; dash and marker: schedule and guidance scale), with the
    (x, y) metrics of its finished runs (no points without ``x`` and ``y``)."""
    ordered = in_row_order(jobs)
    samplers = list(dict.fromkeys(j.sampler for j in ordered))
    schedules = list(dict.fromkeys(j.schedule_label for j in ordered))
    scales = [g for g, _ in facets(jobs)]
    palette = colors(len(samplers))
    by_series = {j.series: j for j in jobs}
    out = []
    for name in series_order(jobs):
        job = by_series[name]
        schedule, scale = schedules.index(job.schedule_label), scales.index(job.facet)
        points = _points([j for j in jobs if j.series == name], x, y) if x and y else []
        out.append(Line(
            name, job.sampler, job.schedule_label, palette[samplers.index(job.sampler)],
            DASHES[(schedule if len(schedules) > 1 else scale) % len(DASHES)],
            MARKERS[(scale if len(scales) > 1 else schedule) % len(MARKERS)], tuple(points),
        ))  # fmt: skip
    return out


def _line_per_row(ax: Any, jobs: Sequence[Job], x: str, y: str, **style: Any) -> None:
    """One line per series (row, and guidance scale where it varies) through its finished runs' (x, y) values."""
    for line in lines(jobs, x, y):
        if line.points:
            look = {"color": line.color, "linestyle": line.linestyle, "marker": line.marker}
            ax.plot(*zip(*line.points, strict=True), label=line.series, markersize=5, **look, **style)


def _legend(ax: Any) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)


def _stated(jobs: Sequence[Job], key: str, stated: Sequence[str]) -> str:
    """``key`` with the values of the ``stated`` keys in these runs, e.g. ``fid (n 200 · inception-v3-compat 2048)``."""
    text = stated_text([j for j in jobs if j.finished], stated)
    return f"{key} ({text})" if text else key


def quality_figure(jobs: Sequence[Job], key: str, better: Better, stated: Sequence[str] = ()) -> Figure:
    """``key`` against NFE, wall time (and net evals of guided runs), one line per scheduler, the Pareto front
    dashed; the title states the values of the ``stated`` keys (FID: n and feature network)."""
    costs = cost_axes(jobs)
    fig = Figure(figsize=(12 + 4.5 * (len(costs) - 2), 4.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(costs))
    for ax, (cost, cost_label) in zip(axes, costs.items(), strict=True):
        _line_per_row(ax, jobs, cost, key, linewidth=1.5)
        pts = _points(jobs, cost, key)
        if pts:
            xs, ys = zip(*pts, strict=True)
            fx, fy = zip(*(pts[i] for i in pareto_front(xs, ys, better)), strict=True)
            ax.plot(fx, fy, drawstyle="steps-post", color="black", linestyle="--", linewidth=1, label="Pareto front")
            ax.plot(fx, fy, "o", markersize=11, markerfacecolor="none", markeredgecolor="black")
        ax.set_xscale("log")
        plain_log_ticks(ax, "x")
        ax.set_xlabel(f"{cost_label} (log scale)")
        ax.set_ylabel(f"{key} ({better} is better)")
        ax.grid(True, alpha=0.3, which="both")
        ax.set_title(f"{key} vs {cost_label.split(' (')[0]}", fontsize=11)
    _legend(axes[-1])
    front = "the dashed line is the Pareto front (no run is cheaper and better)"
    fig.suptitle(f"{_stated(jobs, key, stated)}: {better} is better; {front}")
    return fig


def cost_figure(jobs: Sequence[Job]) -> Figure:
    """Sampling time against NFE, one line per scheduler: the cost of a model call and the overhead."""
    fig = Figure(figsize=(8, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    _line_per_row(ax, jobs, "nfe", "wall_s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "x", "y")
    ax.set_xlabel("NFE (model calls, log scale)")
    ax.set_ylabel("sampling time (s, log scale)")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title("cost: sampling time against model calls")
    _legend(ax)
    return fig


def schedule_levels(job: Job) -> list[float]:
    """The positive noise levels a finished run used, in order (``metrics.json``: scheduler.schedule.sigmas)."""
    schedule = (job.metrics.get("scheduler") or {}).get("schedule") or {}
    return [float(s) for s in schedule.get("sigmas") or [] if isinstance(s, (int, float)) and s > 0]


def schedule_figure(jobs: Sequence[Job]) -> Figure | None:
    """The noise levels each series used against its step (log sigma), from its longest finished run: what a
    schedule comparison compares. None where no run recorded its levels."""
    longest: dict[str, Job] = {}
    for job in jobs:
        longer = job.series not in longest or job.steps > longest[job.series].steps
        if job.finished and len(schedule_levels(job)) > 1 and longer:
            longest[job.series] = job
    if not longest:
        return None
    fig = Figure(figsize=(8, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for line in lines(jobs):
        if (job := longest.get(line.series)) is not None:
            levels = schedule_levels(job)
            label = f"{line.series} ({job.steps} steps)"
            ax.plot(range(len(levels)), levels, marker=".", color=line.color, linestyle=line.linestyle, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step (the noise level of each model call, in order)")
    ax.set_ylabel("sigma (log scale)")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title("noise levels: the schedules compared")
    _legend(ax)
    return fig


def _by_scale(jobs: Sequence[Job], key: str) -> list[tuple[float, float]]:
    """(guidance scale, ``key``) of the finished runs that hold ``key``, sorted by scale."""
    return sorted((j.guidance, v) for j in jobs if j.finished and (v := j.value(key)) is not None)


def guidance_figure(jobs: Sequence[Job], key: str, better: Better, stated: Sequence[str] = ()) -> Figure:
    """``key`` against the guidance scale: one panel per step count, one line per row (scheduler with options),
    the best run of each panel ringed."""
    rows, steps, _ = layout(jobs)
    ncols = min(len(steps), 4)
    nrows = math.ceil(len(steps) / ncols)
    fig = Figure(figsize=(2.5 + 3.6 * ncols, 0.7 + 3.3 * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    legend: dict[str, Any] = {}  # label -> handle, over every panel
    for ax, k in zip(axes, steps, strict=False):
        panel = [j for j in jobs if j.steps == k]
        for row, color in zip(rows, colors(len(rows)), strict=True):
            if pts := _by_scale([j for j in panel if j.row == row], key):
                (legend[row],) = ax.plot(*zip(*pts, strict=True), "o-", color=color, markersize=5, linewidth=1.5)
        if pts := _by_scale(panel, key):
            best = (min if better == "lower" else max)(pts, key=lambda p: p[1])
            (legend["best at this step count"],) = ax.plot(
                *best, "o", markersize=12, markerfacecolor="none", markeredgecolor="black"
            )
        ax.set_xticks(sorted({j.guidance for j in jobs}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("guidance scale")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{k} steps", fontsize=11)
    for ax in axes[len(steps) :]:
        ax.set_axis_off()
    for ax in axes[::ncols]:
        ax.set_ylabel(f"{key} ({better} is better)")
    order = [r for r in rows if r in legend] + [n for n in legend if n not in rows]
    fig.legend([legend[n] for n in order], order, loc="outside right center", fontsize=9, frameon=False)
    fig.suptitle(f"{_stated(jobs, key, stated)} against the guidance scale, per step count ({better} is better)")
    return fig


def methods_figure(jobs: Sequence[Job], key: str, better: Better, stated: Sequence[str] = ()) -> Figure:
    """``key`` against network evaluations per sample, one colour per guidance method: a method that evaluates the
    network more often per call (PAG, SLG: three passes) sits to the right, so methods compare at equal cost.
    Each point is one run, labelled with its guidance scale; methods at the same cost sit slightly side by side."""
    methods = list(dict.fromkeys(j.method for j in jobs))
    fig = Figure(figsize=(8.5, 5.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (method, color) in enumerate(zip(methods, colors(len(methods)), strict=True)):
        shift = 1 + 0.012 * (i - (len(methods) - 1) / 2)  # methods at the same cost side by side, not on top
        pts = sorted(
            (v * shift, y, j.guidance)
            for j in jobs
            if j.method == method and j.finished and (v := j.value("net_evals")) is not None
            if (y := j.value(key)) is not None
        )
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, markersize=6, label=method, alpha=0.85)
        for x, y, g in pts:
            ax.annotate(f"{g:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.set_xscale("log")
    costs = sorted({v for j in jobs if j.finished and (v := j.value("net_evals")) is not None})
    ax.set_xticks(costs, [f"{v:g}" for v in costs])  # the costs the runs have, each labelled
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(NET_EVALS["net_evals"])
    ax.set_ylabel(f"{key} ({better} is better)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(title="guidance method (labels: scale)", fontsize=9, frameon=False)
    ax.set_title(f"{_stated(jobs, key, stated)} against network evaluations, per guidance method")
    return fig
