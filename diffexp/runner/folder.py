"""The run-folder observer: the source of truth for a run, written as it goes (formats: diffexp.folders).

Every file is written atomically (a temporary name, then a rename), so a crash or a full disk never leaves a
truncated file under its final name. Snapshot files and the samples are written beside the loop, in order
(diffexp.runner.background), from copies taken at the snapshot; a failed write fails the run all the same. The
status is written before anything else at the end, and never depends on other writes: ``metrics.json`` exists
only beside ``finished``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import METRICS_FILE, RunStatus, atomic, end_status, heartbeat, now, write_json, write_status
from diffexp.images import save_grid
from diffexp.runner.background import Background
from diffexp.runner.observers import ChunkDone, Observer, RunInfo
from diffexp.samples import LATENTS_FILE, SAMPLES_FILE
from diffexp.sampling.loop import StepState

SNAPSHOTS_DIR = ".trajectory"  # the snapshots while the run goes (Trajectory); trajectory.npz at the end


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


def host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class Trajectory:
    """The snapshots' x and x0, appended to raw files as the run goes (memory stays flat whatever the run's
    length), and their step, NFE, timestep and noise level; ``save`` joins them into one ``.npz``."""

    ARRAYS: ClassVar[tuple[str, ...]] = ("x", "x0")
    SCALARS: ClassVar[dict[str, type[np.generic]]] = {
        "step": np.int64,
        "nfe": np.int64,
        "timestep": np.float64,
        "sigma": np.float64,
    }

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.scalars: dict[str, list[float]] = {key: [] for key in self.SCALARS}

    def __len__(self) -> int:
        return len(self.scalars["step"])

    def append(self, state: StepState) -> None:
        for key in self.ARRAYS:
            array = np.ascontiguousarray(getattr(state, key).float().cpu().numpy())
            self.layout.setdefault(key, (array.dtype, array.shape))
            with open(self.folder / f"{key}.raw", "ab") as f:
                f.write(array.tobytes())
        for key in self.scalars:  # last: a snapshot counts once all of it is written
            self.scalars[key].append(getattr(state, key))

    def save(self, path: Path) -> None:
        """``path`` (``np.load``-able: x, x0, step, nfe, timestep, sigma), written atomically; the raw files go."""
        n = len(self)
        if n:
            with atomic(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
                for key, (dtype, shape) in self.layout.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as out:
                        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                        np.lib.format.write_array_header_2_0(out, header | {"shape": (n, *shape)})
                        with open(self.folder / f"{key}.raw", "rb") as raw:  # n whole snapshots, in blocks
                            left = n * int(np.prod(shape)) * dtype.itemsize
                            while left and (block := raw.read(min(left, 1 << 24))):
                                out.write(block)
                                left -= len(block)
                for key, values in self.scalars.items():
                    with archive.open(f"{key}.npy", "w") as out:
                        np.lib.format.write_array(out, np.asarray(values, dtype=self.SCALARS[key]))
        shutil.rmtree(self.folder, ignore_errors=True)
        self.layout.clear()
        for values in self.scalars.values():
            values.clear()


class RunFiles(Observer):
    """Writes config.yaml, status.json, grids/, steps.jsonl, samples.{png,npy}, trajectory.npz, metrics.json; a
    chunked run's samples are chunks/ (diffexp.samples). A latent model's grids and samples are decoded images,
    latents.npy its final latents, trajectory.npz its latents."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.trajectory: Trajectory | None = None
        self.background: Background | None = None

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
                tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(run.settings.config)))
            write_json(self.dir / "scheduler.json", run.scheduler.effective_config())
            if not run.first_done:  # the first chunk is sampled now: its records start afresh
                (self.dir / "steps.jsonl").write_text("")
                shutil.rmtree(self.dir / SNAPSHOTS_DIR, ignore_errors=True)
            (self.dir / SNAPSHOTS_DIR).mkdir(exist_ok=True)
        self.trajectory = Trajectory(self.dir / SNAPSHOTS_DIR)
        self.background = Background("diffexp-files")

    def snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        # copies on the host, taken now: the files are written beside the loop (Background)
        kept = replace(
            state,
            x=host_copy(state.x),
            x0=host_copy(state.x0),
            x_image=None if state.x_image is None else host_copy(state.x_image),
            x0_image=None if state.x0_image is None else host_copy(state.x0_image),
        )
        self.background.submit(lambda: self._write_snapshot(kept, record))

    def _write_snapshot(self, state: StepState, record: dict[str, Any]) -> None:
        name = f"step{state.step:04d}"
        with writing(self.grids / name):
            save_grid(state.x_pixels, self.grids / f"{name}_x.png")  # a latent model's: decoded
            save_grid(state.x0_pixels, self.grids / f"{name}_x0.png")
            with (self.dir / "steps.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            heartbeat(self.dir, self.status, step=state.step)  # status.json: alive, and how far
            self.trajectory.append(state)

    def chunk(self, done: ChunkDone) -> None:
        if done.index == 0:
            self.background.submit(lambda: self._write_samples(done))

    def _write_samples(self, done: ChunkDone) -> None:
        with writing(self.dir / "samples.png"):
            save_grid(done.images[:64], self.dir / "samples.png")
            if self.single:  # a chunked run's samples are its chunk files
                with atomic(self.dir / SAMPLES_FILE) as tmp:
                    np.save(tmp, done.images.numpy().astype(np.float32))
                if done.latents is not None:  # a latent model: samples.npy holds the decoded images, this the latents
                    with atomic(self.dir / LATENTS_FILE) as tmp:
                        np.save(tmp, done.latents.numpy().astype(np.float32))

    def finish(self, final: StepState | None, metrics: dict[str, Any]) -> None:
        self.background.wait()  # raises a failed write
        with writing(self.dir / "trajectory.npz"):
            self._save_trajectory()
        with writing(self.dir / METRICS_FILE):
            write_json(self.dir / METRICS_FILE, metrics)
        with writing(self.dir / "status.json"):
            end_status(self.dir, self.status, None)

    def close(self, error: BaseException | None) -> None:
        if self.background is not None:
            self.background.close()
        if error is None or not self.status:
            return
        end_status(self.dir, self.status, error)  # first: it must not depend on the writes below
        (self.dir / METRICS_FILE).unlink(missing_ok=True)
        self._save_trajectory()  # what was sampled before the failure stays readable

    def _save_trajectory(self) -> None:
        """All snapshots, lossless, for notebooks: np.load(run_dir / "trajectory.npz")."""
        if self.trajectory is not None:
            self.trajectory.save(self.dir / "trajectory.npz")
