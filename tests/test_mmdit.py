"""SD3 and Flux through the same loop: diffexp's decoded samples equal StableDiffusion3Pipeline's and FluxPipeline's
(tiny random pipelines built offline, fp32, 1e-5 max abs) with the pipelines given the same initial latents; their
latent previews; bad input refused with a clear message and a non-zero exit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_main, shared_folder
from diffusers import FluxPipeline
from tiny_mmdit import save_tiny_flux, save_tiny_sd3

import diffexp
from diffexp.sampling.previews import FLUX, SD3, LatentRGB

PROMPTS = ["a cat", "a red dog"]
N = 3  # samples: prompts [a cat, a red dog, a cat]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD3 (with and without T5) and Flux (dev: a guidance embedding; schnell: none), saved once per session."""

    def make(root: Path) -> None:
        save_tiny_sd3(root / "sd3")
        save_tiny_sd3(root / "sd3-no-t5", t5=False)
        save_tiny_flux(root / "flux-dev")
        save_tiny_flux(root / "flux-schnell", guidance_embeds=False)

    root = shared_folder(tmp_path_factory, "tiny-mmdit", make)
    return {name: root / name for name in ("sd3", "sd3-no-t5", "flux-dev", "flux-schnell")}


def diffexp_images(folder: Path, *overrides: str) -> tuple[diffexp.Experiment, torch.Tensor]:
    exp = diffexp.prepare(compose("model=local", f"model.path={folder}", f"batch_size={N}", *overrides))
    final = diffexp.sample(exp.steps())
    return exp, exp.to_pixels(final.x, exact=True)


def flow_solver(config: Any, name: str, **options: Any) -> Any:
    """The scheduler a diffusers user would put in the pipeline: FlowMatch Euler or Heun, or DPM-Solver++ in its
    flow mode at the model's shift."""
    if name == "dpmsolver":
        flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": config["shift"]}
        return diffusers.DPMSolverMultistepScheduler.from_config(config, **flow, **options)
    cls = diffusers.FlowMatchHeunDiscreteScheduler if name == "flow-heun" else diffusers.FlowMatchEulerDiscreteScheduler
    return cls.from_config(config, **options)


