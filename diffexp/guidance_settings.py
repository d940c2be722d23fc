"""Guidance as a run reads it: the method, its scale (1 is none), rescale, interval and the guider's options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

NO_GUIDANCE = 1.0  # a guidance scale of 1 is the model's own output: no guidance


def guided(scale: float) -> bool:
    """Whether a guidance scale guides at all."""
    return scale != NO_GUIDANCE


@dataclass(frozen=True)
class GuidanceSettings:
    """The guidance method (a diffusers guider named by ``configs/guidance/<method>.yaml``), its scale (1 is none
    for the scale itself), rescale (0 is none), the noise levels it acts at and the guider's own options."""

    scale: float = NO_GUIDANCE
    rescale: float = 0.0
    interval: tuple[float, float] | None = None  # [sigma_lo, sigma_hi]; None: every noise level
    method: str = "cfg"
    diffusers_class: str = "ClassifierFreeGuidance"
    options: tuple[tuple[str, Any], ...] = ()  # the guider's parameters by its own names (a tuple: hashable)
    layers: tuple[str, ...] | None = None  # perturbation guiders: module paths; None: the model family's default
    weak_model: str | None = None  # autoguidance: the model config of the weaker network
    perturbs: bool = False  # it guides at scale 1 too (PAG, SLG: their own perturbed scale is non-zero)
    conditional: bool = True  # its scale needs the unconditional input (autoguidance's does not)
    prediction_types: tuple[str, ...] | None = None  # the model outputs it assumes; None: any
    scale_offset: float = 0.0  # the guider's guidance_scale is scale + scale_offset (APG: the paper's w - 1)
    scale_levels: tuple[float, ...] | None = None  # FDG: one scale per frequency level, each scale times its factor

    @property
    def enabled(self) -> bool:
        return guided(self.scale) or self.perturbs

    @property
    def needs_uncond(self) -> bool:
        """Whether the model must have an unconditional input (a null class, a negative prompt)."""
        return self.conditional and guided(self.scale)

    @property
    def record(self) -> dict[str, Any]:
        """What a run records of its guidance, in JSON's own types (the same after a round trip)."""
        record = dataclasses.asdict(self)
        record["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        for key in ("interval", "layers", "prediction_types", "scale_levels"):
            record[key] = None if record[key] is None else list(record[key])
        return record

    @property
    def label(self) -> str:
        """The method and scale in a run's name: ``cfg3``, ``apg5``, ``pag`` (PAG alone at scale 1)."""
        return f"{self.method}{self.scale:g}" if guided(self.scale) else self.method

    def applies_at(self, sigma: float) -> bool:
        if not self.enabled:
            return False
        return self.interval is None or self.interval[0] <= sigma <= self.interval[1]
