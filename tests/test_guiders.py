"""Guidance methods through diffusers' guiders: each equals, to 1e-6, a loop written here from its published
formula with the same noise; net_evals is the formula's count; and each refusal's reason still holds for the
installed diffusers (a fixed upstream defect turns its test red)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_cli
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffexp.errors import DiffexpError
from diffexp.methods import read_guidance
from diffexp.sampling.adapters import pixel_adapter
from diffexp.sampling.experiment import prepare
from diffexp.sampling.guidance import GuiderGuidance
from diffexp.sampling.guiders import build_guider
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG
from diffexp.sampling.loop import initial_noise, iter_steps, sample
from diffexp.sampling.models import tiny_unet
from diffexp.sampling.network import Network

N, LABELS, NULL, S = 6, [0, 1, 2], 3, 3.0  # steps, classes, the null class, guidance_scale
COND = ["model=tiny", "model.num_classes=3", f"steps={N}", "scheduler=ddim", "batch_size=3", "labels=[0,1,2]"]
Combine = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps() -> tuple[float, ...]:
    scheduler = DDIMScheduler.from_config(DDPM_SCHEDULER_CONFIG)
    scheduler.set_timesteps(N)
    return tuple(scheduler.timesteps.tolist())


TIMESTEPS = ddim_timesteps()


def by_hand(combine: Combine) -> torch.Tensor:
    """DDIM from the same per-sample noise, with ``combine(step, x, t)`` as the model output."""
    scheduler = DDIMScheduler.from_config(DDPM_SCHEDULER_CONFIG)
    scheduler.set_timesteps(N)
    x = randn_tensor((3, 3, 16, 16), generator=[torch.Generator().manual_seed(k) for k in range(3)])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(combine(i, scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def net(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: list[int]) -> torch.Tensor:
    return unet(x, t, class_labels=torch.tensor(labels)).sample


def pair(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional and conditional outputs."""
    return net(unet, x, t, [NULL] * 3), net(unet, x, t, LABELS)


def run(*args: str) -> tuple[torch.Tensor, int, torch.nn.Module]:
    exp = prepare(compose(*COND, f"guidance_scale={S}", *args))
    final = sample(exp.steps())
    return final.x, final.net_evals, exp.loaded.model


def apg_by_hand(unet: torch.nn.Module, eta: float, beta: float, r: float, clipped: list[bool]) -> Combine:
    """Sadat et al. 2024, Algorithm 1: momentum, norm threshold, then D_cond + (w - 1) (D_orth + eta D_par)."""
    average: list[torch.Tensor | float] = [0.0]

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = pair(unet, x, t)
        average[0] = (cond - uncond) + beta * average[0]
        diff = average[0]
        norm = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        clipped.append(bool((norm > r).any()))
        diff = diff * torch.clamp(r / norm, max=1.0)
        # in float64, as the paper's code
        d, unit = diff.flatten(1).double(), F.normalize(cond.flatten(1).double(), dim=1)
        parallel = (d * unit).sum(1, keepdim=True) * unit
        orthogonal, parallel = (d - parallel).view_as(diff).float(), parallel.view_as(diff).float()
        return cond + (S - 1) * (orthogonal + eta * parallel)

    return combine


def test_apg_equals_its_published_formula() -> None:
    x, evals, unet = run("guidance=apg", "guidance.eta=0.3", "guidance.momentum=-0.5", "guidance.norm_threshold=1.0")
    clipped: list[bool] = []
    expected = by_hand(apg_by_hand(unet, 0.3, -0.5, 1.0, clipped))
    assert any(clipped)  # the threshold acted
    assert (x - expected).abs().max() < 1e-6 and evals == 2 * N


def test_tcfg_equals_its_published_formula() -> None:
    x, evals, unet = run("guidance=tcfg")

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Kwon et al. 2025: the unconditional output projected on the first right singular vector of [cond; uncond]
        uncond, cond = pair(unet, x, t)
        _, _, vh = torch.linalg.svd(torch.stack([cond.flatten(1), uncond.flatten(1)], dim=1), full_matrices=False)
        first = vh[:, :1]
        damped = (uncond.flatten(1).unsqueeze(1) @ first.transpose(1, 2) @ first).view_as(uncond)
        return damped + S * (cond - damped)

    assert (x - by_hand(combine)).abs().max() < 1e-6 and evals == 2 * N


