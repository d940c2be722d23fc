"""Guidance: an object the adapter calls for every model call, which decides how the network is evaluated.

``Guidance`` itself evaluates the network once on the condition. ``ClassifierFreeGuidance`` (Ho & Salimans 2022)
runs the unconditional and conditional halves as one call on a doubled batch:
out = out_uncond + s (out_cond - out_uncond), in the model's own parameterisation; with ``rescale`` > 0 the result is
rescaled towards the conditional output's std (Lin et al. 2023, eq. 15-16, diffusers' ``rescale_noise_cfg``).
Within ``interval`` only (Kynkäänniemi et al. 2024): outside it, one unguided call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from diffexp.config import GuidanceSettings
from diffexp.sampling.noise import NoiseSchedule


class Guided(Protocol):
    """What guidance needs of an adapter."""

    cond: object

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, condition: object, passes: int = 1) -> torch.Tensor: ...

    def evaluate_pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Guidance:
    """No guidance: the network once, on the condition."""

    settings: GuidanceSettings = field(default_factory=GuidanceSettings)

    def __call__(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return adapter.evaluate(x, t, adapter.cond)

    def warm_up(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> None:
        adapter.evaluate(x, t, adapter.cond)


@dataclass(frozen=True)
class ClassifierFreeGuidance(Guidance):
    schedule: NoiseSchedule | None = None  # places a timestep in the interval

    def applies(self, t: torch.Tensor) -> bool:
        """Whether this call guides: the timestep's noise level on the model's own schedule, on the host."""
        if self.settings.interval is None or self.schedule is None:
            return True
        return self.settings.applies_at(float(self.schedule.sigma_at(t)))

    def __call__(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.applies(t):
            return adapter.evaluate(x, t, adapter.cond)
        # 1. the unconditional and conditional halves in one call, as the diffusers pipelines do
        uncond, cond = adapter.evaluate_pair(x, t)
        # 2. classifier-free guidance: out_uncond + s (out_cond - out_uncond)
        out = uncond + self.settings.scale * (cond - uncond)
        # 3. optional rescale towards the std of the conditional output (Lin et al. 2023)
        if self.settings.rescale > 0:
            out = rescale_noise_cfg(out, cond, guidance_rescale=self.settings.rescale)
        return out

    def warm_up(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> None:
        if self.settings.interval is not None:
            adapter.evaluate(x, t, adapter.cond)
        adapter.evaluate_pair(x, t)


def no_guidance() -> Guidance:
    return Guidance()


def guidance_for(settings: GuidanceSettings, schedule: NoiseSchedule) -> Guidance:
    """The guidance object of these settings: none at scale 1."""
    return ClassifierFreeGuidance(settings, schedule) if settings.enabled else Guidance(settings)
