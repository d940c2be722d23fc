"""The loop against diffusers' own pipelines, the seed contract, NaN detection and the Python API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

import diffexp
from diffexp.errors import NonFiniteError
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG, DigitsIdealDenoiser, digits_images
from diffexp.sampling.loop import check_finite, iter_steps, sample
from diffexp.sampling.models import LoadedModel, tiny_unet


def final_images(overrides: list[str]) -> np.ndarray:
    exp = diffexp.prepare(compose("model=tiny", *overrides))
    x = list(exp.steps())[-1].x
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_reproduces_ddpm_pipeline(steps: int) -> None:
    pipe = DDPMPipeline(unet=tiny_unet().eval(), scheduler=DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG))
    expected = pipe(batch_size=3, generator=generators(7, 3), num_inference_steps=steps, output_type="np").images
    ours = final_images(["scheduler=ddpm", f"steps={steps}", "batch_size=3", "seed=7"])
    assert np.abs(ours - expected).max() < 1e-6


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_ddim_pipeline(eta: float) -> None:
    pipe = DDIMPipeline(unet=tiny_unet().eval(), scheduler=DDIMScheduler.from_config(DDPM_SCHEDULER_CONFIG))
    expected = pipe(batch_size=2, generator=generators(3, 2), eta=eta, num_inference_steps=12, output_type="np").images
    ours = final_images(["scheduler=ddim", f"scheduler.eta={eta}", "steps=12", "batch_size=2", "seed=3"])
    assert np.abs(ours - expected).max() < 1e-6


@pytest.mark.parametrize("name", ["ddpm", "euler-ancestral", "dpmsolver", "kdpm2-ancestral"])
def test_sample_k_is_the_same_whatever_the_batch_size(name: str) -> None:
    def run(batch: int) -> torch.Tensor:
        exp = diffexp.prepare(compose("model=digits-ideal", f"scheduler={name}", "steps=8", f"batch_size={batch}"))
        return list(exp.steps())[-1].x

    small, large = run(2), run(5)
    assert torch.allclose(small, large[:2], atol=1e-5)
    assert not torch.allclose(large[2], large[3])  # and samples differ from one another


def test_every_scheduler_starts_from_the_same_noise() -> None:
    # the x the loop starts from, divided by the scheduler's initial sigma, is sample k's N(0, 1) draw from a
    # generator seeded seed + k, whatever the scheduler (their initial sigmas differ: 1 for DDIM, ~80 for Euler)
    expected = torch.stack([torch.randn((1, 32, 32), generator=g) for g in generators(5, 3)])
    for name in ["ddim", "euler", "heun"]:
        exp = diffexp.prepare(compose("model=digits-ideal", f"scheduler={name}", "steps=5", "batch_size=3", "seed=5"))
        scheduler, first = exp.built.scheduler, []
        scale = scheduler.scale_model_input
        scheduler.scale_model_input = lambda x, t, scale=scale, first=first: first.append(x.clone()) or scale(x, t)
        next(iter(exp.steps()))
        start = first[0] / scheduler.init_noise_sigma
        assert torch.allclose(start, expected, rtol=1e-6, atol=1e-6), name
        assert name == "ddim" or scheduler.init_noise_sigma > 10  # the scaling above was not a no-op


class NaNAfter(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.model, self.calls, self.left = model, calls, calls

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.left -= 1
        eps = self.model(x, t).sample
        return eps * float("nan") if self.left < 0 else eps


def test_non_finite_values_stop_the_run_with_the_step() -> None:
    built = diffexp.build_scheduler("heun", DDPM_SCHEDULER_CONFIG)
    noise, gens = diffexp.initial_noise((1, 32, 32), 0, 2, torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="NaN/Inf at step 3 \\(model call 5\\)"):
        sample(iter_steps(NaNAfter(DigitsIdealDenoiser(), 4), built.scheduler, noise, 6, gens))


def test_the_sums_name_the_first_bad_call_what_went_bad_and_who() -> None:
    inf, nan = float("inf"), float("nan")
    steps, times = [1, 1, 2, 2, 3], torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0])
    rows = [[1.0, 2.0, 3.0], [1.0, 2.0, nan], [1.0, inf, 3.0], [nan, nan, nan]]  # calls 2..5 (index 1..4)
    with pytest.raises(NonFiniteError, match="at step 2 \\(model call 4\\): the predicted x0") as caught:
        check_finite(torch.tensor(rows), 1, steps, times)  # call 3's NaN output went nowhere: no error there
    assert not caught.value.by_model
    with pytest.raises(NonFiniteError, match="sample x") as caught:
        check_finite(torch.tensor([[nan, 1.0, inf]]), 4, steps, times)
    assert caught.value.by_model and caught.value.call == 5
    check_finite(torch.tensor([[1e300, -1e300, 0.0]], dtype=torch.float64), 0, steps, times)  # large is finite


def test_observer_callbacks_do_not_change_the_maths() -> None:
    built = diffexp.build_scheduler("euler-ancestral", DDPM_SCHEDULER_CONFIG)
    model = diffexp.pixel_adapter(DigitsIdealDenoiser())
    seen: list[int] = []
    noise, gens = diffexp.initial_noise((1, 32, 32), 0, 2, torch.device("cpu"))
    with_callback = sample(iter_steps(model, built.scheduler, noise, 6, gens), lambda s: seen.append(s.nfe)).x
    noise, gens = diffexp.initial_noise((1, 32, 32), 0, 2, torch.device("cpu"))
    without = sample(iter_steps(model, built.scheduler, noise, 6, gens)).x
    assert torch.equal(with_callback, without) and seen == [1, 2, 3, 4, 5, 6]


def test_any_module_called_like_a_unet_can_be_sampled() -> None:
    mine = LoadedModel(DigitsIdealDenoiser(sample_size=16, std=0.3), dict(DDPM_SCHEDULER_CONFIG), "mine")
    exp = diffexp.prepare(compose("scheduler=dpmsolver", "steps=10", "batch_size=3"), model=mine)
    states = [s for s in exp.steps() if s.snapshot]
    assert [s.step for s in states] == [10] and states[-1].x.shape == (3, 1, 16, 16)
    assert exp.label == "dpmsolver-10"


def test_ideal_denoiser_sigma_matches_the_schedule_and_lands_on_the_data() -> None:
    model = DigitsIdealDenoiser()
    abar = DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG).alphas_cumprod.double()
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(model.sigma(t), ((1 - abar[t]) / abar[t]).sqrt())
    # at low noise the posterior mean is the nearest training image
    y = digits_images(32)[:2]
    assert torch.allclose(model.denoise(y.double() + 1e-3, torch.full((2,), 0.01, dtype=torch.float64)).float(), y)
    exp = diffexp.prepare(compose("model=digits-ideal", "scheduler=dpmsolver", "steps=30", "batch_size=4"))
    final = list(iter_steps(exp.model, exp.built.scheduler, exp.noise, 30, exp.generators))[-1].x
    data = digits_images(32).flatten(1)
    nearest = torch.cdist(final.flatten(1), data).min(dim=1).values
    assert (nearest < 0.5).all()


def test_a_local_pipeline_folder_loads_and_samples(tmp_path) -> None:
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG)).save_pretrained(tmp_path)
    exp = diffexp.prepare(compose("model=local", f"model.path={tmp_path}", "scheduler=unipc", "steps=4"))
    assert exp.loaded.scheduler_config["beta_end"] == DDPM_SCHEDULER_CONFIG["beta_end"]
    assert torch.isfinite(list(exp.steps())[-1].x).all()


def test_reduced_precision_runs_the_model_in_it_and_the_loop_in_float32() -> None:
    exp = diffexp.prepare(compose("model=tiny", "precision=bf16", "scheduler=euler", "steps=4"))
    assert next(exp.loaded.model.parameters()).dtype == torch.bfloat16
    final = list(exp.steps())[-1]
    assert final.x.dtype == torch.float32 and torch.isfinite(final.x).all()
