"""scripts/model_card_table.py: a model card's scheduler x steps table from diffexp runs, with a row per cache
setting that gives the passes that ran and the agreement with the uncached run from the same noise."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli


def test_cache_rows_give_their_passes_and_their_distance_to_the_uncached_run(tmp_path: Path) -> None:
    args = ["digits-dit", "--schedulers", "ddim", "--steps", "6", "--guidance", "1", "--num-samples", "4",
            "--caches", "none", "first-block", "--out", str(tmp_path / "card")]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, script="scripts/model_card_table.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    head = "| scheduler | steps | guidance | cache | net evals (ran/nominal) | ref_rmse vs uncached |"
    assert lines[0].startswith(head)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[:4] for row in rows] == [["ddim", "6", "1", "none"], ["ddim", "6", "1", "first-block"]]
    assert rows[0][4:6] == ["6/6", "-"]  # the uncached run: every pass, no distance to itself
    ran, nominal = map(int, rows[1][4].split("/"))
    assert ran <= nominal == 6 and 0 <= float(rows[1][5]) < 0.1
    assert {p.name for p in (tmp_path / "card/digits-dit").iterdir()} == {"ddim-6-cfg1", "ddim-6-cfg1-first-block"}
