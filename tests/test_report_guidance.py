"""The report of a guided sweep: the guidance scale as a third axis (a grid per scale, quality against scale),
net evals as a cost, and the classes of labelled samples in the captions."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, shared_folder

from diffexp.folders import job_folders
from diffexp.report.grid import caption
from diffexp.report.jobs import Job, facets, guided, label_rows
from diffexp.report.plots import cost_axes
from diffexp.report.tables import table_rows
from diffexp.report.write import write_report

# 2 guidance scales x 2 schedulers x 2 step counts on the tiny class-conditional model; the reference (a few
# steps of the same guided ODE) gives quality metrics to plot against the guidance scale
GUIDED = [
    "-m",
    "model=tiny",
    "model.num_classes=3",
    "labels=all",
    "guidance_scale=1,3",
    "scheduler=ddim,euler",
    "steps=2,3",
    "batch_size=4",
    "logger=none",
    "progress=false",
    "metrics=reference",
    "metrics.reference.steps=4",
]


@pytest.fixture(scope="session")
def guided_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The guided sweep, run once per session; tests copy it before changing it."""

    def make(cwd: Path) -> None:
        args = [*GUIDED, f"metrics.cache_dir={cwd / 'cache'}", f"hydra.sweep.dir={cwd / 'sweep'}"]
        result = run_cli(args, cwd=cwd)
        (cwd / "result.json").write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))

    cwd = shared_folder(tmp_path_factory, "guided-sweep", make)
    return cwd / "sweep", subprocess.CompletedProcess(*json.loads((cwd / "result.json").read_text()))


def _table(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "report" / "table.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_guided_sweep_is_faceted_by_guidance_scale(
    guided_sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    sweep_dir, result = guided_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    out = sweep_dir / "report"  # written by the sweep itself when it ended
    for name in ("grid.png", "grid-cfg1.png", "grid-cfg3.png", "guidance-ref_rmse.png", "guidance-ref_rmse.svg"):
        assert (out / name).stat().st_size > 1000, name
    page = (sweep_dir / "report.html").read_text()
    assert page.index("<h3>guidance scale 1</h3>") < page.index("<h3>guidance scale 3</h3>")
    assert "Quality against guidance scale" in page
    assert "net evals</b> counts network evaluations per sample" in page
    assert '<th class="">net evals</th>' in page and '<th class="">guidance scale</th>' in page

    rows = _table(sweep_dir)
    assert len(rows) == 8
    for row in rows:
        scale, nfe, net = float(row["guidance_scale"]), int(row["nfe"]), int(row["net_evals"])
        assert net == (2 * nfe if scale == 3 else nfe), row
        assert row["scheduler"] in ("ddim", "euler")  # the facet is not repeated in the row label
    assert [float(r["guidance_scale"]) for r in rows] == [1.0] * 4 + [3.0] * 4  # facet by facet

    report = json.loads((out / "report.json").read_text())
    assert {"net_evals", "guidance_scale"} <= set(report["columns"])
    captions = report["captions"]
    assert len(captions) == 8 and all(c.endswith("\nclasses 0 1 2 0") for c in captions.values()), captions


@pytest.mark.parametrize(("scales", "guided_runs"), [((1,), False), ((3,), True)])
def test_one_guidance_scale_gives_no_facets(
    guided_sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, scales: tuple, guided_runs: bool
) -> None:
    """The jobs of one scale as a sweep of their own: no facet files; net evals and the scale only if guided."""
    sweep_dir = tmp_path / "sweep"
    for folder in job_folders(guided_sweep[0]):
        if json.loads((folder / "metrics.json").read_text())["guidance"]["scale"] in scales:
            shutil.copytree(folder, sweep_dir / folder.name)
    report = write_report(sweep_dir, quality={"ref_rmse": "lower"})
    names = {p.name for p in (sweep_dir / "report").iterdir()}
    assert "grid.png" in names and not [n for n in names if n.startswith(("grid-cfg", "guidance-"))]
    assert ("net_evals" in report.columns) == ("guidance_scale" in report.columns) == guided_runs
    page = report.html.read_text()
    assert ("net evals" in page) == guided_runs and "guidance scale 1" not in page and 'id="grid"' in page
    assert len(report.rows) == 4 and all(r["scheduler"] in ("ddim", "euler") for r in report.rows)


def _job(num: int, name: str, steps: int, scale: float | None, **metrics: object) -> Job:
    config = {"scheduler": {"name": name}, "steps": steps, "seed": 0, "model": {"name": "tiny"}}
    if scale is not None:
        config["guidance_scale"] = scale
    return Job(None, num, "finished", config, dict(metrics))


def test_guidance_scale_is_the_facet_not_part_of_the_row() -> None:
    jobs = [_job(i, s, 2, g, nfe=2, net_evals=4 if g > 1 else 2) for i, (g, s) in enumerate(
        (g, s) for g in (4.0, 1.0) for s in ("ddim", "euler"))]  # fmt: skip
    for j in jobs:  # another varying setting stays in the row label
        j.config["guidance_rescale"] = 0.7 if j.num == 3 else 0.0
    label_rows(jobs)
    assert [j.row.split(" ", 1)[-1] for j in jobs] == ["guidance_rescale=0.0"] * 3 + ["guidance_rescale=0.7"]
    assert [(g, [j.num for j in group]) for g, group in facets(jobs)] == [(1.0, [2, 3]), (4.0, [0, 1])]
    assert jobs[0].series == "ddim guidance_rescale=0.0, guidance 4" and guided(jobs)
    assert list(cost_axes(jobs)) == ["nfe", "wall_s", "net_evals"]
    columns, rows = table_rows(jobs, [], Path("."))
    assert columns[:6] == ["scheduler", "options", "steps", "guidance_scale", "nfe", "net_evals"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 1.0, 4.0, 4.0]


def test_sweeps_without_guidance_keep_their_rows_and_columns() -> None:
    jobs = [_job(0, "ddim", 2, None, nfe=2), _job(1, "euler", 4, None, nfe=4, net_evals=4)]
    label_rows(jobs)
    assert [(j.row, j.facet, j.guidance) for j in jobs] == [("ddim", None, 1.0), ("euler", None, 1.0)]
    assert facets(jobs) == [(None, jobs)] and not guided(jobs) and list(cost_axes(jobs)) == ["nfe", "wall_s"]
    columns, _ = table_rows(jobs, [], Path("."))
    assert "guidance_scale" not in columns and "net_evals" not in columns


def test_caption_names_the_classes_of_the_samples_shown() -> None:
    job = _job(0, "ddim", 2, 3.0, nfe=2, wall_s=0.05, ref_rmse=0.1234, labels=[7, 1, 2, 3, 4, 5])
    assert caption(job, ["ref_rmse"], 4) == "NFE 2 · 50 ms\nref_rmse 0.1234\nclasses 7 1 2 3"
    assert caption(_job(1, "ddim", 2, None, nfe=2, wall_s=2.5, labels=None), []) == "NFE 2 · 2.50 s"
