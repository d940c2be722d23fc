"""The observer contract: what the runner tells the run folder, the progress bar, W&B and any other watcher.

Observers only read the loop's tensors; none of them can change the maths. A CLI run builds its observers from
the config's ``observers`` (``_target_`` entries, in order); each gets everything it needs in ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffexp.sampling.loop import StepState
from diffexp.sampling.models import LoadedModel
from diffexp.sampling.schedulers import BuiltScheduler
from diffexp.settings import RunSettings


@dataclass
class RunInfo:
    """Everything known before the first model call."""

    settings: RunSettings  # the run's settings, read from its config
    out_dir: Path
    label: str  # e.g. ddim-30, dpmsolver-karras-20
    model: LoadedModel
    scheduler: BuiltScheduler
    device: torch.device
    dtype: torch.dtype
    total_calls: int  # model calls per chunk (NFE)
    environment: dict[str, Any]  # versions, device name
    chunks: int = 1  # chunks of the run (num_samples / batch_size, rounded up)
    todo: int = 1  # chunks this process will sample (others are another rank's, or finished before)
    first_done: bool = False  # resumed after its first chunk finished: that chunk's grids and records stay


@dataclass
class ChunkDone:
    """A chunk sampled by this process: its images, per-sample metric values and cost."""

    index: int  # the chunk's number
    samples: range  # its sample indices
    images: torch.Tensor  # float32 on the CPU, in [-1, 1]: a latent model's decoded samples
    latents: torch.Tensor | None  # a latent model's final latents
    values: dict[str, torch.Tensor]  # per-sample metric values (diffexp.metrics.suite.RunMetrics.measure)
    cost: dict[str, Any]  # sampling_s, decode_s, nfe, net_evals
    final: StepState | None = None  # its last state, when sampled in one piece


class Observer:
    """No-op defaults; an observer overrides what it needs."""

    def start(self, run: RunInfo) -> None:
        """Before the first model call."""

    def call(self, state: StepState) -> None:
        """After every model call (keep it cheap)."""

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        """At every snapshot, with its scalars (the same record goes to every observer)."""

    def chunk(self, done: ChunkDone) -> None:
        """After each chunk this process sampled."""

    def finish(self, final: StepState | None, metrics: dict[str, Any]) -> None:
        """At the end, with the run's metrics; ``final`` is the first chunk's last state (None when it was sampled
        before a resume)."""

    def close(self, error: BaseException | None) -> None:
        """Always called last, also after a failure; must not raise."""
