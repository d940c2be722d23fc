"""What a run will take, checked before it samples: at most ``MAX_SAMPLES`` samples, and chunk files that fit on
the output folder's disk. A refusal says the estimated disk and time."""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection
from pathlib import Path

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.experiment import Experiment

MAX_SAMPLES = 10**8  # samples per run: the cap on num_samples (README: caps and refusals)
VALUES_BYTES = 256  # a sample's metric values and index in its chunk file, generously


def sample_bytes(exp: Experiment) -> int:
    """Bytes one sample takes in its chunk file: its float32 image, and a latent model's float32 latents."""
    c, h, w = exp.loaded.sample_shape
    latent = exp.loaded.latent
    if latent is None:
        return 4 * c * h * w + VALUES_BYTES
    return 4 * (3 * h * w * latent.scale**2 + c * h * w) + VALUES_BYTES


def duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


def seconds_per_call(exp: Experiment) -> float:
    """One model call of the first chunk, timed."""
    started = time.perf_counter()
    with torch.inference_mode():
        exp.model(exp.noise, exp.built.scheduler.timesteps[0])
    if exp.device.type == "cuda":
        torch.cuda.synchronize(exp.device)
    return time.perf_counter() - started


def check_budget(exp: Experiment, out_dir: Path, finished: Collection[int] = ()) -> None:
    """Refuse a run above ``MAX_SAMPLES`` samples, or one whose chunk files would not fit on the disk of
    ``out_dir`` (finished chunks of an earlier try are already there)."""
    chunks = exp.chunks()
    n, left_chunks = exp.num_samples, len(chunks) - len(finished)
    left = n - sum(len(chunks[i]) for i in finished if i < len(chunks))
    needed = left * sample_bytes(exp)
    free = shutil.disk_usage(out_dir).free
    if n <= MAX_SAMPLES and needed <= free:
        return
    calls = left_chunks * exp.total_calls
    estimate = duration(calls * seconds_per_call(exp))
    why = (
        f"num_samples={n} is above the cap of {MAX_SAMPLES:,} samples per run"
        if n > MAX_SAMPLES
        else f"its samples need about {needed / 2**30:,.1f} GiB and {out_dir} has {free / 2**30:,.1f} GiB free"
    )
    raise DiffexpError(
        f"This run would not finish: {why}. It would write about {needed / 2**30:,.1f} GiB of chunk files "
        f"({left:,} samples of {sample_bytes(exp):,} bytes) and make {calls:,} model calls ({left_chunks:,} chunks "
        f"of {exp.total_calls} calls), about {estimate} here. Lower num_samples (or split the run into several "
        "runs with other seeds), or free disk space."
    )
