"""The run-folder observer: the source of truth for a run, written as it goes (formats: diffexp.folders)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from diffexp.folders import METRICS_FILE, RunStatus, end_status, heartbeat, now, write_json, write_status
from diffexp.runner.observers import Observer, RunInfo
from diffexp.sampling.images import save_grid
from diffexp.sampling.loop import StepState


class RunFiles(Observer):
    """Writes config.yaml, status.json, grids/, steps.jsonl, samples.{png,npy}, trajectory.npz, metrics.json;
    a latent model's grids and samples are decoded images, latents.npy its final latents, trajectory.npz latents."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {}

    def start(self, run: RunInfo) -> None:
        self.dir = run.out_dir
        self.grids = self.dir / "grids"
        self.grids.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.config)))
        write_json(self.dir / "scheduler.json", run.scheduler.effective_config())
        (self.dir / "steps.jsonl").write_text("")
        self.status = write_status(self.dir, RunStatus.running, label=run.label, started=now())

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        name = f"step{state.step:04d}"
        save_grid(state.x_pixels, self.grids / f"{name}_x.png")  # a latent model's: decoded
        save_grid(state.x0_pixels, self.grids / f"{name}_x0.png")
        with (self.dir / "steps.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        heartbeat(self.dir, self.status, step=state.step)  # status.json: alive, and how far
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
        save_grid(final.x_pixels, self.dir / "samples.png")
        np.save(self.dir / "samples.npy", final.x_pixels.float().cpu().numpy().astype(np.float32))
        if final.x_image is not None:  # a latent model: samples.npy holds the decoded images, these the latents
            np.save(self.dir / "latents.npy", final.x.float().cpu().numpy().astype(np.float32))
        self._save_trajectory()
        write_json(self.dir / METRICS_FILE, metrics)
        end_status(self.dir, self.status, None)

    def close(self, error: BaseException | None) -> None:
        if error is None or not self.status:
            return
        self._save_trajectory()  # what was sampled before the failure stays readable
        end_status(self.dir, self.status, error)

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
