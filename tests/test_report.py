"""Pieces of the comparison report that need no sweep: the Pareto front, the table, options and row labels."""

from __future__ import annotations

import pytest

from diffexp.report.jobs import Job, label_rows, options_text
from diffexp.report.plots import pareto_front
from diffexp.report.tables import markdown_table


@pytest.mark.parametrize(
    ("x", "y", "better", "front"),
    [
        ([5, 10, 20, 50], [0.3, 0.1, 0.2, 0.05], "lower", [0, 1, 3]),  # 20 steps is beaten by 10
        ([5, 10, 20, 50], [20.0, 30.0, 25.0, 40.0], "higher", [0, 1, 3]),
        ([10, 10, 20], [0.2, 0.1, 0.1], "lower", [1]),  # same cost: only the better; same quality: the cheaper
        ([3.0], [1.0], "lower", [0]),
    ],
)
def test_pareto_front(x: list[float], y: list[float], better: str, front: list[int]) -> None:
    assert pareto_front(x, y, better) == front


def test_options_text_names_only_what_differs_from_diffusers_defaults() -> None:
    scheduler = {"name": "dpmsolver", "use_karras_sigmas": True, "solver_order": 2, "thresholding": None}
    assert options_text(scheduler) == "use_karras_sigmas=True"
    assert options_text({"name": "ddim", "eta": 0.0}) == ""


def test_rows_name_the_scheduler_and_every_other_setting_that_varies() -> None:
    def job(num: int, scheduler: dict, steps: int, std: float) -> Job:
        config = {"scheduler": scheduler, "steps": steps, "model": {"name": "digits-ideal", "std": std}, "seed": 0}
        return Job(None, num, "finished", config)

    jobs = [
        job(0, {"name": "dpmsolver", "use_karras_sigmas": True}, 5, 0.0),
        job(1, {"name": "dpmsolver", "use_karras_sigmas": False}, 10, 0.0),
        job(2, {"name": "ddim"}, 5, 0.3),
    ]
    label_rows(jobs)
    assert [j.row for j in jobs] == ["dpmsolver-karras model.std=0.0", "dpmsolver model.std=0.0", "ddim model.std=0.3"]


def test_markdown_table_escapes_and_shortens_errors() -> None:
    columns = ["scheduler", "steps", "wall_s", "ref_rmse", "status", "error", "folder", "samples"]
    rows = [
        {"scheduler": "ddim", "steps": 5, "wall_s": 0.123456, "ref_rmse": 0.01234567, "status": "finished",
         "error": "", "folder": "0-x", "samples": "0-x/samples.png"},
        {"scheduler": "pndm", "steps": 2, "wall_s": None, "ref_rmse": None, "status": "failed",
         "error": "a|b " + "word " * 40, "folder": "1-x", "samples": None},
    ]  # fmt: skip
    lines = markdown_table(columns, rows).splitlines()
    assert lines[0] == "| scheduler | steps | time (s) | ref_rmse | status | error |"
    assert lines[2] == "| ddim | 5 | 0.123 | 0.01235 | finished |  |"
    assert "a\\|b" in lines[3] and lines[3].endswith("… |") and len(lines[3]) < 140
