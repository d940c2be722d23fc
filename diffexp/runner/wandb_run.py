"""The sampling run's W&B observer: config, x/x0 grids and scalars at each snapshot, metrics as the summary."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffexp.runner.observers import Observer, RunInfo
from diffexp.runner.summary import STEP_AXES
from diffexp.sampling.loop import StepState
from diffexp.tracking.session import finish_run, image, reason, start_run

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger("diffexp")

SCHEDULER_KEY = "scheduler_label"  # the config key that names a run's scheduler with its options: runs group by it


def run_config(run: RunInfo) -> dict[str, Any]:
    """The resolved config plus what it resolved to: the scheduler in force, the model, the machine."""
    return {
        **run.settings.config,
        "label": run.label,
        SCHEDULER_KEY: run.scheduler.label,
        "effective_scheduler": run.scheduler.effective_config(),
        "loaded_model": {"name": run.model.name, "id": run.model.id, "revision": run.model.revision},
        "environment": run.environment,
    }


class WandbRun(Observer):
    """One W&B run per sampling run: config, x/x0 grids and scalars at each snapshot, metrics as the summary."""

    def __init__(self) -> None:
        self.run: Run | None = None

    def start(self, run: RunInfo) -> None:
        """Starts a W&B run unless ``logger`` is null (``logger=none``)."""
        self.run = start_run(run.settings.logger, run.out_dir, run.label, "sample", run_config(run))
        if self.run is not None:
            self._safely("define metrics", self._define_metrics)

    def _define_metrics(self) -> None:
        # charts plot against the sampling step by default; "nfe" or "elapsed_s" can be picked as the x-axis
        assert self.run is not None
        for axis in STEP_AXES:
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric=STEP_AXES[0])

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        if self.run is not None:
            scalars = {k: v for k, v in record.items() if v is not None}
            self._safely(
                f"log step {state.step}",
                lambda: self.run.log(
                    {**scalars, "x": image(state.x_pixels), "x0": image(state.x0_pixels)}, step=state.step
                ),
            )

    def finish(self, final: StepState | None, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            samples = {} if final is None else {"samples": image(final.x_pixels)}
            self._safely("write the summary", lambda: self.run.summary.update({**metrics, **samples}))

    def close(self, error: BaseException | None) -> None:
        finish_run(self.run, error)
        self.run = None

    def _safely(self, what: str, action: Callable[[], object]) -> None:
        """Do a W&B action; on failure say so, stop logging and let sampling go on."""
        try:
            action()
        except Exception as err:
            log.warning("W&B failed to %s (%s); this run goes on without W&B.", what, reason(err))
            finish_run(self.run, err)
            self.run = None
