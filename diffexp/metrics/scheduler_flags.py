"""What the scheduler itself does to the comparison: clipping or thresholding x0 (then it follows another ODE
than the model's own) and injecting fresh noise (then the reference from the same noise is not its target)."""

from __future__ import annotations

from typing import Any

from diffexp.catalog import option_signatures
from diffexp.metrics.base import Context, Key, Metric, Values
from diffexp.metrics.reference import CLIPPING_OPTIONS
from diffexp.sampling.schedulers import BuiltScheduler


def clipping(built: BuiltScheduler) -> dict[str, bool]:
    """Whether this scheduler clips or thresholds x0."""
    init, _ = option_signatures(type(built.scheduler))
    return {k: bool(built.scheduler.config.get(k)) if k in init else False for k in CLIPPING_OPTIONS}


class SchedulerFlags(Metric):
    """Always on: ``clip_sample``, ``thresholding`` and ``stochastic``."""

    name = "scheduler_flags"
    keys = (Key("clip_sample"), Key("thresholding"), Key("stochastic"))

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return True

    def final(self, values: Values) -> dict[str, Any]:
        return {**clipping(self.ctx.run.scheduler), "stochastic": self.ctx.run.scheduler.stochastic}
