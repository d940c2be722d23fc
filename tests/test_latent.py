"""Latent models through the same loop: diffexp's decoded samples equal StableDiffusionPipeline's and DiTPipeline's
(tiny random pipelines built offline, fp32, 1e-5 max abs); the run folder; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import compose, run_main, shared_folder
from tiny_latent import save_tiny_dit, save_tiny_sd

import diffexp
from diffexp.errors import DiffexpError

CLASSES = {
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="session")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Stable Diffusion pipelines (epsilon and v-prediction), saved once per session."""
    kinds = ("epsilon", "v_prediction")
    root = shared_folder(tmp_path_factory, "tiny-sd", lambda root: [save_tiny_sd(root / p, p) for p in kinds])
    return {p: root / p for p in kinds}


@pytest.fixture(scope="session")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiT pipeline, saved once per session."""
    return shared_folder(tmp_path_factory, "tiny-dit", lambda root: save_tiny_dit(root / "dit")) / "dit"


def diffexp_images(folder: Path, *overrides: str) -> tuple[diffexp.Experiment, torch.Tensor]:
    exp = diffexp.prepare(compose("model=local", f"model.path={folder}", *overrides))
    final = diffexp.sample(exp.steps())
    return exp, exp.to_pixels(final.x, exact=True)


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(k) for k in range(n)]


@pytest.mark.parametrize(
    ("scheduler", "prediction", "scale", "rescale"),
    [
        ("ddim", "epsilon", 1.0, 0.0),
        ("dpmsolver", "epsilon", 4.0, 0.0),
        ("euler-ancestral", "epsilon", 4.0, 0.0),
        ("heun", "epsilon", 1.0, 0.0),
        ("ddim", "v_prediction", 4.0, 0.0),
        ("dpmsolver", "v_prediction", 1.0, 0.0),
        ("euler-ancestral", "v_prediction", 1.0, 0.0),
        ("heun", "v_prediction", 4.0, 0.0),
        ("dpmsolver", "v_prediction", 4.0, 0.7),
    ],
)
def test_stable_diffusion_equals_its_pipeline(
    sd: dict[str, Path], scheduler: str, prediction: str, scale: float, rescale: float
) -> None:
    n, steps, size = 3, 5, ("height=24", "width=16") if rescale else ()
    exp, ours = diffexp_images(
        sd[prediction],
        f"scheduler={scheduler}",
        f"steps={steps}",
        f"batch_size={n}",
        f"prompt=[{','.join(PROMPTS)}]",
        "negative_prompt=blurry",
        f"guidance_scale={scale}",
        f"guidance_rescale={rescale}",
        *size,
    )
    assert exp.prompts == ["a cat", "a dog", "a cat"] and exp.loaded.prediction_type == prediction
    config = exp.built.scheduler.config  # unset options inherit the model's: SD's leading spacing, offset 1
    assert config.timestep_spacing == "leading" and config.steps_offset == 1
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd[prediction], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config)
    images = pipe(
        prompt=exp.prompts,
        negative_prompt=["blurry"] * n,
        guidance_scale=scale,
        guidance_rescale=rescale,
        num_inference_steps=steps,
        generator=generators(n),
        height=24 if rescale else None,
        width=16 if rescale else None,
        output_type="pt",
    ).images
    assert ours.shape == images.shape == (n, 3, 24 if rescale else 16, 16)
    assert images.std() > 0.01  # a picture, not a constant
    assert (images - (ours / 2 + 0.5)).abs().max() <= 1e-5  # the pipeline's [0, 1] against diffexp's [-1, 1]
    assert exp.model.net_evals == (2 if scale > 1 else 1) * exp.total_calls


@pytest.mark.parametrize(("scheduler", "scale"), [("ddim", 1.0), ("ddim", 4.0), ("dpmsolver", 4.0)])
def test_dit_equals_its_pipeline(dit: Path, scheduler: str, scale: float) -> None:
    """DiTPipeline neither scales its initial noise by init_noise_sigma nor passes a generator to step, so it is
    a reference only for schedulers with init_noise_sigma 1 that draw no noise (DDIM, DPM-Solver)."""
    n, labels = 3, [3, 999]
    exp, ours = diffexp_images(
        dit, f"scheduler={scheduler}", "steps=5", f"batch_size={n}", "labels=[3,999]", f"guidance_scale={scale}"
    )
    assert exp.labels == [3, 999, 3] and exp.loaded.null_class == 1000
    pipe = diffusers.DiTPipeline.from_pretrained(dit)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config)
    images = pipe(
        class_labels=[labels[k % 2] for k in range(n)],
        guidance_scale=scale,
        num_inference_steps=5,
        generator=generators(n),
        output_type="pt",
    ).images
    assert images.std() > 0.01
    assert (images - (ours / 2 + 0.5)).abs().max() <= 1e-5


def test_sample_k_depends_only_on_k(sd: dict[str, Path]) -> None:
    common = ("scheduler=euler-ancestral", "steps=3", "prompt=[a cat,a dog]", "guidance_scale=3")
    _, three = diffexp_images(sd["epsilon"], *common, "batch_size=3")
    _, one = diffexp_images(sd["epsilon"], *common, "batch_size=1")
    assert (three[:1] - one).abs().max() <= 1e-5


def test_preview_latent_is_a_linear_map_without_decoder(sd: dict[str, Path]) -> None:
    exp = diffexp.prepare(compose("model=local", f"model.path={sd['epsilon']}", "preview=latent", "steps=2"))
    final = diffexp.sample(exp.steps())
    preview, exact = exp.to_pixels(final.x), exp.to_pixels(final.x, exact=True)
    assert preview.shape == exact.shape and not torch.equal(preview, exact)


def test_cli_writes_decoded_grids_samples_and_latents(
    sd: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["model=local", f"model.path={sd['epsilon']}", "prompt=a cat", "guidance_scale=5", "scheduler=dpmsolver"]
    args += ["steps=8", "log_every=4", "logger=none", "progress=false", f"hydra.run.dir={out}"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    for step in ("0004", "0008"):
        for part in ("x", "x0"):
            assert (out / "grids" / f"step{step}_{part}.png").is_file()
    samples, latents = np.load(out / "samples.npy"), np.load(out / "latents.npy")
    assert samples.shape == (4, 3, 16, 16) and samples.dtype == np.float32 and np.abs(samples).max() <= 1
    assert latents.shape == (4, 4, 8, 8) and np.load(out / "trajectory.npz")["x"].shape == (2, 4, 4, 8, 8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decode_s"] > 0 and 0 < metrics["decode_share"] < 1 and metrics["net_evals"] == 16
    assert metrics["latent"]["prompts"] == ["a cat"] * 4 and metrics["latent"]["vae"]["scaling_factor"] == 0.18215


def test_bad_input_is_refused_clearly(
    sd: dict[str, Path], dit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = ("model=local", f"model.path={sd['epsilon']}")
    cases = [
        (("model=tiny", "prompt=a cat"), "unconditional"),
        (("model=local", f"model.path={dit}", "prompt=a cat"), "class-conditional"),
        ((*local, "labels=[1]"), "text-to-image model"),
        ((*local, "height=15"), "multiples of 2"),
        (("model=local", f"model.path={dit}", "height=32"), "DiT"),
        (("model=tiny", "height=32"), "latent models"),
        ((*local, "prompt=[1,2]"), "list of strings"),
    ]
    for overrides, message in cases:
        with pytest.raises(DiffexpError, match=message):
            diffexp.prepare(compose(*overrides))
    odd_vae = save_tiny_sd(tmp_path / "odd", scaling_factor=0.5)
    with pytest.raises(DiffexpError, match=r"knows.*0\.18215"):
        diffexp.prepare(compose("model=local", f"model.path={odd_vae}", "preview=latent"))
    for part in ("text_encoder", "tokenizer"):
        broken = tmp_path / f"no-{part}"
        shutil.copytree(sd["epsilon"], broken)
        shutil.rmtree(broken / part)
        with pytest.raises(DiffexpError, match=f"no {part}"):
            diffexp.prepare(compose("model=local", f"model.path={broken}"))
    args = ["model=local", f"model.path={dit}", "prompt=a cat", "logger=none"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode != 0 and "class-conditional" in result.stderr and "Traceback" not in result.stderr


def test_report_captions_name_the_prompts() -> None:
    from diffexp.report.grid import caption
    from diffexp.report.jobs import Job

    config = {"scheduler": {"name": "ddim"}, "steps": 8}
    metrics = {"nfe": 8, "wall_s": 0.5, "latent": {"prompts": ["a cat", "a dog"]}}
    text = caption(Job(None, 0, "finished", config, metrics), [])
    assert text.endswith("a cat | a dog") and "NFE 8" in text
    assert "|" not in caption(Job(None, 0, "finished", config, {"nfe": 8}), [])


def test_sweep_over_scheduler_and_guidance_gives_a_report(
    sd: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "model=local", f"model.path={sd['epsilon']}", "prompt=[a cat,a dog]", "scheduler=ddim,dpmsolver"]
    args += ["guidance_scale=1,4", "steps=3", "batch_size=2", "logger=none", "progress=false"]
    result = run_main("scripts/run.py", [*args, f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 4 and (sweep / "report.html").is_file() and (sweep / "report" / "grid.png").is_file()
    assert {json.loads(j.read_text())["net_evals"] for j in jobs} == {3, 6}
