"""The metric contract: what a metric computes, when, and which way is better.

A metric is prepared before sampling starts (a reference solve, a feature network: never timed as sampling),
adds values to every snapshot's record (of the first chunk), measures per-sample values of every chunk, and
reduces all samples' values, in sample order, to the final metrics. Per-sample values are what chunk files keep
and what ranks gather, so chunking, resuming and sharding cannot change a result. A metric declares the keys it
writes with their direction; the report and W&B read the declarations, so a new metric appears there by itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from diffexp.config import MetricsConfig
from diffexp.sampling.adapters import Adapter
from diffexp.sampling.loop import StepState
from diffexp.sampling.models import LoadedModel
from diffexp.sampling.schedulers import BuiltScheduler

Better = Literal["lower", "higher"]
Values = dict[str, torch.Tensor]  # per-sample values: the first dimension runs over samples


@dataclass(frozen=True)
class Key:
    """A value a metric writes: in the final metrics (``final``) or in every snapshot's record (``snapshot``)."""

    name: str
    better: Better | None = None  # set for a quality axis that the report plots against cost
    when: Literal["final", "snapshot"] = "final"
    stated_with: tuple[str, ...] = ()  # keys the value depends on, shown beside it wherever it is shown (FID: n)


@dataclass(frozen=True)
class Chunk:
    """What a metric knows of a chunk: its sample indices, their initial noise and labels, and the adapter that
    samples them (its condition and guidance)."""

    samples: range
    noise: torch.Tensor
    model: Adapter
    labels: tuple[int, ...] | None  # class-conditional models: each sample's class


@dataclass(frozen=True)
class RunFacts:
    """What a metric knows of its run."""

    seed: int
    precision: str
    num_samples: int
    device: torch.device
    model: LoadedModel
    scheduler: BuiltScheduler
    pixel_shape: tuple[int, int, int]  # the run's images (a latent model's decoded), known without sampling
    first: Chunk  # the first chunk, whose snapshots the metrics see
    steps: int = 0  # the run's steps (the uncached reference samples them again)


@dataclass
class Context:
    """What every metric of a run shares: the run's facts, its metrics config and what earlier metrics prepared."""

    run: RunFacts
    settings: MetricsConfig
    cache_dir: Path
    progress: bool
    reference: Any = None  # diffexp.metrics.reference.Reference, once a metric has solved it


class Metric(ABC):
    """One family of values. ``enabled`` decides from the config; the constructor prepares, before the clock.
    ``name`` keys its per-sample values in chunk files, so it never changes with the class's name."""

    name: ClassVar[str]
    keys: ClassVar[tuple[Key, ...]]

    @classmethod
    @abstractmethod
    def enabled(cls, ctx: Context) -> bool: ...

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def snapshot(self, state: StepState) -> dict[str, Any]:
        """Values for this snapshot's record (``when="snapshot"`` keys), on the first chunk."""
        return {}

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        """Per-sample values of one chunk (``final``: its last state)."""
        return {}

    @abstractmethod
    def final(self, values: Values) -> dict[str, Any]:
        """Values for metrics.json and the W&B summary, from every sample's ``measure`` in sample order."""


def quality_keys(metrics: Sequence[type[Metric]]) -> dict[str, Better]:
    """Every final key with a direction, in declaration order: the report's quality axes."""
    return {k.name: k.better for m in metrics for k in m.keys if k.better is not None and k.when == "final"}


def stated_with(metrics: Sequence[type[Metric]]) -> dict[str, tuple[str, ...]]:
    """Every key that is shown with others beside it, and those others."""
    return {k.name: k.stated_with for m in metrics for k in m.keys if k.stated_with}


def snapshot_keys(metrics: Sequence[type[Metric]]) -> list[str]:
    return [k.name for m in metrics for k in m.keys if k.when == "snapshot"]
