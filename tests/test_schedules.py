"""The schedule group: each formula's values pinned, the declarations of what each scheduler takes, and refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose
from diffusers import DDPMScheduler

from diffexp import DiffexpError, prepare
from diffexp.sampling import schedules as S

TABLE = S.model_table(DDPMScheduler(beta_schedule="linear").alphas_cumprod)  # the digits models' (google/ddpm-*)
LO, HI = float(TABLE[0]), float(TABLE[-1])
HAS_K = importlib.util.find_spec("k_diffusion") is not None


def rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


def test_the_model_range_is_the_ddpm_linear_one() -> None:
    assert pytest.approx(0.0100013, rel=1e-5) == LO and pytest.approx(157.40727, rel=1e-6) == HI


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # 10 steps on the google/ddpm-* schedule, computed once with ComfyUI's formulas as cited in the module
        ("simple", [157.4073, 60.2714, 25.5285, 11.9395, 6.1352, 3.4241, 2.0309, 1.2339, 0.7193, 0.3388, 0.0]),
        ("normal", [157.4073, 54.5675, 21.4175, 9.4889, 4.7033, 2.5547, 1.4624, 0.8219, 0.3804, 0.01, 0.0]),
        ("sgm_uniform", [157.4073, 60.3263, 25.5698, 11.9651, 6.1505, 3.4335, 2.037, 1.2383, 0.7227, 0.3419, 0.0]),
        ("ddim_uniform", [61.3789, 25.9454, 12.1109, 6.2121, 3.4619, 2.0514, 1.2464, 0.7279, 0.3457, 0.0148, 0.0]),
        ("beta", [157.4073, 105.9199, 49.0271, 19.5007, 7.8186, 3.443, 1.6886, 0.8786, 0.4228, 0.1437, 0.0]),
    ],
)
def test_table_schedules_pinned(name: str, expected: list[float]) -> None:
    assert rounded(getattr(S, name)(10, TABLE)) == expected


def test_range_schedules_pinned_and_their_ends() -> None:
    kl = S.kl_optimal(10, LO, HI)
    assert rounded(kl) == [157.4073, 5.5246, 2.7244, 1.7285, 1.194, 0.8438, 0.5834, 0.3712, 0.1848, 0.01, 0.0]
    for f in (S.karras, S.exponential, S.polyexponential):
        values = f(10, LO, HI)
        assert len(values) == 11 and values[0] == pytest.approx(HI) and values[-2] == pytest.approx(LO)
    # Karras et al. 2022 eq. 5 at rho = 1 is linear in sigma; exponential is geometric
    assert torch.allclose(S.karras(5, 1.0, 5.0, rho=1.0)[:-1], torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    assert torch.allclose(S.exponential(3, 1.0, 100.0)[:-1], torch.tensor([100.0, 10, 1], dtype=torch.float64))
    assert torch.allclose(S.polyexponential(7, LO, HI, 1.0), S.exponential(7, LO, HI), rtol=1e-12)
    # Mochi's linear-quadratic: first half linear to 0.025, then quadratic to 1 (1 - s, times sigma_max)
    lq = S.linear_quadratic(10, 1.0)
    assert rounded(lq) == [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.932, 0.813, 0.618, 0.347, 0.0]


def test_ays_is_the_published_table_at_10_steps_and_log_linear_otherwise() -> None:
    sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]  # Sabour et al. 2024
    assert rounded(S.ays(10, "sd15")) == sd15
    twenty = S.ays(20, "sd15")
    assert len(twenty) == 21 and twenty[0] == pytest.approx(14.615) and twenty[-2] == pytest.approx(0.152)
    # log sigma is linear between the published points: step 1 of 20 sits at index 9/19 of the way to 6.475
    expected = torch.tensor([14.615, 6.475]).log()
    assert float(twenty[1].log()) == pytest.approx(float(expected[0] + (expected[1] - expected[0]) * 9 / 19 * 1))
    assert rounded(S.ays(10, "svd"))[:3] == [700.0, 54.5, 15.886]


@pytest.mark.skipif(not HAS_K, reason="k-diffusion is not installed")
def test_range_schedules_equal_k_diffusion() -> None:
    from diffexp.sampling.kload import k_sampling

    k = k_sampling()
    pairs = [
        (S.karras(12, LO, HI, 7.0), k.get_sigmas_karras(12, LO, HI, 7.0)),
        (S.exponential(12, LO, HI), k.get_sigmas_exponential(12, LO, HI)),
        (S.polyexponential(12, LO, HI, 2.0), k.get_sigmas_polyexponential(12, LO, HI, 2.0)),
    ]
    for ours, theirs in pairs:
        assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=1e-7)  # k-diffusion works in float32


def refused(*overrides: str) -> str:
    with pytest.raises(DiffexpError) as err:
        prepare(compose("model=digits-ideal", "batch_size=1", "logger=none", *overrides))
    return str(err.value)


def test_refusals_say_why() -> None:
    assert "takes no explicit noise levels" in refused("scheduler=ddim", "schedule=karras")
    assert "takes no explicit noise levels" in refused("scheduler=unipc", "schedule=beta")
    assert "takes no explicit noise levels" in refused("scheduler=k-dpm-fast", "schedule=karras")
    message = refused("scheduler=euler", "schedule=ays")
    assert "no published table for digits-ideal" in message and "sd15" in message and "svd" in message
    assert "not strictly decreasing" in refused("scheduler=euler", "schedule=custom", "schedule.sigmas=[5,6,0]")
    assert "positive" in refused("scheduler=euler", "schedule=custom", "schedule.sigmas=[5,1,-1]")
    assert "0..999" in refused("scheduler=heun", "schedule=custom", "schedule.timesteps=[1200,500]")
    assert "chooses its own steps" in refused("scheduler=k-dpm-adaptive", "steps=12")
    assert "seed contract" in refused("scheduler=k-euler", "scheduler.s_churn=1.0")
    assert "has no option 'bogus'" in refused("scheduler=k-euler", "+scheduler.bogus=1")


def test_a_schedule_reaches_each_kind_of_scheduler_and_is_recorded() -> None:
    for name, key in (("euler", "sigmas"), ("heun", "timesteps"), ("dpmsolver", "timesteps"), ("ddpm", "timesteps")):
        exp = prepare(compose("model=digits-ideal", f"scheduler={name}", "schedule=kl_optimal", "steps=8"))
        assert key in exp.built.timesteps_kwargs
        used = exp.built.effective_config()["schedule"]
        assert used["name"] == "kl_optimal" and used["sigmas"][0] == pytest.approx(HI, rel=1e-3)
        # the levels used are the schedule's, to the rounding of whole timesteps
        assert used["sigmas"][1] == pytest.approx(float(S.kl_optimal(8, LO, HI)[1]), rel=0.05)
    custom = prepare(compose("model=digits-ideal", "scheduler=euler", "schedule=custom", "schedule.sigmas=[80,8,0.8]"))
    assert custom.run.steps == 3 and custom.built.sigmas_used() == pytest.approx([80, 8, 0.8, 0], rel=1e-6)
