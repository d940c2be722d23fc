"""SDXL through the same loop: diffexp's decoded samples equal StableDiffusionXLPipeline's (a tiny random pipeline
built offline, fp32, 1e-5 max abs); its size conditioning and bad input; the latent-to-RGB previews of the SDXL,
SD3 and Flux VAEs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from conftest import compose, run_main, shared_folder
from tiny_latent import save_tiny_sd
from tiny_sdxl import SDXL_SCALING, save_tiny_sdxl

import diffexp
from diffexp.errors import DiffexpError
from diffexp.sampling.latent import LatentModel
from diffexp.sampling.previews import FLUX, LATENT_RGB, SD3, SDXL
from diffexp.sampling.sdxl import SDXLAdapter

CLASSES = {"euler": "EulerDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler"}
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline, saved once per session."""
    return shared_folder(tmp_path_factory, "tiny-sdxl", lambda root: save_tiny_sdxl(root / "sdxl")) / "sdxl"


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(k) for k in range(n)]


@pytest.mark.parametrize(
    ("scheduler", "scale", "negative", "sizes"),
    [
        ("euler", 1.0, None, {}),
        ("euler", 5.0, "blurry", {}),
        ("dpmsolver", 5.0, None, {"original_size": [64, 48], "crops_coords_top_left": [4, 2], "target_size": [32, 32]}),
        ("dpmsolver", 1.0, "blurry", {"original_size": [40, 40]}),
    ],
)
def test_sdxl_equals_its_pipeline(
    sdxl: Path, scheduler: str, scale: float, negative: str | None, sizes: dict[str, list[int]]
) -> None:
    """At 24x16 pixels; no negative prompt: zeros for guidance's unconditional half (force_zeros_for_empty_prompt)."""
    n, steps = 3, 4
    overrides = [f"{k}=[{','.join(map(str, v))}]" for k, v in sizes.items()]
    overrides += [] if negative is None else [f"negative_prompt={negative}"]
    exp = diffexp.prepare(
        compose(
            "model=local",
            f"model.path={sdxl}",
            f"scheduler={scheduler}",
            f"steps={steps}",
            f"batch_size={n}",
            f"prompt=[{','.join(PROMPTS)}]",
            f"guidance_scale={scale}",
            "height=24",
            "width=16",
            *overrides,
        )
    )
    ours = exp.to_pixels(diffexp.sample(exp.steps()).x, exact=True)
    assert isinstance(exp.model, SDXLAdapter) and exp.prompts == ["a cat", "a dog", "a cat"]
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config)
    images = pipe(
        prompt=exp.prompts,
        negative_prompt=None if negative is None else [negative] * n,
        guidance_scale=scale,
        num_inference_steps=steps,
        generator=generators(n),
        height=24,
        width=16,
        output_type="pt",
        **{k: tuple(v) for k, v in sizes.items()},
    ).images
    assert ours.shape == images.shape == (n, 3, 24, 16)
    assert images.std() > 0.01  # a picture, not a constant
    assert (images - (ours / 2 + 0.5)).abs().max() <= 1e-5  # the pipeline's [0, 1] against diffexp's [-1, 1]
    assert exp.model.net_evals == (2 if scale > 1 else 1) * exp.total_calls


def test_time_ids_follow_the_size_conditioning(sdxl: Path) -> None:
    """Defaults: the image size and a (0, 0) crop, as the pipeline's; given values go in as they are."""
    common = ("model=local", f"model.path={sdxl}", "height=24", "width=16", "steps=2")
    default = diffexp.prepare(compose(*common)).model.cond["time_ids"]
    assert default.tolist() == [[24, 16, 0, 0, 24, 16]] * 4
    given = ("original_size=[64,48]", "crops_coords_top_left=[4,2]", "target_size=[32,32]")
    model = diffexp.prepare(compose(*common, *given, "guidance_scale=3")).model
    assert model.cond["time_ids"].tolist() == [[64, 48, 4, 2, 32, 32]] * 4
    assert torch.equal(model.uncond["time_ids"], model.cond["time_ids"])
    assert not model.uncond["text_embeds"].any()  # no negative prompt: zeros