@contextmanager
def identity_attention(block: torch.nn.Module) -> Iterator[None]:
    """Self-attention of ``block`` as identity: softmax(QK^T) V replaced by V (Ahn et al. 2024)."""
    original, inside = F.scaled_dot_product_attention, [False]

    def patched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        return v if inside[0] else original(q, k, v, *a, **kw)

    hooks = [block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))]
    hooks.append(block.register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    try:
        with mock.patch.object(F, "scaled_dot_product_attention", patched):
            yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def skipped(block: torch.nn.Module) -> Iterator[None]:
    """``block`` skipped: its output is its input."""
    hook = block.register_forward_hook(lambda _m, args, _out: args[0])
    try:
        yield
    finally:
        hook.remove()


@pytest.mark.parametrize(("method", "scale_key", "perturb"), [("pag", "perturbed_scale", identity_attention),
                                                              ("slg", "skip_scale", skipped)])  # fmt: skip
def test_perturbation_guidance_equals_its_published_formula(method: str, scale_key: str, perturb: Callable) -> None:
    window = [f"guidance.{'perturbed' if method == 'pag' else 'skip'}_{k}={v}" for k, v in (("start", 0), ("stop", 1))]
    x, evals, unet = run(f"guidance={method}", f"guidance.{scale_key}=2.0", *window)

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = pair(unet, x, t)
        out = uncond + S * (cond - uncond)
        if i == 0:  # diffusers perturbs strictly after its start step
            return out
        with perturb(unet.mid_block.attentions[0]):
            perturbed = net(unet, x, t, LABELS)
        return out + 2.0 * (cond - perturbed)  # Ahn et al. 2024, eq. 12 with CFG; SD3.5's skip-layer guidance

    assert (x - by_hand(combine)).abs().max() < 1e-6
    assert evals == 2 + 3 * (N - 1)  # three passes per perturbed call


def guided_adapter(unet: torch.nn.Module, method: str, weak: torch.nn.Module | None = None, **node: object):
    """A class-conditional adapter with a method's guider, built directly (past the model-level refusals)."""
    settings = read_guidance(S, 0.0, None, {"name": method, **node})
    guidance = GuiderGuidance(settings, build_guider(settings, unet, None), None, TIMESTEPS, weak and Network(weak))
    return pixel_adapter(unet, labels=LABELS, null_class=NULL, guidance=guidance)


def sample_adapter(adapter) -> tuple[torch.Tensor, int]:
    noise, gens = initial_noise((3, 16, 16), 0, 3, torch.device("cpu"))
    with torch.inference_mode():
        final = sample(iter_steps(adapter, DDIMScheduler.from_config(DDPM_SCHEDULER_CONFIG), noise, N, gens))
    return final.x, final.net_evals


def test_autoguidance_equals_its_published_formula() -> None:
    unet = tiny_unet(16, 3)
    weak = copy.deepcopy(unet)
    with torch.no_grad():
        for p in weak.parameters():
            p.mul_(0.9)  # a worse model of the same family
    x, evals = sample_adapter(guided_adapter(unet, "autoguidance", weak, weak_model="weak"))

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        good, bad = net(unet, x, t, LABELS), net(weak, x, t, LABELS)
        return bad + S * (good - bad)  # Karras et al. 2024, eq. 2: D_weak + w (D - D_weak), both on the condition

    assert (x - by_hand(combine)).abs().max() < 1e-6 and evals == 2 * N


def test_cfg_zero_star_equals_its_published_formula_on_the_guider() -> None:
    unet = tiny_unet(16, 3)
    x, evals = sample_adapter(guided_adapter(unet, "cfg-zero-star"))

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = pair(unet, x, t)
        if i == 0:  # Fan et al. 2025: zero-init, the first step's output is zero
            return torch.zeros_like(cond)
        alpha = (cond * uncond).flatten(1).sum(1) / ((uncond**2).flatten(1).sum(1) + 1e-8)  # optimised scale
        scaled = alpha.view(-1, 1, 1, 1) * uncond
        return scaled + S * (cond - scaled)

    assert (x - by_hand(combine)).abs().max() < 1e-6 and evals == 2 * N


def test_cfg_through_the_guider_equals_the_cfg_formula() -> None:
    x, evals, unet = run("guidance=cfg")

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = pair(unet, x, t)
        return uncond + S * (cond - uncond)

    assert (x - by_hand(combine)).abs().max() < 1e-6 and evals == 2 * N


# Burt & Adelson's pyramid as kornia builds it: the 5x5 binomial blur (reflected borders); down: blur, then halve by
# bilinear interpolation; up: double by bilinear interpolation, then blur
BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def blur(x: torch.Tensor) -> torch.Tensor:
    kernel = (BINOMIAL[:, None] * BINOMIAL[None, :] / 256).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def down(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False)


def up(x: torch.Tensor) -> torch.Tensor:
    return blur(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False))


