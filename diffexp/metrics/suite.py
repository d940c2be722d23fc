"""The metrics of a run: every metric its config switches on, prepared before sampling starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffexp.metrics.agreement import ReferenceAgreement
from diffexp.metrics.base import Chunk, Context, Metric, RunFacts, Values, quality_keys, stated_with
from diffexp.metrics.fid import FidKid
from diffexp.metrics.labels import LabelAccuracy
from diffexp.metrics.landing import Landing
from diffexp.metrics.residual_noise import ResidualNoise
from diffexp.metrics.scheduler_flags import SchedulerFlags
from diffexp.sampling.experiment import Experiment
from diffexp.sampling.loop import StepState

# in the order they are prepared: the reference (which landing uses) before the others
METRICS: tuple[type[Metric], ...] = (
    SchedulerFlags,
    ReferenceAgreement,
    Landing,
    FidKid,
    ResidualNoise,
    LabelAccuracy,
)
QUALITY = quality_keys(METRICS)  # final keys with a direction: the report's quality axes
STATED_WITH = stated_with(METRICS)  # keys shown beside a value wherever it is shown (FID: its n and network)


class RunMetrics:
    """The enabled metrics of one run: ``snapshot`` adds to the first chunk's records, ``measure`` gives a chunk's
    per-sample values (named ``Metric.value``), ``final`` reduces every sample's values to the final metrics."""

    def __init__(self, exp: Experiment, progress: bool = False) -> None:
        settings = exp.run.metrics
        ctx = Context(run_facts(exp), settings, Path(settings.cache_dir).expanduser(), progress)
        self.metrics = [m(ctx) for m in METRICS if m.enabled(ctx)]

    def snapshot(self, state: StepState) -> dict[str, Any]:
        return {k: v for m in self.metrics for k, v in m.snapshot(state).items()}

    def measure(self, exp: Experiment, final: StepState) -> Values:
        """A chunk's per-sample values, each named ``<metric name>.<value>``."""
        chunk = chunk_of(exp)
        with torch.inference_mode():
            return {f"{m.name}.{k}": v.cpu() for m in self.metrics for k, v in m.measure(chunk, final).items()}

    def final(self, values: Values) -> dict[str, Any]:
        """``values``: every sample's, in sample order (``measure``'s chunks concatenated)."""
        out: dict[str, Any] = {}
        for m in self.metrics:
            prefix = f"{m.name}."
            out |= m.final({k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)})
        return out


def chunk_of(exp: Experiment) -> Chunk:
    """What a metric knows of the chunk ``exp`` is bound to."""
    return Chunk(exp.samples, exp.noise, exp.model, None if exp.labels is None else tuple(exp.labels))


def run_facts(exp: Experiment) -> RunFacts:
    """What a metric knows of the run: its first chunk, and the shape of its images (a latent model's decoded)."""
    loaded = exp.loaded
    if loaded.latent is None:
        shape = tuple(loaded.sample_shape)
    else:
        height, width = (s * loaded.latent.scale for s in loaded.latent.size)
        shape = (int(loaded.latent.vae.config.out_channels), height, width)
    return RunFacts(
        exp.run.seed,
        exp.run.precision.value,
        exp.num_samples,
        exp.device,
        loaded,
        exp.built,
        shape,  # type: ignore[arg-type]
        chunk_of(exp),
        exp.run.steps,
    )
