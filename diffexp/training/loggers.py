"""Where training reports: ``train.jsonl`` and sample PNGs in its folder, and its W&B run (``job_type=train``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from diffexp.config import LoggerConfig
from diffexp.images import save_grid
from diffexp.tracking.session import finish_run, image, reason, start_run

log = logging.getLogger("diffexp")


class TrainLogger(Protocol):
    """Where loss and sample grids go: ``log(metrics, step, images)``; images are [-1, 1] NCHW batches."""

    def log(self, metrics: dict[str, float], step: int, images: dict[str, torch.Tensor] | None = None) -> None: ...

    def close(self, error: BaseException | None = None) -> None: ...


class JsonlLogger:
    """``train.jsonl`` (one line per log call) and ``samples/<name>-stepNNNNNN.png``."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "train.jsonl"
        self.samples = Path(out_dir) / "samples"
        self.samples.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int, images: dict[str, torch.Tensor] | None = None) -> None:
        record: dict[str, Any] = {"step": step, **metrics}
        for name, x in (images or {}).items():
            record[name] = str(save_grid(x, self.samples / f"{name}-step{step:06d}.png"))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, error: BaseException | None = None) -> None:
        pass


class TrainRun:
    """Training's W&B run: loss, learning rate and EMA sample grids at the training step (a ``TrainLogger``)."""

    def __init__(
        self,
        logger_cfg: LoggerConfig | Any | None,
        out_dir: Path,
        name: str,
        config: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        """``run_id``: the W&B run of the training this one resumes."""
        self.run = start_run(logger_cfg, out_dir, name, "train", config, run_id=run_id)

    def log(self, metrics: dict[str, float], step: int, images: dict[str, torch.Tensor] | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**metrics, **{k: image(v) for k, v in (images or {}).items()}}, step=step)
        except Exception as err:
            log.warning("W&B failed to log step %d (%s); training goes on without W&B.", step, reason(err))
            self.close(err)

    def close(self, error: BaseException | None = None) -> None:
        finish_run(self.run, error)
        self.run = None
