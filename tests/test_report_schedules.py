"""The report of a sweep over noise schedules: the schedule is an axis of its own, beside the sampler. Rows are
sampler x schedule, grouped sampler by sampler; the table has a schedule column; each chart line is one (sampler,
schedule), coloured by its sampler and dashed by its schedule."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import run_cli

from diffexp.report.jobs import Job, label_rows, layout, load_jobs
from diffexp.report.plots import lines

# 2 samplers x 2 schedules x 2 step counts on the tiny model
SWEEP = ["-m", "model=tiny", "scheduler=euler,dpmsolver", "schedule=karras,exponential", "steps=2,3",
         "batch_size=2", "logger=none", "progress=false", "metrics=reference", "metrics.reference.steps=4"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("schedules")
    result = run_cli([*SWEEP, f"metrics.cache_dir={cwd / 'cache'}", f"hydra.sweep.dir={cwd / 'sweep'}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "sweep"


def test_a_schedule_sweep_has_a_schedule_column_and_a_line_per_sampler_and_schedule(sweep: Path) -> None:
    with (sweep / "report" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["scheduler"], r["schedule"], r["steps"]) for r in rows] == [
        (f"{sampler} {schedule}", schedule, steps)
        for sampler in ("euler", "dpmsolver")
        for schedule in ("karras", "exponential")
        for steps in ("2", "3")
    ]  # sampler by sampler, each with its schedules

    drawn = lines(load_jobs(sweep), "nfe", "ref_rmse")  # what the quality chart draws
    pairs = [(sampler, schedule) for sampler in ("euler", "dpmsolver") for schedule in ("karras", "exponential")]
    assert [(line.sampler, line.schedule) for line in drawn] == pairs
    assert all([x for x, _ in line.points] == [2, 3] for line in drawn)  # one point per step count
    color = {line.sampler: line.color for line in drawn}
    dash = {line.schedule: line.linestyle for line in drawn}
    assert len(set(color.values())) == 2 and len(set(dash.values())) == 2  # colour: sampler; dash: schedule
    assert all(line.color == color[line.sampler] and line.linestyle == dash[line.schedule] for line in drawn)

    page = (sweep / "report.html").read_text()
    assert "Samples: schedulers × schedules × steps" in page and '<th class="text">schedule</th>' in page
    assert (sweep / "report" / "schedules.png").stat().st_size > 1000


def test_rows_are_grouped_by_sampler_and_a_schedules_own_option_joins_only_its_rows() -> None:
    def job(num: int, scheduler: str, schedule: dict) -> Job:
        config = {"scheduler": {"name": scheduler}, "steps": 4, "schedule": schedule}
        return Job(None, num, "finished", config, {"nfe": 4})

    karras5, karras7 = {"name": "karras", "rho": 5.0}, {"name": "karras", "rho": 7.0}
    beta = {"name": "beta", "rho": 7.0}  # a key the schema gives every schedule, not varying among beta's runs
    jobs = [job(0, "euler", karras5), job(1, "heun", karras5), job(2, "euler", beta), job(3, "heun", karras7)]
    label_rows(jobs)
    assert layout(jobs).rows == [
        "euler karras schedule.rho=5.0",
        "euler beta",
        "heun karras schedule.rho=5.0",
        "heun karras schedule.rho=7.0",
    ]
    assert {j.sampler for j in jobs} == {"euler", "heun"}

    plain = [job(0, "euler", {"name": "default"}), job(1, "heun", {"name": "default"})]
    label_rows(plain)
    assert [j.row for j in plain] == ["euler", "heun"] and not any(j.schedule_label for j in plain)