def test_fdg_equals_its_published_formula() -> None:
    x, evals, unet = run("guidance=fdg", "guidance.scale_levels=[1,0.25]", "guidance.parallel_weights=0.5")
    scales, weight = (S, 0.25 * S), 0.5

    def combine(i: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Sadat et al. 2025, Algorithm 2: CFG per level of the Laplacian pyramid [x - up(down x), down x], the
        # update's part parallel to D_cond weighted, then the pyramid rebuilt: up(level 1) + level 0
        uncond, cond = pair(unet, x, t)
        bands = [(uncond - up(down(uncond)), cond - up(down(cond))), (down(uncond), down(cond))]
        levels = []
        for w, (u, c) in zip(scales, bands, strict=True):
            diff, unit = (c - u).flatten(1).double(), F.normalize(c.flatten(1).double(), dim=1)  # in float64
            parallel = (diff * unit).sum(1, keepdim=True) * unit
            orthogonal, parallel = (diff - parallel).view_as(u).float(), parallel.view_as(u).float()
            levels.append(u + w * (weight * parallel + orthogonal))
        return up(levels[1]) + levels[0]

    assert (x - by_hand(combine)).abs().max() < 1e-6 and evals == 2 * N


# refusals, each with its reason checked against the installed diffusers


def test_seg_is_refused_and_still_equals_cfg() -> None:
    with pytest.raises(DiffexpError, match="_count_prepared"):
        prepare(compose(*COND, "guidance_scale=3", "guidance=seg"))
    from diffusers.guiders import SmoothedEnergyGuidance
    from diffusers.guiders.smoothed_energy_guidance import SmoothedEnergyGuidanceConfig

    unet = tiny_unet(16, 3)
    config = SmoothedEnergyGuidanceConfig(indices=[0], fqn="mid_block.attentions")
    seg = SmoothedEnergyGuidance(guidance_scale=S, seg_guidance_scale=2.0, seg_guidance_config=[config])
    settings = read_guidance(S, 0.0, None, {"name": "cfg"})
    guidance = GuiderGuidance(settings, seg, None, TIMESTEPS)
    seg_x, seg_evals = sample_adapter(pixel_adapter(unet, labels=LABELS, null_class=NULL, guidance=guidance))
    cfg_x, cfg_evals = sample_adapter(guided_adapter(unet, "cfg"))
    assert seg_evals > cfg_evals  # it pays for a third pass ...
    assert (seg_x - cfg_x).abs().max() < 1e-6  # ... which changes nothing: the defect the refusal names


def test_mambo_g_is_refused_and_still_fails_on_image_tensors() -> None:
    with pytest.raises(DiffexpError, match="matrix_norm"):
        prepare(compose(*COND, "guidance_scale=3", "guidance=mambo-g"))
    from diffusers.guiders import MagnitudeAwareGuidance

    guider = MagnitudeAwareGuidance(guidance_scale=S)
    guider.set_state(1, N, torch.tensor(500))
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        guider.forward(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))


def test_cfg_zero_star_is_refused_on_epsilon_models_and_still_zeroes_the_first_step() -> None:
    with pytest.raises(DiffexpError, match="flow-matching velocity"):
        prepare(compose(*COND, "guidance_scale=3", "guidance=cfg-zero-star"))
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    guider = ClassifierFreeZeroStarGuidance(guidance_scale=S)
    guider.set_state(0, N, torch.tensor(999))  # an epsilon output of zero at the noisiest step: x0 = x / alpha
    assert not guider.forward(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).pred.any()


