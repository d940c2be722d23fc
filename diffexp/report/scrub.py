"""The report's scrubber: every finished run's x0 and x at each snapshot, for one step slider that moves them all.

Runs are aligned by the fraction of their trajectory (step / steps) or by noise level (log sigma), as the reader
picks on the page; each run shows its snapshot nearest to the slider. The grids are the run folders' own
(``grids/step<k>_{x,x0}.png``, written at every snapshot), embedded so the page stays one offline file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffexp.images import png_data_uri
from diffexp.report.jobs import Job


def snapshots(folder: Path) -> list[dict[str, Any]]:
    """A run's snapshots (steps.jsonl) whose grids exist: step, fraction of the run, sigma and both images."""
    records = folder / "steps.jsonl"
    if not records.is_file():
        return []
    out = []
    for line in records.read_text().splitlines():
        record = json.loads(line)
        step, steps, sigma = int(record["step"]), int(record["num_steps"]), record.get("sigma")
        x0, x = folder / "grids" / f"step{step:04d}_x0.png", folder / "grids" / f"step{step:04d}_x.png"
        if not x0.is_file():
            continue
        finite = isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0
        out.append(
            {
                "step": step,
                "fraction": step / steps,
                "log_sigma": math.log(sigma) if finite else None,
                "x0": png_data_uri(x0),
                "x": png_data_uri(x) if x.is_file() else None,
            }
        )
    return out


def scrub_runs(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Every finished run that has snapshots, labelled as in the grid (its series and steps)."""
    runs = []
    for job in jobs:
        if job.finished and job.folder is not None and (shots := snapshots(job.folder)):
            runs.append({"label": f"{job.series}, {job.steps} steps", "snapshots": shots})
    return runs
