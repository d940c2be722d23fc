"""scripts/guidance_table.py: the model card's method x scale x scheduler table, with each method's cost, and the
card's section replaced in place."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.slow  # four runs of digits-cond through the script, twice
def test_the_table_names_each_method_with_its_cost(tmp_path: Path) -> None:
    args = ["--samples", "2", "--methods", "cfg,pag", "--scales", "3", "--schedulers", "dpmsolver", "--steps", "4",
            "--out", str(tmp_path / "table")]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, script="scripts/guidance_table.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| dpmsolver")]
    assert [line.split(" | ")[1:3] for line in lines] == [["cfg", "8"], ["pag", "11"]]  # 2 x 4; 2 + 3 x 3
    again = run_cli(args, cwd=tmp_path, script="scripts/guidance_table.py")  # finished runs are read back
    assert again.returncode == 0 and [x for x in again.stdout.splitlines() if x.startswith("| dpmsolver")] == lines
