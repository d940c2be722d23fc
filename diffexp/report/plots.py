"""The report's charts: each quality metric against cost with its Pareto front, and sampling time against NFE."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from diffexp.report.jobs import Job, layout

if TYPE_CHECKING:
    from diffexp.metrics.base import Better

COSTS: dict[str, str] = {"nfe": "NFE (model calls)", "wall_s": "sampling time (s)"}  # metrics.json key -> axis


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


def _line_per_row(ax: Any, jobs: Sequence[Job], x: str, y: str, **style: Any) -> None:
    """One line per row through its finished runs' (x, y) values."""
    rows = layout(jobs).rows
    for row, color in zip(rows, colors(len(rows)), strict=True):
        pts = _points([j for j in jobs if j.row == row], x, y)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=color, label=row, markersize=5, **style)


def _legend(ax: Any) -> None:
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)


def quality_figure(jobs: Sequence[Job], key: str, better: Better) -> Figure:
    """``key`` against NFE and against wall time, one line per scheduler, the Pareto front dashed."""
    fig = Figure(figsize=(12, 4.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (cost, cost_label) in zip(axes, COSTS.items(), strict=True):
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
    _legend(axes[1])
    fig.suptitle(f"{key}: {better} is better; the dashed line is the Pareto front (no run is cheaper and better)")
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
