"""The convergence study's pieces: step counts for a target NFE, the order fit, and the script end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose, run_cli, run_main

import diffexp
from diffexp.sweep.convergence import fit_order, steps_for_nfe, theory_order


def test_fit_order_recovers_the_slope_of_a_power_law() -> None:
    nfe = [20, 40, 80, 160]
    assert fit_order(nfe, [3.0 * n**-2 for n in nfe]) == pytest.approx(2.0)
    assert fit_order(nfe, [0.5 * n**-1 for n in nfe]) == pytest.approx(1.0)
    assert fit_order([20], [0.1]) is None  # one point has no slope


@pytest.mark.parametrize("name,target,steps", [("heun", 160, 80), ("heun", 5, 3), ("dpmsolver", 160, 160)])
def test_steps_for_a_target_nfe(name: str, target: int, steps: int) -> None:
    exp = diffexp.prepare(compose("model=digits-ideal", f"scheduler={name}", "steps=1", "batch_size=1"))
    assert steps_for_nfe(exp, target) == steps


def test_theory_orders() -> None:
    assert theory_order("ddim", {}) == theory_order("euler", {}) == 1
    assert theory_order("heun", {}) == theory_order("dpmsolver", {"solver_order": 2}) == 2
    assert theory_order("dpmsolver", {"solver_order": 3}) == 3
    assert theory_order("unipc", {"solver_order": 2}) == 3


@pytest.mark.slow
def test_the_convergence_script_prints_tables_and_writes_results(tmp_path: Path) -> None:
    args = ["--schedulers", "ddim,dpmsolver", "--nfe", "10,20,40", "--spacings", "linspace", "--clip", "off"]
    args += ["--batch-size", "2", "--fit-min-nfe", "10", "--out", str(tmp_path / "out")]
    args += ["metrics.reference.steps=100", f"metrics.cache_dir={tmp_path / 'cache'}"]
    done = run_cli(args, tmp_path, script="scripts/convergence.py")
    assert done.returncode == 0, done.stderr
    assert "| dpmsolver |" in done.stdout and "order (fit)" in done.stdout
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {r["scheduler"] for r in rows} == {"ddim", "dpmsolver"}
    assert all(r["order"] > 0.5 for r in rows)  # both converge on the smooth model
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--clip", "maybe"], "argument --clip: 'maybe': use off, on"),
        (["--nfe", "0"], "argument --nfe: 0 is not a positive integer"),
        (["--nfe", "10,abc"], "argument --nfe: 'abc' is not an integer"),
        (["--spacings", "linear"], "argument --spacings: 'linear': use leading, linspace, trailing"),
        (["--batch-size", "-1"], "argument --batch-size: -1 is not a positive integer"),
    ],
)
def test_bad_arguments_are_refused_by_argparse(
    option: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_main("scripts/convergence.py", option, tmp_path, monkeypatch)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
