"""The report of a sweep over guidance methods: rows per method within each scale's facet (method x scale), a
method column, and quality against network evaluations per method, where PAG's third pass shows as cost."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import run_cli

from diffexp.report.jobs import Job, facets, label_rows

SWEEP = ["-m", "model=tiny", "model.num_classes=3", "labels=all", "guidance=cfg,pag", "guidance_scale=1.5,3",
         "scheduler=ddim", "steps=3", "batch_size=3", "logger=none", "progress=false",
         "metrics=reference", "metrics.reference.steps=4"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("methods")
    result = run_cli([*SWEEP, f"metrics.cache_dir={cwd / 'cache'}", f"hydra.sweep.dir={cwd / 'sweep'}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "sweep"


def test_a_method_sweep_reports_methods_by_scale_at_their_cost(sweep: Path) -> None:
    with (sweep / "report" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["guidance_scale"], r["guidance"]) for r in rows] == [
        ("1.5", "cfg"), ("1.5", "pag"), ("3.0", "cfg"), ("3.0", "pag")]  # fmt: skip
    assert [r["scheduler"] for r in rows[:2]] == ["ddim cfg", "ddim pag"]  # the method is part of the row
    evals = {r["guidance"]: int(r["net_evals"]) for r in rows}
    assert evals == {"cfg": 2 * 3, "pag": 2 + 3 * 2}  # PAG's perturbed pass after its first step
    assert (sweep / "report" / "methods-ref_rmse.png").stat().st_size > 1000
    assert "Guidance methods at equal network evaluations" in (sweep / "report.html").read_text()
    assert sorted(p.name for p in sweep.glob("*")).count("report") == 1
    assert any(p.name.endswith("ddim-3-pag3") for p in sweep.iterdir())  # the run names its method


def test_a_methods_own_varying_option_joins_its_row() -> None:
    def job(num: int, method: str, eta: float | None) -> Job:
        guidance = {"name": method} | ({"eta": eta} if eta is not None else {})
        config = {"scheduler": {"name": "ddim"}, "steps": 2, "guidance_scale": 3.0, "guidance": guidance}
        return Job(None, num, "finished", config, {"nfe": 2, "net_evals": 4})

    jobs = [job(0, "cfg", None), job(1, "apg", 0.0), job(2, "apg", 1.0)]
    label_rows(jobs)
    assert [j.row for j in jobs] == ["ddim cfg", "ddim apg guidance.eta=0.0", "ddim apg guidance.eta=1.0"]
    assert [g for g, _ in facets(jobs)] == [None]  # one scale: no facet


def test_the_dashboard_of_a_method_sweep_compares_methods_at_equal_net_evals(sweep: Path) -> None:
    from diffexp.report import dashboard
    from diffexp.report.logged import read_logged

    spec = dashboard.build(read_logged([sweep]), "E", "diffexp").to_json()
    outline = {s["section"]: s["panels"] for s in spec["outline"]}
    assert list(outline)[:2] == ["Quality vs cost", "Guidance methods"]
    assert "ref_rmse vs net_evals" in outline["Guidance methods"]
    assert any("guidance method, scale" in p for p in outline["Guidance methods"])
