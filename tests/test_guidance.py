"""Class labels and classifier-free guidance: equal to the CFG formula written out, labels by sample index,
net_evals, the guidance interval, every prediction type, and clear refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import compose, run_main
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling.experiment import prepare
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG
from diffexp.sampling.loop import sample
from diffexp.sampling.noise import log_sigmas, sigma_at

COND = ["model=tiny", "model.num_classes=3", "steps=6"]


def by_hand(unet: torch.nn.Module, scheduler, labels: list[int], scale: float, rescale: float = 0.0) -> torch.Tensor:
    """The book's loop with classifier-free guidance written out, from the same per-sample noise."""
    n = len(labels)
    gens = [torch.Generator().manual_seed(k) for k in range(n)]
    scheduler.set_timesteps(6)
    x = randn_tensor((n, 3, 16, 16), generator=gens) * scheduler.init_noise_sigma
    cond, null = torch.tensor(labels), torch.full((n,), 3)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            both = unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([null, cond])).sample
            out_uncond, out_cond = both.chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
            if rescale:
                # Lin et al. 2023, eq. 15-16: rescale towards the conditional output's std, then mix
                rescaled = out * (out_cond.std(dim=(1, 2, 3), keepdim=True) / out.std(dim=(1, 2, 3), keepdim=True))
                out = rescale * rescaled + (1 - rescale) * out
            kwargs = {"generator": gens} if isinstance(scheduler, EulerAncestralDiscreteScheduler) else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize(
    ("name", "cls", "rescale"),
    [
        ("ddim", DDIMScheduler, 0.0),
        ("euler-ancestral", EulerAncestralDiscreteScheduler, 0.0),
        ("ddim", DDIMScheduler, 0.7),
    ],
)
def test_guided_sampling_equals_the_cfg_formula(name: str, cls: type, rescale: float) -> None:
    labels = [0, 1, 2, 1]
    exp = prepare(compose(*COND, f"scheduler={name}", "batch_size=4", "labels=[0,1,2,1]", "guidance_scale=3",
                          f"guidance_rescale={rescale}"))  # fmt: skip
    final = sample(exp.steps())
    expected = by_hand(exp.loaded.model, cls.from_config(DDPM_SCHEDULER_CONFIG), labels, 3.0, rescale)
    assert (final.x - expected).abs().max() < 1e-6
    assert final.nfe == 6 and final.net_evals == 12  # one call on a doubled batch: two network evaluations


def test_a_label_depends_only_on_the_sample_index() -> None:
    small = prepare(compose(*COND, "labels=all", "guidance_scale=2", "batch_size=2", "scheduler=euler-ancestral"))
    large = prepare(compose(*COND, "labels=all", "guidance_scale=2", "batch_size=5", "scheduler=euler-ancestral"))
    assert small.labels == [0, 1] and large.labels == [0, 1, 2, 0, 1]
    assert torch.allclose(sample(small.steps()).x, sample(large.steps()).x[:2], atol=1e-5)
    assert prepare(compose(*COND, "labels=[2,0]", "batch_size=5")).labels == [2, 0, 2, 0, 2]


def test_guidance_interval_guides_only_within_its_noise_levels() -> None:
    exp = prepare(compose(*COND, "labels=all", "guidance_scale=4", "guidance_interval=[0.5,5.0]", "scheduler=ddim"))
    final = sample(exp.steps())
    sigmas = sigma_at(log_sigmas(exp.built.scheduler.alphas_cumprod), exp.built.scheduler.timesteps)
    guided = int(((sigmas >= 0.5) & (sigmas <= 5.0)).sum())
    assert 0 < guided < 6 and final.net_evals == 6 + guided


def test_unguided_conditional_sampling_makes_one_evaluation_per_call() -> None:
    final = sample(prepare(compose(*COND, "labels=all", "scheduler=ddim")).steps())
    assert final.nfe == final.net_evals == 6


BAD = {
    "label outside the classes": (["model=tiny", "model.num_classes=3", "labels=[5]"], "outside [0, 3)"),
    "labels for an unconditional model": (["model=tiny", "labels=all"], "is unconditional"),
    "guidance without a null class": (["model=tiny", "guidance_scale=2"], "needs a conditional model"),
    "negative guidance": (["model=tiny", "model.num_classes=3", "labels=all", "guidance_scale=-1"], ">= 0"),
    "interval not increasing": (
        ["model=tiny", "model.num_classes=3", "labels=all", "guidance_scale=2", "guidance_interval=[5,1]"],
        "two increasing noise levels",
    ),
    "prediction type against the model": (
        ["model=tiny", "+scheduler.prediction_type=v_prediction"],
        "contradicts the model, which predicts epsilon",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conditioning_is_refused_before_sampling(case: str) -> None:
    args, message = BAD[case]
    with pytest.raises(DiffexpError, match=re.escape(message)):
        prepare(compose(*args))


def test_bad_conditioning_exits_clearly_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main("scripts/run.py", ["model=tiny", "labels=all"], tmp_path, monkeypatch)
    assert result.returncode == 2 and "is unconditional" in result.stderr and "Traceback" not in result.stderr
    (run,) = tmp_path.glob("outputs/runs/*/*")
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert not (run / "metrics.json").exists()


def test_the_run_records_labels_guidance_and_prediction_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*COND, "labels=all", "guidance_scale=2.5", "batch_size=3", "scheduler=unipc", "logger=none"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    (run,) = tmp_path.glob("outputs/runs/*/*")
    assert run.name.endswith("unipc-6-cfg2.5")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["labels"] == [0, 1, 2] and metrics["guidance"]["scale"] == 2.5
    assert metrics["prediction_type"] == "epsilon" and metrics["net_evals"] == 12
    assert [json.loads(line)["net_evals"] for line in (run / "steps.jsonl").read_text().splitlines()][-1] == 12


def test_digits_cond_draws_the_requested_classes_under_guidance(tmp_path: Path) -> None:
    cfg = compose("model=digits-cond", "labels=all", "guidance_scale=3", "scheduler=dpmsolver", "steps=20",
                  "batch_size=20", "metrics.cache_dir=" + str(tmp_path))  # fmt: skip
    metrics = diffexp.run(cfg, tmp_path / "run")
    assert metrics["labels"] == [k % 10 for k in range(20)] and metrics["net_evals"] == 40
    assert metrics["label_agreement"] >= 0.85 and metrics["classes_produced"] == 10
    # a sample above the noise limit is never recognisable, and only recognisable samples count as accurate
    assert metrics["recognisable"] <= 1 - metrics["noisy_share"] + 1e-9
    assert metrics["label_accuracy"] <= metrics["recognisable"] and metrics["residual_noise_real"] == "digits"