def same(ours: torch.Tensor, images: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert ours.shape == images.shape == shape
    assert images.std() > 0.01  # a picture, not a constant
    assert (images - (ours / 2 + 0.5)).abs().max() <= 1e-5  # the pipeline's [0, 1] against diffexp's [-1, 1]


@pytest.mark.parametrize(
    ("model", "scheduler", "scale", "size"),
    [
        ("sd3", "flow-euler", 1.0, (16, 16)),
        ("sd3", "flow-euler", 4.0, (24, 16)),
        ("sd3", "flow-heun", 4.0, (16, 16)),
        ("sd3", "dpmsolver", 4.0, (16, 24)),
        ("sd3-no-t5", "flow-euler", 4.0, (16, 16)),
    ],
)
def test_sd3_equals_its_pipeline(
    tiny: dict[str, Path], model: str, scheduler: str, scale: float, size: tuple[int, int]
) -> None:
    """SD3.5's scheduler config: a static shift of 3."""
    steps, (h, w) = 4, size
    exp, ours = diffexp_images(
        tiny[model],
        f"scheduler={scheduler}",
        f"steps={steps}",
        f"prompt=[{','.join(PROMPTS)}]",
        "negative_prompt=blurry",
        f"guidance_scale={scale}",
        f"height={h}",
        f"width={w}",
        "max_sequence_length=16",
    )
    assert exp.prompts == ["a cat", "a red dog", "a cat"] and exp.loaded.prediction_type == "flow_prediction"
    assert exp.loaded.sample_shape == (16, h // 2, w // 2)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if model == "sd3-no-t5" else {}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny[model], **no_t5)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.shift == 3.0
    pipe.scheduler = flow_solver(pipe.scheduler.config, scheduler)
    images = pipe(
        prompt=exp.prompts,
        negative_prompt=["blurry"] * N,
        guidance_scale=scale,
        num_inference_steps=steps,
        height=h,
        width=w,
        max_sequence_length=16,
        latents=exp.noise,
        output_type="pt",
    ).images
    same(ours, images, (N, 3, h, w))
    assert exp.model.net_evals == (2 if scale > 1 else 1) * exp.total_calls


@pytest.mark.parametrize(
    ("model", "scheduler", "options", "scale", "embed", "size"),
    [
        ("flux-dev", "flow-euler", {}, 1.0, None, (16, 16)),  # dynamic shifting; the pipeline's embed, 3.5
        ("flux-dev", "flow-euler", {}, 4.0, 2.5, (24, 16)),  # true CFG with a negative prompt
        ("flux-dev", "flow-euler", {"use_dynamic_shifting": False, "shift": 3.0}, 1.0, 5.0, (16, 24)),
        ("flux-dev", "dpmsolver", {}, 4.0, 3.5, (16, 16)),  # flow mode, dynamic shift through mu
        ("flux-schnell", "flow-euler", {}, 4.0, None, (24, 16)),  # no guidance embedding
    ],
)
def test_flux_equals_its_pipeline(
    tiny: dict[str, Path],
    model: str,
    scheduler: str,
    options: dict[str, Any],
    scale: float,
    embed: float | None,
    size: tuple[int, int],
) -> None:
    steps, (h, w) = 4, size
    exp, ours = diffexp_images(
        tiny[model],
        f"scheduler={scheduler}",
        *(f"scheduler.{k}={str(v).lower()}" for k, v in options.items()),
        f"steps={steps}",
        f"prompt=[{','.join(PROMPTS)}]",
        "negative_prompt=blurry",
        f"guidance_scale={scale}",
        *([f"guidance_embed={embed}"] if embed is not None else []),
        f"height={h}",
        f"width={w}",
        "max_sequence_length=16",
    )
    assert exp.loaded.sample_shape == (16, h // 2, w // 2)  # unpacked: 16 channels, 2x2 patches of them a token
    dynamic = options.get("use_dynamic_shifting", True)
    assert ("mu" in exp.built.timesteps_kwargs) == dynamic
    pipe = FluxPipeline.from_pretrained(tiny[model])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.use_dynamic_shifting
    pipe.scheduler = flow_solver(pipe.scheduler.config, scheduler, **options)
    images = pipe(
        prompt=exp.prompts,
        negative_prompt=["blurry"] * N,
        true_cfg_scale=scale,
        guidance_scale=3.5 if embed is None else embed,
        num_inference_steps=steps,
        height=h,
        width=w,
        max_sequence_length=16,
        latents=FluxPipeline._pack_latents(exp.noise, N, 16, h // 2, w // 2),
        output_type="pt",
    ).images
    same(ours, images, (N, 3, h, w))
    assert exp.model.net_evals == (2 if scale > 1 else 1) * exp.total_calls
    if model == "flux-schnell":
        assert "guidance" not in exp.model.cond


def test_flux_sample_k_depends_only_on_k(tiny: dict[str, Path]) -> None:
    common = ("scheduler=flow-euler", "steps=3", "prompt=[a cat,a dog]", "guidance_scale=3", "height=16", "width=16")
    common += ("max_sequence_length=8",)
    _, three = diffexp_images(tiny["flux-dev"], *common)
    exp = diffexp.prepare(compose("model=local", f"model.path={tiny['flux-dev']}", *common, "batch_size=1"))
    one = exp.to_pixels(diffexp.sample(exp.steps()).x, exact=True)
    assert (three[:1] - one).abs().max() <= 1e-5


@pytest.mark.parametrize(("model", "rgb"), [("sd3", SD3), ("flux-dev", FLUX)])
def test_preview_latent_maps_the_16_channel_latents_to_rgb(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, rgb: LatentRGB
) -> None:
    """preview=latent: the SD3 and Flux.1 maps apply to the latents the loop holds, 16 channels (Flux's unpacked),
    at every snapshot, with no decoder call; the run writes its grids from them."""
    h, w = 24, 16
    args = ["model=local", f"model.path={tiny[model]}", "scheduler=flow-euler", "steps=2", "log_every=1"]
    args += ["prompt=a cat", "max_sequence_length=8", f"height={h}", f"width={w}", "preview=latent"]
    exp = diffexp.prepare(compose(*args, f"batch_size={N}"))
    assert exp.loaded.latent is not None and exp.loaded.latent.preview_map() is rgb
    snapshots = [state for state in exp.steps() if state.snapshot]
    assert len(snapshots) == 2
    for state in snapshots:
        assert state.x.shape == state.x0.shape == (N, 16, h // 2, w // 2)
        for x in (state.x, state.x0):
            preview = exp.to_pixels(x)
            expected = F.interpolate(rgb(x), scale_factor=2, mode="nearest").clamp(-1, 1)
            assert preview.shape == (N, 3, h, w) and torch.equal(preview, expected) and preview.std() > 0
    final = snapshots[-1].x
    assert not torch.equal(exp.to_pixels(final), exp.to_pixels(final, exact=True))
    out = tmp_path / "run"
    ran = run_main(
        "scripts/run.py", [*args, "logger=none", "progress=false", f"hydra.run.dir={out}"], tmp_path, monkeypatch
    )
    assert ran.returncode == 0, ran.stderr
    assert all((out / "grids" / f"step000{k}_{part}.png").is_file() for k in (1, 2) for part in ("x", "x0"))
    assert json.loads((out / "metrics.json").read_text())["latent"]["preview"] == "latent"


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ("flux-schnell", ["guidance_embed=3.5"], "has no guidance embedding"),
        ("sd3", ["guidance_embed=3.5"], "has no guidance embedding"),
        ("sd3", ["max_sequence_length=100"], "above the limit of .* T5 encoder: 64 tokens"),
        ("flux-dev", ["max_sequence_length=65"], "above the limit of .* T5 encoder: 64 tokens"),
        ("flux-dev", ["height=18"], "must be multiples of 4"),
        ("flux-dev", ["model.t5=false"], "model.t5=false is not allowed"),
        ("sd3", ["cache=first-block"], "returns no text stream .context_pre_only."),
    ],
)
def test_bad_transformer_input_is_refused(
    tiny: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    overrides: list[str],
    message: str,
) -> None:
    args = ["model=local", f"model.path={tiny[model]}", "scheduler=flow-euler", "steps=2", "logger=none", *overrides]
    ran = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert ran.returncode != 0
    assert re.search(message, ran.stderr), ran.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt=[a cat]"], "digits-ideal is unconditional: only text-to-image models"),
        (["max_sequence_length=16"], "max_sequence_length=16 is not allowed: it is the prompt length of a T5"),
        (["guidance_embed=3.5"], "digits-ideal has no guidance embedding"),
        (["model.t5=false"], "digits-ideal has no T5 encoder"),
    ],
)
def test_text_options_on_a_flow_model_without_text_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str
) -> None:
    args = ["model=digits-ideal", "model.parameterisation=flow", "scheduler=flow-euler", "steps=2", "logger=none"]
    ran = run_main("scripts/run.py", [*args, *overrides], tmp_path, monkeypatch)
    assert ran.returncode != 0 and message in ran.stderr, ran.stderr


def test_faster_cache_on_flux_compares_the_pipelines_timestep(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FasterCache's skip range is in the scheduler's timesteps (FluxPipeline's current_timestep), while the
    transformer gets sigma: with sigma, every step would fall in the range and the first would skip uncached."""
    out = tmp_path / "run"
    args = ["model=local", f"model.path={tiny['flux-dev']}", "scheduler=flow-euler", "steps=4", "cache=faster"]
    ran = run_main(
        "scripts/run.py", [*args, "logger=none", "progress=false", f"hydra.run.dir={out}"], tmp_path, monkeypatch
    )
    assert ran.returncode == 0, ran.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cache"]["passes_nominal"] == 4 and metrics["cache_name"].startswith("faster")
