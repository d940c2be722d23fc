"""scripts/guidance_grain.py: the digits' own subspace, and each branch's x0 energy outside it."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
from conftest import ROOT, run_cli

from diffexp.sampling.ideal import digits_images


def test_the_digits_lie_in_the_upsampled_8x8_subspace_and_noise_does_not() -> None:
    grain = runpy.run_path(str(ROOT / "scripts" / "guidance_grain.py"), run_name="grain")
    projection = grain["off_subspace"]()
    assert torch.allclose(projection @ projection, projection, atol=1e-4)  # a projection
    assert round(torch.trace(projection).item()) == 1024 - 64  # onto a complement of 64 dimensions
    assert grain["energy"](digits_images()[:100], projection) < 1e-10
    assert grain["energy"](torch.randn(100, 1, 32, 32), projection) > 0.9  # 960 of 1024 unit-variance directions


def test_guidance_at_scale_1_is_the_conditional_branch(tmp_path: Path) -> None:
    args = ["digits-cond", "--samples", "8", "--timesteps", "50", "--scales", "1", "5"]
    result = run_cli(args, cwd=tmp_path, script="scripts/guidance_grain.py")
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| digits-cond | 50 |"))
    cond, uncond, difference, scale_1, scale_5 = (c.strip() for c in row.strip("|").split("|")[2:])
    assert scale_1 == cond and float(scale_5) > float(cond) > 0 and float(uncond) > 0
    assert 0 <= float(difference.split("(")[1].rstrip(")")) <= 2
