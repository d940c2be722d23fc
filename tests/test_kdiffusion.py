"""k-diffusion's samplers through the adapter: the seed contract (batch invariance), the loop's states, parity
with diffusers where both sides have the sampler (README, "k-diffusion parity"), and the missing extra."""

from __future__ import annotations

import importlib.util
import sys
import threading

import pytest
import torch
from conftest import compose

from diffexp import DiffexpError, prepare
from diffexp.catalog import K_SAMPLERS
from diffexp.sampling import kload
from diffexp.sampling.loop import sample

needs_k = pytest.mark.skipif(importlib.util.find_spec("k_diffusion") is None, reason="k-diffusion is not installed")


def final(*overrides: str) -> torch.Tensor:
    exp = prepare(compose(*overrides))
    with torch.inference_mode():
        return sample(exp.steps()).x.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@needs_k
@pytest.mark.parametrize("name", sorted(K_SAMPLERS))
def test_a_sample_is_the_same_whatever_the_batch(name: str) -> None:
    steps = [] if name == "k-dpm-adaptive" else ["steps=6"]
    common = ("model=digits-ideal", "model.std=0.3", f"scheduler={name}", *steps)
    two, five = final(*common, "batch_size=2"), final(*common, "batch_size=5")
    assert relative(two, five[:2]) < 1e-5
    assert relative(five[0], five[1]) > 1e-2  # the samples differ: each has its own noise


@needs_k
def test_ancestral_noise_follows_the_seed() -> None:
    common = ("model=digits-ideal", "model.std=0.3", "scheduler=k-euler-ancestral", "steps=6", "batch_size=2")
    assert relative(final(*common, "seed=0"), final(*common, "seed=1")) > 1e-2


@needs_k
def test_states_come_one_call_at_a_time_and_an_early_stop_ends_the_worker() -> None:
    exp = prepare(compose("model=digits-ideal", "scheduler=k-heun", "schedule=karras", "steps=5", "log_every=2"))
    with torch.inference_mode():
        states = list(exp.steps())
    assert [s.step for s in states] == [1, 2, 3, 4, 5] and states[-1].nfe == 9 == exp.total_calls
    assert [s.nfe for s in states] == [2, 4, 6, 8, 9]  # Heun: two calls a step, Euler on the last
    assert [s.snapshot for s in states] == [False, True, False, True, True]
    assert states[0].sigma == pytest.approx(exp.built.sampler.sigmas[0].item(), rel=1e-6)
    before = threading.active_count()
    with torch.inference_mode():
        loop = exp.steps()
        next(loop)
        loop.close()
    assert threading.active_count() <= before


@needs_k
def test_k_euler_karras_equals_diffusers_euler_karras_on_digits_ideal() -> None:
    k = final("model=digits-ideal", "scheduler=k-euler", "schedule=karras", "steps=10")
    d = final("model=digits-ideal", "scheduler=euler", "scheduler.use_karras_sigmas=true", "steps=10")
    assert relative(k, d) < 1e-5


# the README's "equal" rows: (model, k-diffusion sampler, diffusers scheduler and options)
EQUAL = [
    *[
        ("digits-ideal", k, d, o)
        for k, d, o in [
            ("k-euler", "euler", ["scheduler.use_karras_sigmas=true"]),
            ("k-heun", "heun", ["scheduler.use_karras_sigmas=true", "scheduler.clip_sample=false"]),
            ("k-dpm2", "kdpm2", ["scheduler.use_karras_sigmas=true"]),
            ("k-lms", "lms", ["scheduler.use_karras_sigmas=true"]),
            ("k-dpmpp-2m", "dpmsolver", ["scheduler.use_karras_sigmas=true"]),
            ("k-euler-ancestral", "euler-ancestral", []),
            ("k-dpm2-ancestral", "kdpm2-ancestral", ["scheduler.use_karras_sigmas=true"]),
            ("k-dpmpp-sde", "dpmsolver-sde", ["scheduler.use_karras_sigmas=true"]),
        ]
    ],
    ("digits-unet", "k-euler", "euler", ["scheduler.use_karras_sigmas=true"]),
    ("digits-unet", "k-heun", "heun", ["scheduler.use_karras_sigmas=true", "scheduler.clip_sample=false"]),
    ("digits-unet", "k-lms", "lms", ["scheduler.use_karras_sigmas=true"]),
    ("digits-unet", "k-euler-ancestral", "euler-ancestral", []),
    ("digits-unet", "k-dpmpp-sde", "dpmsolver-sde", ["scheduler.use_karras_sigmas=true"]),
]


@needs_k
@pytest.mark.parametrize(("model", "k_name", "name", "options"), EQUAL)
def test_parity_with_diffusers_on_the_same_noise_levels(model: str, k_name: str, name: str, options: list[str]) -> None:
    exp = prepare(compose(f"model={model}", f"scheduler={name}", "steps=10", "batch_size=2", *options))
    with torch.inference_mode():
        ours = sample(exp.steps()).x.float()
    own = [float(v) for v in exp.built.scheduler.sigmas]  # second-order classes repeat each level
    levels = ",".join(f"{v:.10g}" for i, v in enumerate(own) if i == 0 or v != own[i - 1])
    theirs = final(
        f"model={model}", f"scheduler={k_name}", "batch_size=2", "schedule=custom", f"schedule.sigmas=[{levels}]"
    )
    assert relative(theirs, ours) < 1e-5


def test_a_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "k_diffusion.sampling", raising=False)
    monkeypatch.setattr(kload.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiffexpError, match=r"not installed: install the extra.*--no-deps.*numpy<2"):
        prepare(compose("model=digits-ideal", "scheduler=k-euler", "steps=2"))
