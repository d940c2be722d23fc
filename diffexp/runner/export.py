"""A finished run's samples for external FID tools: a folder of PNGs and an .npz of uint8 images.

- PNGs: one file per sample, named by its index (``000000.png``), grey samples as 1-channel images: the input of
  torch-fidelity, clean-fid and pytorch-fid's folder modes.
- ``.npz``: ``arr_0``, uint8 NHWC, the layout guided-diffusion's evaluator reads (clean-fid and torch-fidelity
  take it too). Grey samples are repeated to 3 channels there, since these evaluators expect RGB.
Pixels are the run's own uint8 conversion (``images.to_uint8``), as in its grids.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffexp.errors import DiffexpError
from diffexp.folders import RunStatus, atomic, read_status_record
from diffexp.images import to_uint8
from diffexp.samples import load_samples

EXPORT_DIR = "export"  # inside the run folder
PNG_DIR = "png"
NPZ_FILE = "samples.npz"
CHUNK = 1024  # samples converted at a time


@dataclass
class Exported:
    count: int
    png_dir: Path | None
    npz: Path | None
    npz_shape: tuple[int, ...] | None


def finished_samples(run_dir: Path) -> np.ndarray:
    """The samples of a finished run, or a clear error for a folder that is not one."""
    record = read_status_record(run_dir)
    if record is None:
        raise DiffexpError(
            f"{run_dir} is not a run folder (it has no status.json). Pass the folder a run wrote, e.g. "
            "outputs/runs/<date>/<time>-<id>-<model>-<label>."
        )
    if record.get("status") != RunStatus.finished.value:
        raise DiffexpError(
            f"{run_dir} is a run that has not finished (status: {record.get('status')}), so its samples are "
            "missing or incomplete; export a finished run, or run it again."
        )
    return load_samples(run_dir)


def uint8_images(samples: np.ndarray) -> np.ndarray:
    """float32 NCHW in [-1, 1] -> uint8 NHWC, chunk by chunk."""
    parts = [to_uint8(torch.from_numpy(samples[i : i + CHUNK])) for i in range(0, len(samples), CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, *samples.shape[2:], samples.shape[1]), np.uint8)


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    """One PNG per image, ``000000.png`` ..., replacing the folder as a whole (no stale files of an earlier
    export stay behind to be counted)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(6, len(str(len(images) - 1)))
    for k, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / f"{k:0{width}d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def write_npz(images: np.ndarray, path: Path) -> tuple[int, ...]:
    """``arr_0``: uint8 NHWC with 3 channels (grey repeated)."""
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp, tmp.open("wb") as f:  # np.savez would add .npz to a path without it
        np.savez(f, arr_0=rgb)
    return tuple(rgb.shape)


def export_run(run_dir: Path, out: Path | None = None, png: bool = True, npz: Path | bool = True) -> Exported:
    """Export a finished run's samples: PNGs into ``<out>/png/`` and the .npz to ``npz`` (True: ``<out>/samples.npz``;
    False: none). ``out`` defaults to ``<run_dir>/export``."""
    run_dir = Path(run_dir)
    images = uint8_images(finished_samples(run_dir))
    out = Path(out) if out is not None else run_dir / EXPORT_DIR
    npz_path = out / NPZ_FILE if npz is True else (Path(npz) if npz is not False else None)
    target = out / PNG_DIR
    try:
        png_dir = write_pngs(images, target) if png else None
        target = npz_path
        shape = write_npz(images, npz_path) if npz_path is not None else None
    except OSError as err:
        raise DiffexpError(
            f"Could not write {target}: {err.strerror or err}. Choose a folder you can write with --out / --npz "
            "(an earlier export there is left as it was)."
        ) from None
    return Exported(len(images), png_dir, npz_path, shape)
