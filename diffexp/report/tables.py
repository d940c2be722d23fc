"""The table of a sweep's runs: one row per job in grid order, written as CSV and Markdown."""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffexp.guidance_settings import guided as guided_scale
from diffexp.report.jobs import Job, facets, guided, layout, options_text

MEASURES = ("nfe", "wall_s", "images_per_s", "peak_mem_mb")  # metrics.json keys every finished run holds
HIDDEN = ("folder", "samples")  # columns for programs (W&B, report.json), not for readers

# column -> header for readers; other columns are headed by their key
HEADERS = {
    "scheduler": "scheduler",
    "options": "options",
    "steps": "steps",
    "schedule": "schedule",
    "guidance": "guidance method",
    "guidance_scale": "guidance scale",
    "nfe": "NFE",
    "net_evals": "net evals",
    "wall_s": "time (s)",
    "images_per_s": "images/s",
    "peak_mem_mb": "memory (MB)",
    "status": "status",
    "error": "error",
    "fid_n": "FID n",
    "fid_features": "FID features",
}


def measures(jobs: Sequence[Job]) -> list[str]:
    """MEASURES, with net evals after NFE where guided runs count them apart."""
    return [*MEASURES[:1], "net_evals", *MEASURES[1:]] if guided(jobs) else list(MEASURES)


def table_rows(
    jobs: Sequence[Job], quality: Sequence[str], sweep_dir: Path, stated: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns, and one row per job in grid order (facet by facet); ``samples`` is the run's samples.png
    relative to ``sweep_dir``, or None for a run that did not finish. The quality columns are followed by the keys
    each is ``stated`` with (FID: its sample count and feature network)."""
    scale = ["guidance_scale"] if any(guided_scale(j.guidance) for j in jobs) else []  # guided or varying
    method = ["guidance"] if any(j.method != "cfg" for j in jobs) else []  # a method other than cfg
    schedule = ["schedule"] if any(j.schedule != "default" for j in jobs) else []  # a schedule of its own
    measured = [*measures(jobs), *quality]
    measured += list(dict.fromkeys(s for q in quality for s in (stated or {}).get(q, ()) if s not in measured))
    columns = ["scheduler", "options", *schedule, "steps", *method, *scale, *measured, "status", "error", *HIDDEN]
    rows_order, steps_order, _ = layout(jobs)
    facet_order = [g for g, _ in facets(jobs)]
    ordered = sorted(
        jobs, key=lambda j: (facet_order.index(j.facet), rows_order.index(j.row), steps_order.index(j.steps), j.num)
    )
    rows = []
    for j in ordered:
        samples = j.folder / "samples.png" if j.folder and j.finished else None
        rows.append(
            {
                "scheduler": j.row,
                "options": options_text(j.config["scheduler"]),
                **({"schedule": j.schedule} if schedule else {}),
                "steps": j.steps,
                **({"guidance": j.method} if method else {}),
                **({"guidance_scale": j.guidance} if scale else {}),
                **{k: j.metrics.get(k) for k in measured},
                "status": j.status,
                "error": j.error or "",
                "folder": j.folder.name if j.folder else "",
                "samples": str(samples.relative_to(sweep_dir)) if samples and samples.exists() else None,
            }
        )
    return columns, rows


def format_value(key: str, v: Any) -> str:
    """A cell as text: times to 3 digits, memory in whole MB, other floats to 4 digits, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        if key == "wall_s":
            return f"{v:.3g}"
        if key == "peak_mem_mb":
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


def shown_columns(columns: Sequence[str]) -> list[str]:
    """The columns a reader sees."""
    return [c for c in columns if c not in HIDDEN]


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Every column, numbers unrounded, None as empty."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)
    return path


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The shown columns as a Markdown table, errors shortened and pipes escaped."""
    shown = shown_columns(columns)

    def cell(c: str, v: Any) -> str:
        text = textwrap.shorten(format_value(c, v), 80, placeholder=" …") if c == "error" else format_value(c, v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text(markdown_table(columns, rows))
    return path
