"""The on-disk format of a run's samples: ``samples.npy`` for a run of one chunk, chunk files for the rest.

``load_samples(run_dir)`` returns every sample of a run as one float32 NCHW array in [-1, 1], in sample order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffexp.errors import DiffexpError

SAMPLES_FILE = "samples.npy"


def load_samples(run_dir: Path | str) -> np.ndarray:
    """All samples of a run, float32 NCHW in [-1, 1], sample k at index k."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise DiffexpError(f"{run_dir} holds no samples ({SAMPLES_FILE} is missing): is it a finished run folder?")
    return np.load(path).astype(np.float32, copy=False)
