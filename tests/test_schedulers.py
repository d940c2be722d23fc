"""Every scheduler, through the one loop: finite runs, exact NFE, exact x0 on an oracle model, option checks."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

import diffexp
from diffexp.catalog import SCHEDULERS, scheduler_spec
from diffexp.errors import DiffexpError
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG, digits_images
from diffexp.sampling.loop import iter_steps
from diffexp.sampling.schedulers import build_scheduler

SECOND_ORDER = {"heun", "kdpm2", "kdpm2-ancestral", "dpmsolver-sde", "flow-heun"}


def expected_nfe(name: str, n: int, skip_prk: bool = False) -> int:
    if name in SECOND_ORDER:
        return 2 * n - 1
    if name == "pndm":
        return n + 1 if skip_prk else n + 9
    return n


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_with_exact_nfe(name: str) -> None:
    flow = ["model.parameterisation=flow"] if name.startswith("flow-") else []  # flow schedulers: a flow model
    exp = diffexp.prepare(
        compose("model=digits-ideal", *flow, f"scheduler={name}", "steps=6", "batch_size=2", "log_every=2")
    )
    states = list(exp.steps())
    final = states[-1]
    assert torch.isfinite(final.x).all() and final.x.shape == (2, 1, 32, 32)
    assert exp.model.calls == final.nfe == expected_nfe(name, 6)
    # a displayed step is a completed full step: 1..N, snapshots every log_every of them plus the last
    assert final.step == 6 and [s.step for s in states if s.snapshot] == [2, 4, 6]
    assert sum(s.full_step for s in states) == 6


def test_pndm_plms_only_makes_n_plus_one_calls() -> None:
    exp = diffexp.prepare(compose("model=digits-ideal", "scheduler=pndm", "scheduler.skip_prk_steps=true", "steps=7"))
    final = list(exp.steps())[-1]
    assert exp.model.calls == final.nfe == expected_nfe("pndm", 7, skip_prk=True) and final.step == 7


class Oracle(torch.nn.Module):
    """Returns the exact noise, v or clean image of x for a known clean image y, at the noise level the scheduler
    assigns to x, as ``prediction_type`` says."""

    def __init__(self, scheduler: object, y: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.scheduler, self.y, self.unscaled, self.prediction_type = scheduler, y, None, prediction_type
        scale = scheduler.scale_model_input

        def remember(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.unscaled = x
            return scale(x, t)

        scheduler.scale_model_input = remember

    def forward(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, x = self.scheduler, self.unscaled.double()
        if not torch.equal(x_in, self.unscaled):
            # sigma space (Euler, Heun, KDPM2, LMS, SDE): x = y + sigma n, the model sees x / sqrt(sigma^2 + 1)
            sigma = ((x / x_in.double()).mean() ** 2 - 1).sqrt()
            alpha = (1 + sigma**2).rsqrt()
            x, sigma = x * alpha, sigma * alpha  # the same point in VP variables: x = alpha y + sigma_vp n
        elif hasattr(s, "_sigma_to_alpha_sigma_t"):  # DPM-Solver, DEIS, UniPC, SA-Solver: VP space
            alpha, sigma = s._sigma_to_alpha_sigma_t(s.sigmas[s.step_index or 0].double())
        else:  # DDPM, DDIM, PNDM: integer timesteps into alphas_cumprod
            abar = s.alphas_cumprod[int(t)].double()
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = (x - alpha * self.y) / sigma
        if self.prediction_type == "v_prediction":
            return (alpha * eps - sigma * self.y).float()
        return (self.y if self.prediction_type == "sample" else eps).float()


def test_a_refused_prediction_type_names_the_k_diffusion_sampler_that_takes_it() -> None:
    model_config = DDPM_SCHEDULER_CONFIG | {"prediction_type": "sample"}
    with pytest.raises(DiffexpError, match=r"Choose another scheduler \(k-euler-ancestral is k-diffusion's"):
        build_scheduler("euler-ancestral", model_config)
    with pytest.raises(DiffexpError, match=r"Choose another scheduler\.$"):
        build_scheduler("pndm", model_config)  # no k-diffusion sampler of that name


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_x0_is_exact_with_an_oracle_model(name: str, prediction_type: str) -> None:
    y = digits_images(32)[[3, 11]].double()
    options = {"clip_sample": False} if name in ("ddpm", "ddim") else {}
    model_config = DDPM_SCHEDULER_CONFIG | {"prediction_type": prediction_type}
    if prediction_type not in scheduler_spec({"name": name}).prediction_types:
        with pytest.raises(DiffexpError, match=f"cannot sample a model that predicts {prediction_type}"):
            build_scheduler(name, model_config, options)
        return
    built = build_scheduler(name, model_config, options)
    noise = diffexp.initial_noise((1, 32, 32), seed=5, batch_size=2, device=torch.device("cpu"))
    oracle = Oracle(built.scheduler, y, prediction_type)
    states = list(iter_steps(oracle, built.scheduler, noise[0], 8, noise[1], built.step_kwargs))
    for s in states:
        assert (s.x0.double() - y).abs().max() < 2e-3, f"x0 is off at call {s.nfe} (t={s.timestep})"
    # the final sample lands on y; PNDM, DEIS and SA-Solver stop at the first timestep's small noise by design
    tolerance = 0.1 if name in ("pndm", "deis", "sasolver") else 2e-3
    assert (states[-1].x.double() - y).abs().max() < tolerance


def test_unknown_and_mistyped_options_are_refused() -> None:
    with pytest.raises(DiffexpError, match="has no option 'use_karras_sigmas'"):
        build_scheduler("euler-ancestral", DDPM_SCHEDULER_CONFIG, {"use_karras_sigmas": True})
    with pytest.raises(DiffexpError, match="timestep_spacing"):
        build_scheduler("ddim", DDPM_SCHEDULER_CONFIG, {"timestep_spacing": "sideways"})
    with pytest.raises(DiffexpError, match="use_karras_sigmas"):
        build_scheduler("euler", DDPM_SCHEDULER_CONFIG, {"use_karras_sigmas": "yes"})
    with pytest.raises(DiffexpError, match="Only one of"):
        build_scheduler("dpmsolver", DDPM_SCHEDULER_CONFIG, {"use_karras_sigmas": True, "use_beta_sigmas": True})


@pytest.mark.parametrize("name", ["edm-euler", "EDMEulerScheduler", "lcm", "FlowMatchEulerDiscreteScheduler", "nope"])
def test_schedulers_that_cannot_drive_the_model_are_refused_with_the_valid_names(name: str) -> None:
    with pytest.raises(DiffexpError) as err:
        build_scheduler(name, DDPM_SCHEDULER_CONFIG)
    assert all(valid in str(err.value) for valid in SCHEDULERS)


def test_options_reach_the_scheduler_and_its_record() -> None:
    built = build_scheduler("dpmsolver", DDPM_SCHEDULER_CONFIG, {"use_karras_sigmas": True, "solver_order": 3})
    record = built.effective_config()
    assert record["class"] == "DPMSolverMultistepScheduler"
    assert record["config"]["use_karras_sigmas"] is True and record["config"]["solver_order"] == 3
    # the betas are the model's, and the settings' hash changes with them
    assert record["config"]["beta_end"] == DDPM_SCHEDULER_CONFIG["beta_end"]
    assert record["hash"] != build_scheduler("dpmsolver", DDPM_SCHEDULER_CONFIG).effective_config()["hash"]
    ddim = build_scheduler("ddim", DDPM_SCHEDULER_CONFIG, {"eta": 1.0})
    assert ddim.step_kwargs == {"eta": 1.0} and "eta" not in ddim.scheduler.config


def test_clipping_inherited_from_the_model_is_reported() -> None:
    assert any("clip_sample" in w for w in build_scheduler("ddim", DDPM_SCHEDULER_CONFIG).warnings)
    assert not build_scheduler("ddim", DDPM_SCHEDULER_CONFIG, {"clip_sample": False}).warnings
    assert not build_scheduler("euler", DDPM_SCHEDULER_CONFIG).warnings


def test_betas_come_from_the_model_even_where_the_class_defaults_differ() -> None:
    # Heun defaults to Stable Diffusion's betas; from_config must carry the model's
    heun = build_scheduler("heun", DDPM_SCHEDULER_CONFIG).scheduler
    ddpm = build_scheduler("ddpm", DDPM_SCHEDULER_CONFIG).scheduler
    assert torch.equal(heun.alphas_cumprod, ddpm.alphas_cumprod)


def test_labels_name_only_what_differs_from_the_defaults() -> None:
    assert scheduler_spec({"name": "ddim", "eta": 0.0, "timestep_spacing": "leading"}).label == "ddim"
    assert scheduler_spec({"name": "dpmsolver", "use_karras_sigmas": True}).label == "dpmsolver-karras"
    assert scheduler_spec({"name": "ddim", "eta": 1.0}).label == "ddim-eta1"
