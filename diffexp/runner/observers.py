"""The observer contract: what the runner tells the run folder, the progress bar, W&B and any other watcher.

Observers only read the loop's tensors; none of them can change the maths. A CLI run builds its observers from
the config's ``observers`` (``_target_`` entries, in order); each gets everything it needs in ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffexp.sampling.loop import StepState
from diffexp.sampling.models import LoadedModel
from diffexp.sampling.schedulers import BuiltScheduler


@dataclass
class RunInfo:
    """Everything known before the first model call."""

    cfg: DictConfig  # the run config
    config: dict[str, Any]  # the same, resolved
    out_dir: Path
    label: str  # e.g. ddim-30, dpmsolver-karras-20
    model: LoadedModel
    scheduler: BuiltScheduler
    device: torch.device
    dtype: torch.dtype
    total_calls: int  # model calls this run will make (NFE)
    environment: dict[str, Any]  # versions, device name


class Observer:
    """No-op defaults; an observer overrides what it needs."""

    def start(self, run: RunInfo) -> None:
        """Before the first model call."""

    def call(self, state: StepState) -> None:
        """After every model call (keep it cheap)."""

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        """At every snapshot, with its scalars (the same record goes to every observer)."""

    def finish(self, final: StepState, metrics: dict[str, Any]) -> None:
        """After the last call, with the run's metrics."""

    def close(self, error: BaseException | None) -> None:
        """Always called last, also after a failure; must not raise."""
