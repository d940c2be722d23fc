"""The adapter contract: ``denoise(x, sigma)`` drives a noise-level sampler written here from its formula, and it
agrees with diffusers' EulerDiscreteScheduler on the same sigmas, for every family and parameterisation; an
adapter is immutable, and ``with_samples`` binds a chunk without copying anything by hand."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from conftest import compose
from diffusers import EulerDiscreteScheduler
from tiny_latent import save_tiny_dit, save_tiny_sd

import diffexp
from diffexp.sampling.adapters import Adapter, ClassAdapter, DiTAdapter, TextAdapter

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@pytest.fixture(scope="module")
def latent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"sd": save_tiny_sd(root / "sd"), "dit": save_tiny_dit(root / "dit")}


def experiment(family: str, latent: dict[str, Path]) -> diffexp.Experiment:
    overrides = {
        "pixel": ["model=tiny"],
        "class": ["model=tiny", "model.num_classes=3", "labels=[0,2]", "guidance_scale=2"],
        "sd": ["model=local", f"model.path={latent.get('sd')}", "prompt=[a cat,a dog]", "guidance_scale=3"],
        "dit": ["model=local", f"model.path={latent.get('dit')}", "labels=[3,7]", "guidance_scale=2"],
    }[family]
    return diffexp.prepare(compose("scheduler=euler", "steps=2", "batch_size=2", *overrides))


def euler_by_diffusers(adapter: Adapter, config: dict, noise: torch.Tensor, steps: int, **options) -> torch.Tensor:
    scheduler = EulerDiscreteScheduler.from_config(config, prediction_type=adapter.prediction_type, **options)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        x = scheduler.step(adapter.output(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def euler_by_formula(adapter: Adapter, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 without the correction: dx/dsigma = (x - D(x, sigma)) / sigma."""
    x = noise * sigmas[0]
    for sigma, sigma_next in itertools.pairwise(sigmas):
        d = (x - adapter.denoise(x, sigma)) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@pytest.mark.parametrize("options", [{"timestep_spacing": "trailing"}, {"use_karras_sigmas": True}])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("family", ["pixel", "class", "sd", "dit"])
def test_a_noise_level_euler_from_denoise_equals_diffusers_euler(
    family: str, prediction: str, options: dict, latent: dict[str, Path]
) -> None:
    exp = experiment(family, latent)
    adapter = dataclasses.replace(exp.model, prediction_type=prediction)  # the same network, read another way
    reference = EulerDiscreteScheduler.from_config(exp.loaded.scheduler_config, prediction_type=prediction, **options)
    reference.set_timesteps(6)
    with torch.inference_mode():
        expected = euler_by_diffusers(adapter, exp.loaded.scheduler_config, exp.noise, 6, **options)
        calls = adapter.calls
        got = euler_by_formula(adapter, reference.sigmas, exp.noise)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert adapter.calls == 2 * calls == 12  # NFE is counted by the adapter, whichever sampler calls it
    guided = exp.run.guidance.enabled
    assert adapter.net_evals == (2 if guided else 1) * adapter.calls


def test_x0_of_an_output_inverts_each_parameterisation() -> None:
    exp = experiment("pixel", {})
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(400.0)
    alpha, sigma = exp.model.schedule.alpha_sigma(t)
    x = alpha * x0 + sigma * eps
    outputs = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
    for prediction, output in outputs.items():
        adapter = dataclasses.replace(exp.model, prediction_type=prediction)
        assert torch.allclose(adapter.x0(output, x, t), x0, atol=1e-5), prediction


def test_families_and_chunks(latent: dict[str, Path]) -> None:
    expected = {"pixel": Adapter, "class": ClassAdapter, "sd": TextAdapter, "dit": DiTAdapter}
    for family, cls in expected.items():
        exp = experiment(family, latent)
        assert type(exp.model) is cls
        with pytest.raises(dataclasses.FrozenInstanceError):
            exp.model.prediction_type = "sample"  # type: ignore[misc]
        other = exp.for_samples(range(5, 7))
        assert other.model.samples == range(5, 7) and exp.model.samples == range(0, 2)
        assert other.model.network is exp.model.network and other.model.guidance is exp.model.guidance
        if family == "class":
            assert exp.labels == [0, 2] and other.labels == [2, 0]
        if family == "sd":
            assert exp.prompts == ["a cat", "a dog"] and other.prompts == ["a dog", "a cat"]
            cond = other.model.cond["encoder_hidden_states"]
            assert torch.equal(cond[0], exp.model.cond["encoder_hidden_states"][1])  # each prompt encoded once
