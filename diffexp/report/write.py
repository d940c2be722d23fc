"""The comparison report of a sweep, written into the sweep folder: python scripts/compare.py SWEEP_DIR

- ``report/grid.png``: rows are schedulers (with options), columns are step counts, each cell the first samples
  of that run (same seeds everywhere), captioned with NFE, sampling time and (if labelled) the samples' classes;
  failed cells are marked. Where the guidance scale varies it is a facet: ``report/grid-cfg<g>.png`` per scale,
  and grid.png stacks them all.
- ``report/trajectories.png``: per scheduler, x0 at each snapshot of its longest run ("step k of N").
- ``report/<metric>.png|svg``: each quality metric against NFE, wall time (and net evals, where guided runs count
  them apart), one line per scheduler, with the Pareto front; ``report/cost.png|svg``: wall time against NFE.
- ``report/methods-<metric>.png|svg`` (the guidance method varies): each quality metric against network
  evaluations per sample, one colour per method, so methods compare at equal cost;
- ``report/guidance-<metric>.png|svg`` (guidance scale varies): each quality metric against the guidance scale,
  a panel per step count, a line per scheduler.
- ``report/table.csv``, ``report/table.md``, ``report/report.json``: one row per job.
- ``report.html``: all of the above in one offline page (images embedded as data URIs).

Quality metrics are whichever of the declared ones (``diffexp.metrics.suite.QUALITY``) the runs' metrics.json
hold, so the report works with any metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from diffexp.errors import DiffexpError
from diffexp.folders import write_json
from diffexp.metrics.base import Better
from diffexp.metrics.suite import QUALITY, STATED_WITH
from diffexp.report.grid import caption, grid_figure, trajectory_figure
from diffexp.report.jobs import Job, facet_title, facets, load_jobs
from diffexp.report.page import render_page, summary
from diffexp.report.plots import cost_figure, guidance_figure, methods_figure, quality_figure, schedule_figure
from diffexp.report.tables import table_rows, write_csv, write_markdown

REPORT_DIR = "report"  # in the sweep folder: the figures and tables
HTML_FILE = "report.html"  # in the sweep folder: the page


@dataclass
class Report:
    """What was written, and the table ready for ``wandb.Table(columns=report.columns, data=report.table_data())``
    once the ``samples`` column (the run's samples.png relative to ``sweep_dir``, or None for a run that did not
    finish) is wrapped in ``wandb.Image``; the figures are in ``files``."""

    sweep_dir: Path
    jobs: list[Job]
    quality: dict[str, Better]  # the quality keys present in these runs, and which way is better
    columns: list[str]
    rows: list[dict[str, Any]]
    files: dict[str, Path]

    @property
    def html(self) -> Path:
        return self.files["html"]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if not j.finished]

    def table_data(self) -> list[list[Any]]:
        return [[row[c] for c in self.columns] for row in self.rows]


def _save(fig: Figure, path: Path, svg: bool = False) -> Path:
    """The figure as PNG at ``path`` (and SVG beside it)."""
    fig.savefig(path, facecolor="white")
    if svg:
        fig.savefig(path.with_suffix(".svg"), facecolor="white")
    return path


def facet_name(g: float) -> str:
    """The name (and file stem) of a guidance facet's grid."""
    return f"grid-cfg{g:g}"


def _figures(jobs: list[Job], quality: Mapping[str, Better], title: str, out: Path) -> dict[str, Path]:
    """Every figure as a PNG in ``out``, by name: grid (and one per guidance facet), each quality key (and it
    against guidance), cost and (if saved) trajectories; each quality key with the values it is stated with."""
    images = {"grid": _save(grid_figure(jobs, list(quality), title, STATED_WITH), out / "grid.png")}
    groups = [(g, group) for g, group in facets(jobs) if g is not None]
    for g, group in groups:
        figure = grid_figure(group, list(quality), f"{title} · {facet_title(g)}", STATED_WITH)
        images[facet_name(g)] = _save(figure, out / f"{facet_name(g)}.png")
    for key, better in quality.items():
        stated = STATED_WITH.get(key, ())
        images[key] = _save(quality_figure(jobs, key, better, stated), out / f"{key}.png", svg=True)
        if groups:
            figure = guidance_figure(jobs, key, better, stated)
            images[f"guidance-{key}"] = _save(figure, out / f"guidance-{key}.png", True)
        if len({j.method for j in jobs}) > 1:  # the methods at equal network evaluations
            figure = methods_figure(jobs, key, better, stated)
            images[f"methods-{key}"] = _save(figure, out / f"methods-{key}.png", True)
    images["cost"] = _save(cost_figure(jobs), out / "cost.png", svg=True)
    levels = schedule_figure(jobs)
    if levels is not None:
        images["schedules"] = _save(levels, out / "schedules.png", svg=True)
    strips = trajectory_figure(jobs)
    if strips is not None:
        images["trajectories"] = _save(strips, out / "trajectories.png")
    return images


def writable_folder(where: Path) -> Path:
    """``where/report``, created; a clear refusal where it cannot be written (a read-only sweep folder)."""
    out = where / REPORT_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DiffexpError(
            f"cannot write the report into {where} ({err.strerror or err}): the folder is read-only or full. "
            "Write it elsewhere with: python scripts/compare.py SWEEP_DIR --out DIR."
        ) from None
    return out


def write_report(sweep_dir: Path, quality: Mapping[str, Better] = QUALITY, out_dir: Path | None = None) -> Report:
    """Write every part of the report into ``out_dir`` (default ``sweep_dir``); ``quality`` maps metrics.json
    keys to their direction."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs = load_jobs(sweep_dir)
    present = {k: b for k, b in quality.items() if any(j.value(k) is not None for j in jobs if j.finished)}
    where = Path(out_dir).resolve() if out_dir is not None else sweep_dir
    out = writable_folder(where)
    title = f"Scheduler comparison: {summary(jobs)['model']}"
    scales = [g for g, _ in facets(jobs) if g is not None]  # the guidance facets, if the scale varies
    images = _figures(jobs, present, title, out)
    columns, rows = table_rows(jobs, list(present), sweep_dir, STATED_WITH)
    files = {**images, "csv": write_csv(out / "table.csv", columns, rows)}
    files["md"] = write_markdown(out / "table.md", columns, rows)
    report = Report(sweep_dir, jobs, present, columns, rows, files)
    page = render_page(
        sweep_dir=sweep_dir, jobs=jobs, quality=present, columns=columns, rows=rows, images=images, title=title,
        searched=list(quality), facets=[(facet_title(g), facet_name(g)) for g in scales],
    )  # fmt: skip
    files["html"] = where / HTML_FILE
    files["html"].write_text(page)
    captions = {j.folder.name: caption(j, list(present), stated=STATED_WITH) for j in jobs if j.folder and j.finished}
    write_json(out / "report.json", {"quality": present, "columns": columns, "rows": rows, "captions": captions})
    return report
