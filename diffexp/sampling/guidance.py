"""Guidance: an object the adapter calls for every model call, which decides how the network is evaluated.

``Guidance`` itself evaluates the network once on the condition. ``GuiderGuidance`` drives one of diffusers'
guiders (``diffusers.guiders``, named by ``configs/guidance/<method>.yaml``) through its own protocol at each call:
``set_state(step, steps, t)``; ``batches = prepare_inputs({key: (cond, uncond)})``; per batch ``prepare_models``,
one network pass, ``cleanup_models``; ``guider(batches).pred``. The formulas are diffusers'; diffexp only evaluates
the network. Classifier-free guidance (Ho & Salimans 2022) is ``ClassifierFreeGuidance``: out_uncond +
s (out_cond - out_uncond), with ``rescale`` (Lin et al. 2023, eq. 15-16). Within ``interval`` only (Kynkäänniemi
et al. 2024): outside it, one unguided call.

Batches of guiders that change nothing in the network (CFG, APG, TCFG, ...) run as one call on a stacked batch in the
family's order ([uncond, cond] for the pipelines' UNets), as the diffusers pipelines do; those with hooks (PAG, SLG)
run one call per batch. Each batch's condition follows its prediction's name: ``pred_uncond`` gets the unconditional
input (autoguidance: the weak network on the condition), every other the condition (diffusers' PAG and SLG give
their perturbed pass index 1 of the tuple, the unconditional input, when CFG is off). ``net_evals`` counts every pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffexp.guidance_settings import GuidanceSettings
from diffexp.sampling.network import Counter, Network
from diffexp.sampling.noise import NoiseSchedule

UNCOND = "pred_uncond"  # the guiders' name of the unconditional prediction


class Guided(Protocol):
    """What guidance needs of an adapter."""

    cond: Any
    uncond: Any
    counter: Counter
    uncond_first: bool

    @property
    def module(self) -> torch.nn.Module: ...

    def evaluate(
        self, x: torch.Tensor, t: torch.Tensor, condition: Any, passes: int = 1, network: Network | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Guidance:
    """No guidance: the network once, on the condition."""

    settings: GuidanceSettings = field(default_factory=GuidanceSettings)

    def __call__(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return adapter.evaluate(x, t, adapter.cond)

    def warm_up(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> None:
        adapter.evaluate(x, t, adapter.cond)


@dataclass(frozen=True, eq=False)
class GuiderGuidance(Guidance):
    """A diffusers guider, driven at every model call. Its step is the number of the run's timesteps above the
    call's (0 at the noisiest: the guider resets its momentum there), out of their count, so a fresh chunk, a
    second run or a noise-level sampler finds the same state at the same noise level."""

    guider: Any = None  # a diffusers.guiders BaseGuidance (stateful: step, momentum)
    schedule: NoiseSchedule | None = None  # places a timestep in the interval
    timesteps: tuple[float, ...] = ()  # the run's timesteps, on the host
    weak: Network | None = None  # autoguidance: the weaker network, for the unconditional prediction

    def step_of(self, t: torch.Tensor) -> int:
        value = float(t)
        return sum(1 for s in self.timesteps if s > value)

    def applies(self, t: torch.Tensor) -> bool:
        """Whether this call guides: the timestep's noise level on the model's own schedule, on the host."""
        if self.settings.interval is None or self.schedule is None:
            return True
        return self.settings.applies_at(float(self.schedule.sigma_at(t)))

    @property
    def hooked(self) -> bool:
        """Whether the guider changes the network between batches (its own prepare_models or cleanup_models)."""
        from diffusers.guiders.guider_utils import BaseGuidance

        cls = type(self.guider)
        return cls.prepare_models is not BaseGuidance.prepare_models or cls.cleanup_models is not (
            BaseGuidance.cleanup_models
        )

    def __call__(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.guide(adapter, x, t, self.step_of(t))

    def guide(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        if not self.applies(t):
            return adapter.evaluate(x, t, adapter.cond)
        guider = self.guider
        guider.set_state(step, max(len(self.timesteps), 1), t)
        uncond = adapter.uncond if adapter.uncond is not None else adapter.cond
        batches = guider.prepare_inputs({k: (adapter.cond[k], uncond[k]) for k in adapter.cond})
        names = [getattr(b, guider._identifier_key) for b in batches]
        if self.hooked or self.weak is not None:
            preds = [self.one(adapter, x, t, name) for name in names]
        else:
            preds = self.stacked(adapter, x, t, names)
        for batch, pred in zip(batches, preds, strict=True):
            batch.noise_pred = pred
        return guider(batches).pred

    def one(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
        """One batch: the guider prepares the network, one pass, the guider cleans up."""
        self.guider.prepare_models(adapter.module)
        try:
            if name == UNCOND and self.weak is not None:
                return adapter.evaluate(x, t, adapter.cond, network=self.weak)
            return adapter.evaluate(x, t, adapter.uncond if name == UNCOND else adapter.cond)
        finally:
            self.guider.cleanup_models(adapter.module)

    def stacked(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
        """The batches as one pass on a stacked batch, in the family's order; the outputs in the guider's."""
        for _ in names:
            self.guider.prepare_models(adapter.module)  # counts the batch; changes nothing here
        if len(names) == 1:
            outs = [adapter.evaluate(x, t, adapter.uncond if names[0] == UNCOND else adapter.cond)]
        else:
            order = sorted(range(len(names)), key=lambda i: (names[i] != UNCOND) == adapter.uncond_first)
            conds = [adapter.uncond if names[i] == UNCOND else adapter.cond for i in order]
            stacked = {k: torch.cat([c[k] for c in conds]) for k in adapter.cond}
            parts = adapter.evaluate(torch.cat([x] * len(names)), t, stacked, passes=len(names)).chunk(len(names))
            outs = [parts[order.index(i)] for i in range(len(names))]
        for _ in names:
            self.guider.cleanup_models(adapter.module)
        return outs

    def warm_up(self, adapter: Guided, x: torch.Tensor, t: torch.Tensor) -> None:
        if self.settings.interval is not None:
            adapter.evaluate(x, t, adapter.cond)
        self.guide(adapter, x, t, 0)


def no_guidance() -> Guidance:
    return Guidance()


def guidance_for(
    settings: GuidanceSettings,
    schedule: NoiseSchedule,
    guider: Any = None,
    timesteps: tuple[float, ...] = (),
    weak: Network | None = None,
) -> Guidance:
    """The guidance object of these settings: none where the method does not guide (cfg at scale 1)."""
    if not settings.enabled or guider is None:
        return Guidance(settings)
    return GuiderGuidance(settings, guider, schedule, timesteps, weak)
