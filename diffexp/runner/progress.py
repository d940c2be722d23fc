"""A terminal progress bar over model calls (tqdm)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from diffexp.runner.observers import Observer, RunInfo
from diffexp.sampling.loop import StepState


class ProgressBar(Observer):
    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, run: RunInfo) -> None:
        """A bar over the model calls, unless ``progress=false``."""
        if not run.settings.progress:
            return
        chunks = f" ({run.todo} chunks)" if run.todo > 1 else ""
        self.bar = tqdm(total=run.total_calls * run.todo, desc=run.label + chunks, unit="call", dynamic_ncols=True)

    def call(self, state: StepState) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(step=f"{state.step}/{state.num_steps}", t=f"{state.timestep:.0f}", refresh=False)
        self.bar.update(1)

    def close(self, error: BaseException | None) -> None:
        if self.bar is not None:
            self.bar.close()
