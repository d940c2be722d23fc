"""The run folder: the source of truth for a run, written as it goes.

status.json says running / finished / failed; metrics.json exists only for a finished run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from diffexp.images import save_grid
from diffexp.observers import Observer, RunInfo
from diffexp.sampler import StepState


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: Path) -> str | None:
    """``running``, ``finished``, ``failed`` or ``interrupted``; None for a folder that is not a run."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Record a run that failed before it started sampling."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "status.json", {"status": "failed", "error": str(error), "error_type": type(error).__name__})


class RunFiles(Observer):
    """Writes config.yaml, status.json, grids/, steps.jsonl, samples.{png,npy}, trajectory.npz, metrics.json."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir)
        self.grids = self.dir / "grids"
        self.snapshots: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {}

    def start(self, run: RunInfo) -> None:
        self.grids.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.config)))
        write_json(self.dir / "scheduler.json", run.scheduler.effective_config())
        (self.dir / "steps.jsonl").write_text("")
        self.status = {"status": "running", "label": run.label, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.dir / "status.json", self.status)

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        name = f"step{state.step:04d}"
        save_grid(state.x, self.grids / f"{name}_x.png")
        save_grid(state.x0, self.grids / f"{name}_x0.png")
        with (self.dir / "steps.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.snapshots.append(
            {
                "x": state.x.float().cpu(),
                "x0": state.x0.float().cpu(),
                "step": state.step,
                "nfe": state.nfe,
                "timestep": state.timestep,
                "sigma": state.sigma,
            }
        )

    def finish(self, final: StepState, metrics: dict[str, Any]) -> None:
        save_grid(final.x, self.dir / "samples.png")
        np.save(self.dir / "samples.npy", final.x.float().cpu().numpy().astype(np.float32))
        self._save_trajectory()
        write_json(self.dir / "metrics.json", metrics)
        self.status.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json(self.dir / "status.json", self.status)

    def close(self, error: BaseException | None) -> None:
        if error is None or not self.status:
            return
        self._save_trajectory()  # what was sampled before the failure stays readable
        kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.status.update(status=kind, error=str(error) or type(error).__name__, error_type=type(error).__name__)
        write_json(self.dir / "status.json", self.status)

    def _save_trajectory(self) -> None:
        """All snapshots, lossless, for notebooks: np.load(run_dir / "trajectory.npz")."""
        if not self.snapshots:
            return
        s = self.snapshots
        np.savez(
            self.dir / "trajectory.npz",
            x=torch.stack([v["x"] for v in s]).numpy(),
            x0=torch.stack([v["x0"] for v in s]).numpy(),
            step=np.array([v["step"] for v in s]),
            nfe=np.array([v["nfe"] for v in s]),
            timestep=np.array([v["timestep"] for v in s], dtype=np.float64),
            sigma=np.array([v["sigma"] for v in s], dtype=np.float64),
        )