def test_sdxl_size_conditioning_bad_input_is_refused(
    sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = ["model=local", f"model.path={sdxl}", "steps=2", "logger=none", "progress=false"]
    cases = [
        ("original_size=[0,64]", "positive integers"),
        ("target_size=[64]", "positive integers"),
        ("original_size=[64,48,2]", "positive integers"),
        ("target_size=[64,1.5]", "positive integers"),
        ("original_size=big", "positive integers"),
        ("crops_coords_top_left=[-1,0]", "integers >= 0"),
    ]
    for i, (override, message) in enumerate(cases):
        args = [*local, override, f"hydra.run.dir={tmp_path / str(i)}"]
        result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert override.split("=")[0] in result.stderr and "Traceback" not in result.stderr
    sd = save_tiny_sd(tmp_path / "sd")
    with pytest.raises(DiffexpError, match="apply to SDXL only"):
        diffexp.prepare(compose("model=local", f"model.path={sd}", "original_size=[64,64]"))
    broken = tmp_path / "no-text_encoder_2"
    shutil.copytree(sdxl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(DiffexpError, match=r"StableDiffusionXLPipeline folder .* has no text_encoder_2"):
        diffexp.prepare(compose("model=local", f"model.path={broken}"))


def test_previews_hold_the_published_factors() -> None:
    """ComfyUI's comfy/latent_formats.py: SDXL (4 channels, with a bias), SD3 and Flux (16 channels)."""
    assert len(SDXL.factors) == 4 and len(SD3.factors) == len(FLUX.factors) == 16
    assert all(len(row) == 3 for m in (SDXL, SD3, FLUX) for row in m.factors)
    assert SDXL.factors[0] == (0.3651, 0.4232, 0.4341) and SDXL.bias == (0.1084, -0.0175, -0.0011)
    assert SD3.factors[2] == (0.1994, 0.0927, 0.0458) and SD3.bias == (0.2394, 0.2135, 0.1925)
    assert FLUX.factors[15] == (-0.1262, -0.0982, -0.0778) and FLUX.bias == (-0.0329, -0.0718, -0.0851)
    assert LATENT_RGB[(4, SDXL_SCALING, 0.0)] is SDXL
    assert LATENT_RGB[(16, 1.5305, 0.0609)] is SD3 and LATENT_RGB[(16, 0.3611, 0.1159)] is FLUX


@pytest.mark.parametrize(("scaling", "shift", "rgb"), [(1.5305, 0.0609, SD3), (0.3611, 0.1159, FLUX)])
def test_a_16_channel_latent_previews_as_rgb(scaling: float, shift: float, rgb: object) -> None:
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=scaling,
        shift_factor=shift,
    )
    latent = LatentModel(SimpleNamespace(vae=vae), "text", (6, 4))
    assert latent.preview_map() is rgb
    latents = torch.zeros(2, 16, 6, 4)
    latents[:, 0] = 1.0  # channel 0 alone: its row plus the bias, everywhere
    image = latent.preview(latents)
    assert image.shape == (2, 3, 12, 8)
    expected = torch.tensor(rgb.factors[0]) + torch.tensor(rgb.bias)  # type: ignore[attr-defined]
    assert torch.allclose(image[0, :, 5, 7], expected.clamp(-1, 1))


def test_sdxl_preview_is_its_own_map(sdxl: Path) -> None:
    exp = diffexp.prepare(compose("model=local", f"model.path={sdxl}", "preview=latent", "steps=2"))
    assert exp.loaded.latent is not None and exp.loaded.latent.preview_map() is SDXL
    final = diffexp.sample(exp.steps())
    preview, exact = exp.to_pixels(final.x), exp.to_pixels(final.x, exact=True)
    assert preview.shape == exact.shape == (4, 3, 16, 16) and not torch.equal(preview, exact)


def test_sdxl_model_config_names_the_hub_model() -> None:
    model = compose("model=sdxl-base-1.0").model
    assert model.id == "stabilityai/stable-diffusion-xl-base-1.0" and model.revision is None
    assert model.source == "hub" and model.ays == "sdxl"


def test_cli_runs_sdxl_and_records_its_size_conditioning(
    sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["model=local", f"model.path={sdxl}", "prompt=a cat", "guidance_scale=5", "scheduler=euler", "steps=2"]
    args += ["crops_coords_top_left=[8,0]", "logger=none", "progress=false", f"hydra.run.dir={out}"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert np.load(out / "samples.npy").shape == (4, 3, 16, 16)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["net_evals"] == 4 and metrics["latent"]["vae"]["scaling_factor"] == SDXL_SCALING
    assert metrics["latent"]["time_ids"] == [16, 16, 8, 0, 16, 16]