BAD = {
    "a condition on an unconditional model": (["guidance=apg", "model.num_classes=null", "labels=null"],
                                              "needs a conditional model"),
    "an unknown option": (["guidance=apg", "+guidance.bogus=1"], "not options of AdaptiveProjectedGuidance"),
    "a layer that matches nothing": (["guidance=pag", "guidance.layers=[nothing.here]"], "matches no module"),
    "layers without attention for PAG": (["guidance=pag", "guidance.layers=[down_blocks.0]"], "no self-attention"),
    "the scale as an option": (["guidance=tcfg", "+guidance.guidance_scale=2"], "sets it for every method"),
    "a weak model of another family": (["guidance=autoguidance", "guidance.weak_model=tiny"], "same family"),
    "FDG's level scales set directly": (["guidance=fdg", "+guidance.guidance_scales=[3,1]"],
                                        "guidance.guidance_scales is not allowed"),
    "FDG without levels": (["guidance=fdg", "guidance.scale_levels=[]"], "non-empty list of factors"),
    "FDG levels the sample cannot halve": (["guidance=fdg", "guidance.scale_levels=[1,1,1,1,1,1]"],
                                           "cannot guide samples of 16x16"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_guidance_is_refused_before_sampling(case: str) -> None:
    args, message = BAD[case]
    with pytest.raises(DiffexpError, match=re.escape(message)):
        prepare(compose(*COND, "guidance_scale=3", *args))


def test_fdg_still_returns_the_padded_size_where_its_pyramid_pads() -> None:
    from diffusers.guiders import FrequencyDecoupledGuidance

    guider = FrequencyDecoupledGuidance(guidance_scales=[S, S / 2])
    guider.set_state(0, N, torch.tensor(999))
    assert guider.forward(torch.randn(1, 3, 24, 24), torch.randn(1, 3, 24, 24)).pred.shape[-2:] == (32, 32)


def test_pag_alone_guides_an_unconditional_model_with_two_passes() -> None:
    exp = prepare(compose("model=tiny", f"steps={N}", "scheduler=ddim", "guidance=pag", "guidance.perturbed_stop=1"))
    assert sample(exp.steps()).net_evals == 1 + 2 * (N - 1)


def test_a_refused_method_exits_with_its_reason(tmp_path: Path) -> None:
    result = run_cli([*COND, "guidance_scale=3", "guidance=seg", "progress=false", "logger=none"], cwd=tmp_path)
    assert result.returncode == 2 and "no-op" in result.stderr and "Traceback" not in result.stderr


def test_autoguidance_of_digits_cond_uses_its_shipped_weak_model() -> None:
    from diffexp.sampling.models import load_model
    from diffexp.settings import model_config

    exp = prepare(compose("model=digits-cond", "labels=[3,8]", "guidance=autoguidance", "guidance_scale=2",
                          "scheduler=ddim", f"steps={N}", "batch_size=2"))  # fmt: skip
    final = sample(exp.steps())
    weak = load_model(model_config("digits-cond-weak"), torch.device("cpu")).model
    scheduler = type(exp.built.scheduler).from_config(exp.built.scheduler.config)
    scheduler.set_timesteps(N)
    x, labels = exp.noise * scheduler.init_noise_sigma, torch.tensor([3, 8])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            good, bad = (m(x_in, t, class_labels=labels).sample for m in (exp.loaded.model, weak))
            x = scheduler.step(bad + 2.0 * (good - bad), t, x).prev_sample
    assert (final.x - x).abs().max() < 1e-5 and final.net_evals == 2 * N


def test_a_config_without_the_guidance_group_is_cfg_and_names_runs_as_before() -> None:
    from diffexp.catalog import run_label, scheduler_spec

    settings = read_guidance(3.0, 0.7, [0.5, 5.0], {})
    assert (settings.method, settings.diffusers_class) == ("cfg", "ClassifierFreeGuidance")
    assert settings.interval == (0.5, 5.0) and settings.rescale == 0.7
    spec = scheduler_spec({"name": "unipc"})
    assert run_label(spec, 6, 2.5) == "unipc-6-cfg2.5" and run_label(spec, 6, 2.5, method="apg") == "unipc-6-apg2.5"
    assert run_label(spec, 6, 1.0, method="pag") == "unipc-6-pag" and run_label(spec, 6) == "unipc-6"
    assert run_label(spec, 6, 2.5, "karras", "apg") == "unipc-karras-6-apg2.5"  # a schedule of its own, and a method
