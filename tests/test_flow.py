"""Flow-matching models: x0 = x - sigma v in every flow-capable scheduler (an oracle knows the answer), the exact
velocity of the digits, the noise-level contract on the flow path, the shift, and what is refused or warned about."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose
from diffusers import FlowMatchEulerDiscreteScheduler

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling.flow import dynamic_mu, flow_warnings
from diffexp.sampling.ideal import FLOW_SCHEDULER_CONFIG, DigitsIdealDenoiser, digits_images
from diffexp.sampling.loop import iter_steps
from diffexp.sampling.schedulers import build_scheduler

FLOW_SCHEDULERS = ["flow-euler", "flow-heun", "dpmsolver", "dpmsolver-single", "unipc", "deis", "sasolver"]
DETERMINISTIC = {"sasolver": {"tau_func": None}}


class FlowOracle(torch.nn.Module):
    """Knows the clean images y: at x = (1 - sigma) y + sigma n, its velocity is n - y = (x - y) / sigma, with
    sigma = t / 1000 (for a solver in flow mode, its own rounded timestep: so x0 is exact only where t is)."""

    prediction_type = "flow_prediction"

    def __init__(self, y: torch.Tensor) -> None:
        super().__init__()
        self.y = y

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.sigma = float(t) / 1000
        return (x - self.y) / self.sigma


def flow(*overrides: str) -> diffexp.Experiment:
    return diffexp.prepare(
        compose("model=digits-ideal", "model.parameterisation=flow", "model.sample_size=16", *overrides)
    )


@pytest.mark.parametrize("name", ["flow-euler", "flow-heun"])
def test_x0_is_exact_with_a_flow_oracle(name: str) -> None:
    y = digits_images(16)[[3, 11]]
    built = build_scheduler(name, FLOW_SCHEDULER_CONFIG)
    noise, generators = diffexp.initial_noise((1, 16, 16), 5, 2, torch.device("cpu"))
    states = list(iter_steps(FlowOracle(y), built.scheduler, noise, 8, generators, built.step_kwargs))
    for s in states:
        assert (s.x0 - y).abs().max() < 1e-4, f"x0 is off at call {s.nfe} (sigma={s.sigma})"
        assert s.sigma == pytest.approx(s.timestep / 1000)  # what the network got, beside sigma
    assert (states[-1].x - y).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["dpmsolver", "dpmsolver-single", "unipc", "deis"])
def test_x0_of_a_solver_in_flow_mode_is_x_minus_sigma_v(name: str) -> None:
    """In flow mode these solvers give the network integer timesteps: the oracle's sigma is t / 1000, the
    solver's its own, and x0 = x - sigma_solver v is off from y by (1 - sigma_solver / sigma_net) (x - y), which
    is at most the rounding (1e-3) times |n - y|."""
    y = digits_images(16)[[3, 11]]
    built = build_scheduler(name, FLOW_SCHEDULER_CONFIG)
    noise, generators = diffexp.initial_noise((1, 16, 16), 5, 2, torch.device("cpu"))
    oracle = FlowOracle(y)
    bound = 1e-3 * (noise - y).abs().max().item() * 1.01
    for s in iter_steps(oracle, built.scheduler, noise, 8, generators, built.step_kwargs):
        assert abs(s.sigma - oracle.sigma) <= 1e-3 + 1e-9  # the rounding the warning names
        assert (s.x0 - y).abs().max() <= bound + 1e-5, f"x0 is off at call {s.nfe} (sigma={s.sigma})"


def test_the_exact_velocity_is_the_ideal_denoiser_on_the_flow_path() -> None:
    """x = (1 - sigma) x0 + sigma n is x / (1 - sigma) = x0 + sigma / (1 - sigma) n: the same posterior mean."""
    flow_model = DigitsIdealDenoiser(16, 0.3, "flow_prediction")
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.2, 0.5, 0.9):
        s = torch.full((3,), sigma, dtype=torch.float64)
        v = flow_model.flow_velocity(x, s)
        expected = flow_model.denoise(x / (1 - sigma), s / (1 - s))
        assert torch.allclose(x - sigma * v, expected, atol=1e-10)


def test_flow_samples_are_clean_and_converge() -> None:
    fine = diffexp.sample(flow("scheduler=flow-heun", "steps=100", "model.std=0.5").steps()).x
    errors = {}
    for name, steps in itertools.product(["flow-euler", "flow-heun", "unipc"], (10, 40)):
        x = diffexp.sample(flow(f"scheduler={name}", f"steps={steps}", "model.std=0.5").steps()).x
        errors[(name, steps)] = (x - fine).pow(2).mean().sqrt().item()
    for name in ("flow-euler", "flow-heun", "unipc"):
        assert errors[(name, 40)] < errors[(name, 10)], errors
    assert errors[("flow-heun", 40)] < errors[("flow-euler", 40)] / 5, errors  # second order against first


def test_denoise_on_the_flow_path_drives_an_euler_equal_to_flow_euler() -> None:
    exp = flow("scheduler=flow-euler", "steps=8", "scheduler.shift=3")
    expected = diffexp.sample(exp.steps()).x
    sigmas = exp.built.scheduler.sigmas
    x = exp.noise * sigmas[0]
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x = x + (x - exp.model.denoise(x, sigma)) / sigma * (sigma_next - sigma)
    assert (x - expected).abs().max() < 1e-5


def test_shift_and_dynamic_shift_are_the_pipelines() -> None:
    plain = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain.set_timesteps(6)
    exp = flow("scheduler=flow-euler", "steps=6", "scheduler.shift=3")
    assert torch.allclose(exp.built.scheduler.sigmas, plain.sigmas)
    exp = flow("scheduler=flow-euler", "steps=6", "scheduler.use_dynamic_shifting=true")
    mu = dynamic_mu(dict(exp.built.scheduler.config), 8 * 8)  # 16 px: 8x8 tokens of 2x2
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(6, mu=mu)
    assert exp.built.timesteps_kwargs == {"mu": mu} and torch.allclose(exp.built.scheduler.sigmas, dynamic.sigmas)


def test_what_the_network_really_gets_is_warned_about() -> None:
    said = {name: " ".join(flow(f"scheduler={name}", "steps=10").built.warnings) for name in FLOW_SCHEDULERS}
    assert "ends at sigma=0.0999" in said["deis"] and "ends at sigma" in said["sasolver"]
    assert "starts at sigma=0.999" in said["dpmsolver"] and "rounds the network's timestep" in said["dpmsolver"]
    assert not said["flow-euler"] and not said["flow-heun"]
    assert flow_warnings(flow("scheduler=flow-euler", "steps=4").built.scheduler) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.parameterisation=vp", "scheduler=flow-euler"], "cannot sample a model that predicts epsilon"),
        (["scheduler=ddim"], "cannot sample a model that predicts flow_prediction"),
        (["scheduler=flow-euler", "scheduler.shift=0"], "shift=0 is not allowed"),
        (["scheduler=dpmsolver", "scheduler.flow_shift=-1"], "flow_shift=-1 is not allowed"),
        (["scheduler=flow-heun", "+scheduler.use_dynamic_shifting=true"], "has no option 'use_dynamic_shifting'"),
        (["model.prediction_type=v_prediction"], "does not apply with model.parameterisation=flow"),
    ],
)
def test_bad_flow_input_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(DiffexpError, match=message):
        flow("steps=4", *overrides)


@pytest.mark.parametrize(("k_name", "name"), [("k-euler", "flow-euler"), ("k-heun", "flow-heun")])
def test_k_diffusion_on_the_flow_path_equals_the_flow_scheduler(k_name: str, name: str) -> None:
    """ComfyUI's CONST: k-diffusion's samplers on x = (1 - sigma) x0 + sigma eps through denoise(x, sigma)."""
    expected = diffexp.sample(flow(f"scheduler={name}", "steps=6").steps())
    got = diffexp.sample(flow(f"scheduler={k_name}", "steps=6").steps())
    assert got.nfe == expected.nfe
    assert (got.x - expected.x).abs().max() < 1e-5


def test_stochastic_k_samplers_are_refused_on_the_flow_path() -> None:
    with pytest.raises(DiffexpError, match="leaves the flow path"):
        flow("scheduler=k-euler-ancestral", "steps=6")
