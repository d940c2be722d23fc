"""Perturbation guiders on the latent families with their declared default layers: PAG on Stable Diffusion's mid
block and a DiT's middle block, SLG on their transformer blocks. Each makes the formula's passes and changes the
output (a hook that matched nothing would leave CFG's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose
from tiny_latent import save_tiny_dit, save_tiny_sd

from diffexp.sampling.experiment import prepare
from diffexp.sampling.loop import sample

STEPS = 4


@pytest.fixture(scope="module")
def latent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guiders")
    return {"sd": save_tiny_sd(root / "sd"), "dit": save_tiny_dit(root / "dit")}


def final(family: str, latent: dict[str, Path], *args: str) -> tuple[torch.Tensor, int]:
    condition = "prompt=[a cat,a dog]" if family == "sd" else "labels=[3,7]"
    exp = prepare(compose("model=local", f"model.path={latent[family]}", condition, "guidance_scale=3",
                          "scheduler=ddim", f"steps={STEPS}", "batch_size=2", *args))  # fmt: skip
    state = sample(exp.steps())
    return state.x, state.net_evals


@pytest.mark.parametrize(
    ("family", "args"),
    [
        ("sd", ["guidance=pag"]),
        ("dit", ["guidance=pag"]),
        ("sd", ["guidance=slg", "guidance.skip_start=0", "guidance.skip_stop=1"]),
        ("dit", ["guidance=slg", "guidance.skip_start=0", "guidance.skip_stop=1"]),
    ],
)
def test_default_layers_perturb_each_family(family: str, args: list[str], latent: dict[str, Path]) -> None:
    cfg_x, cfg_evals = final(family, latent, "guidance=cfg")
    x, evals = final(family, latent, *args)
    assert cfg_evals == 2 * STEPS and evals == 2 + 3 * (STEPS - 1)  # perturbed strictly after the first step
    assert (x - cfg_x).abs().max() > 1e-4  # the named layers exist and the perturbation acted
