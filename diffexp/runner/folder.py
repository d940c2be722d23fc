"""The run-folder observer: the source of truth for a run, written as it goes (formats: diffexp.folders).

Every file is written atomically (a temporary name, then a rename), so a crash or a full disk never leaves a
truncated file under its final name. The status is written before anything else at the end, and never depends on
other writes: ``metrics.json`` exists only beside ``finished``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import METRICS_FILE, RunStatus, atomic, end_status, heartbeat, now, write_json, write_status
from diffexp.runner.observers import ChunkDone, Observer, RunInfo
from diffexp.samples import LATENTS_FILE, SAMPLES_FILE
from diffexp.sampling.images import save_grid
from diffexp.sampling.loop import StepState

SNAPSHOTS_DIR = ".trajectory"  # one file per snapshot while the run goes; trajectory.npz at the end


@contextmanager
def writing(what: Path | str) -> Iterator[None]:
    """A failed write (full disk, file-size limit, read-only folder) as one clear paragraph."""
    try:
        yield
    except OSError as err:
        raise DiffexpError(
            f"Could not write {what}: {err.strerror or err}. The disk may be full, a file-size limit (ulimit -f) "
            "reached, or the folder read-only; the run is marked failed, and no file is left half-written."
        ) from None


def join_snapshots(files: list[Path], path: Path) -> None:
    """``trajectory.npz`` from the snapshot files, one array and one snapshot at a time (memory stays flat)."""
    with np.load(files[0]) as first:
        layout = {k: (first[k].dtype, first[k].shape) for k in first.files}
    with atomic(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for key, (dtype, shape) in layout.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as out:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                np.lib.format.write_array_header_2_0(out, header | {"shape": (len(files), *shape)})
                for f in files:
                    with np.load(f) as snapshot:
                        out.write(np.ascontiguousarray(snapshot[key], dtype=dtype).tobytes())


class RunFiles(Observer):
    """Writes config.yaml, status.json, grids/, steps.jsonl, samples.{png,npy}, trajectory.npz, metrics.json; a
    chunked run's samples are chunks/ (diffexp.samples). A latent model's grids and samples are decoded images,
    latents.npy its final latents, trajectory.npz its latents."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.snapshots: list[Path] = []

    def start(self, run: RunInfo) -> None:
        self.dir = run.out_dir
        self.grids = self.dir / "grids"
        self.single = run.chunks == 1
        with writing(self.dir / "status.json"):
            self.status = write_status(
                self.dir, RunStatus.running, label=run.label, started=now(), chunks=run.chunks, resumed=run.first_done
            )
        with writing(self.dir):
            (self.dir / METRICS_FILE).unlink(missing_ok=True)  # only beside finished
            self.grids.mkdir(parents=True, exist_ok=True)
            with atomic(self.dir / "config.yaml") as tmp:
                tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(run.config)))
            write_json(self.dir / "scheduler.json", run.scheduler.effective_config())
            if not run.first_done:  # the first chunk is sampled now: its records start afresh
                (self.dir / "steps.jsonl").write_text("")
                shutil.rmtree(self.dir / SNAPSHOTS_DIR, ignore_errors=True)
            (self.dir / SNAPSHOTS_DIR).mkdir(exist_ok=True)

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        name = f"step{state.step:04d}"
        with writing(self.grids / name):
            save_grid(state.x_pixels, self.grids / f"{name}_x.png")  # a latent model's: decoded
            save_grid(state.x0_pixels, self.grids / f"{name}_x0.png")
            with (self.dir / "steps.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            heartbeat(self.dir, self.status, step=state.step)  # status.json: alive, and how far
            path = self.dir / SNAPSHOTS_DIR / f"{len(self.snapshots):05d}.npz"
            with atomic(path) as tmp:  # streamed to disk: memory does not grow with the trajectory
                np.savez(
                    tmp,
                    x=state.x.float().cpu().numpy(),
                    x0=state.x0.float().cpu().numpy(),
                    step=np.array(state.step),
                    nfe=np.array(state.nfe),
                    timestep=np.array(state.timestep, dtype=np.float64),
                    sigma=np.array(state.sigma, dtype=np.float64),
                )
            self.snapshots.append(path)

    def chunk(self, done: ChunkDone) -> None:
        if done.index != 0:
            return
        with writing(self.dir / "samples.png"):
            save_grid(done.images[:64], self.dir / "samples.png")
            if self.single:  # a chunked run's samples are its chunk files
                with atomic(self.dir / SAMPLES_FILE) as tmp:
                    np.save(tmp, done.images.numpy().astype(np.float32))
                if done.latents is not None:  # a latent model: samples.npy holds the decoded images, this the latents
                    with atomic(self.dir / LATENTS_FILE) as tmp:
                        np.save(tmp, done.latents.numpy().astype(np.float32))

    def finish(self, final: StepState | None, metrics: dict[str, Any]) -> None:
        with writing(self.dir / "trajectory.npz"):
            self._save_trajectory()
        with writing(self.dir / METRICS_FILE):
            write_json(self.dir / METRICS_FILE, metrics)
        with writing(self.dir / "status.json"):
            end_status(self.dir, self.status, None)

    def close(self, error: BaseException | None) -> None:
        if error is None or not self.status:
            return
        end_status(self.dir, self.status, error)  # first: it must not depend on the writes below
        (self.dir / METRICS_FILE).unlink(missing_ok=True)
        self._save_trajectory()  # what was sampled before the failure stays readable

    def _save_trajectory(self) -> None:
        """All snapshots, lossless, for notebooks: np.load(run_dir / "trajectory.npz")."""
        if self.snapshots:
            join_snapshots(self.snapshots, self.dir / "trajectory.npz")
            shutil.rmtree(self.dir / SNAPSHOTS_DIR, ignore_errors=True)
            self.snapshots = []
