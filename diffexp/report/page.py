"""The report page: templates/report.html.j2 rendered with Jinja2 into one offline HTML file.

Every value is escaped by the template engine (autoescape), so scheduler names, errors and paths cannot break
the page; the figures are embedded as data URIs and the CSS inline, so the file needs nothing beside it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from diffexp.folders import DASHBOARD_FILE, RunStatus
from diffexp.images import png_data_uri
from diffexp.report.jobs import Job
from diffexp.report.scrub import scrub_runs
from diffexp.report.tables import HEADERS, format_value, shown_columns

if TYPE_CHECKING:
    from diffexp.metrics.base import Better

TEMPLATES = Path(__file__).parent / "templates"
PAGE_TEMPLATE = "report.html.j2"
TEXT_COLUMNS = {"scheduler", "options", "schedule", "status"}  # left-aligned, unwrapped


@functools.cache
def environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,  # a missing value is an error, not an empty section
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def sweep_command(sweep_dir: Path) -> str:
    """The command line that ran the sweep, from Hydra's multirun.yaml ("" without one)."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return ""
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    params = (hydra.get("sweeper") or {}).get("params") or {}
    task = hydra.get("overrides", {}).get("task") or []
    args = [a for a in task if not any(a.startswith(f"{k}=") for k in params)]
    args += [f"{k}={v}" for k, v in params.items() if not any(a.startswith(f"{k}=") for a in task)]
    return "python scripts/run.py -m " + " ".join(args)


def summary(jobs: Sequence[Job]) -> dict[str, Any]:
    """What the sweep compared and where it ran, from the configs and the first finished run's metrics."""
    done = [j for j in jobs if j.finished]
    m = done[0].metrics if done else {}
    seeds = sorted({int(j.config.get("seed", 0)) for j in jobs})
    batches = sorted({int(j.config.get("batch_size", 0)) for j in jobs})
    return {
        "model": ", ".join(sorted({str(j.config.get("model", {}).get("name")) for j in jobs})),
        "samples": ", ".join(f"seeds {s}..{s + b - 1}" for s in seeds for b in batches),
        "device": f"{m.get('device', '?')} ({m.get('device_name', '?')})" if m else "?",
        "precision": ", ".join(sorted({str(j.config.get("precision")) for j in jobs})),
        "versions": f"torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}" if m else "?",
        "jobs": len(jobs),
        "finished": len(done),
        "not finished": len(jobs) - len(done),
    }


def row_class(status: str) -> str:
    """The CSS class of a table row: failed (red), notrun (grey), or none for a finished run."""
    if status in (RunStatus.failed, RunStatus.interrupted, RunStatus.died, RunStatus.corrupt):
        return "failed"
    return "" if status == RunStatus.finished else "notrun"


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The shown columns' headers and the formatted rows, each cell with its CSS class."""
    shown = shown_columns(columns)
    head = [(HEADERS.get(c, c), "text" if c in TEXT_COLUMNS | {"error"} else "") for c in shown]
    body = [
        {
            "css": row_class(row["status"]),
            "cells": [("text" if c in TEXT_COLUMNS else c, format_value(c, row[c])) for c in shown],
        }
        for row in rows
    ]
    return {"head": head, "body": body}


def render_page(
    *,
    sweep_dir: Path,
    jobs: Sequence[Job],
    quality: Mapping[str, Better],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, Path],
    title: str,
    searched: Sequence[str],
    facets: Sequence[tuple[str, str]] = (),
) -> str:
    """The page: ``images`` maps grid, cost, each quality key and (optionally) trajectories, guidance-<key> and
    the facets' grids to PNG files; ``searched`` are the quality keys looked for, named when the runs hold none;
    ``facets`` are (heading, image name) of the grid per guidance scale, shown instead of the grid."""
    template = environment().get_template(PAGE_TEMPLATE)
    return template.render(
        title=title,
        sweep_dir=str(sweep_dir),
        written=time.strftime("%Y-%m-%d %H:%M"),
        summary=summary(jobs),
        command=sweep_command(sweep_dir),
        images={name: png_data_uri(path) for name, path in images.items()},
        quality=quality,
        searched=list(searched),
        table=html_table(columns, rows),
        failed=[j for j in jobs if not j.finished],
        facets=list(facets),
        net_evals="net_evals" in columns,
        schedules=len({j.schedule for j in jobs}) > 1,  # the schedule is an axis
        dashboard=DASHBOARD_FILE if (Path(sweep_dir) / DASHBOARD_FILE).exists() else None,
        scrub=scrub_runs(jobs),
    )
