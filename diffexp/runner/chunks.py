"""A chunk of a run: its samples driven through the loop, measured, and split in halves when the device runs out
of memory (``oom_retry``), which cannot change a sample: sample k's noise and generator depend only on k."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence

import torch

from diffexp.errors import DeviceOutOfMemory
from diffexp.metrics.suite import RunMetrics
from diffexp.runner.observers import ChunkDone, Observer
from diffexp.runner.summary import snapshot_record
from diffexp.sampling.device import synchronize
from diffexp.sampling.experiment import Experiment
from diffexp.sampling.loop import StepState

log = logging.getLogger("diffexp")


def decode(exp: Experiment, state: StepState) -> float:
    """A latent model's x and x0 as images (the last state exactly, whatever the preview); the seconds it took,
    kept apart from sampling time."""
    if exp.loaded.latent is None:
        return 0.0
    start = time.perf_counter()
    state.x_image = exp.to_pixels(state.x, exact=state.last)
    state.x0_image = exp.to_pixels(state.x0, exact=state.last)
    synchronize(exp.device)
    return time.perf_counter() - start


def drive(
    exp: Experiment, measures: RunMetrics, observers: Sequence[Observer], snapshots: bool
) -> tuple[StepState, float]:
    """The loop, every call handed to the observers, and (``snapshots``: the run's first chunk) every snapshot
    too; returns the last state, decoded for a latent model, and the decode time."""
    final = previous = None
    count, decode_s = 0, 0.0
    for state in exp.steps():
        for o in observers:
            o.call(state)
        if snapshots and state.snapshot:
            decode_s += decode(exp, state)
            record = snapshot_record(state, previous, count) | measures.snapshot(state)
            for o in observers:
                o.snapshot(state, record)
            previous, count = state, count + 1
        final = state
    assert final is not None
    if final.x_image is None:
        decode_s += decode(exp, final)
    return final, decode_s


def sample_chunk(
    exp: Experiment,
    index: int,
    measures: RunMetrics,
    observers: Sequence[Observer],
    snapshots: bool = False,
    oom_retry: bool = False,
) -> ChunkDone:
    """Sample and measure chunk ``index`` (``exp`` is bound to its samples)."""
    try:
        final, decode_s = drive(exp, measures, observers, snapshots)
    except torch.OutOfMemoryError:
        gc.collect()
        if exp.device.type == "cuda":
            torch.cuda.empty_cache()
        if not oom_retry or len(exp.samples) == 1:
            raise DeviceOutOfMemory(
                f"Out of memory on {exp.device} sampling {len(exp.samples)} samples at once (batch_size="
                f"{exp.run.batch_size}, {exp.loaded.name}, {exp.run.precision.value}). Lower batch_size, or set "
                "oom_retry=true to sample such chunks in halves (the samples stay the same)."
            ) from None
        return split(exp, index, measures, observers, snapshots)
    return ChunkDone(
        index=index,
        samples=exp.samples,
        images=final.x_pixels.float().cpu(),
        latents=final.x.float().cpu() if final.x_image is not None else None,
        values=measures.measure(exp, final),
        cost={"sampling_s": final.elapsed_s, "decode_s": decode_s, "nfe": final.nfe, "net_evals": final.net_evals}
        | ({"net_evals_nominal": exp.model.counter.net_evals} if exp.model.cache else {}),
        final=final,
    )


def split(
    exp: Experiment, index: int, measures: RunMetrics, observers: Sequence[Observer], snapshots: bool
) -> ChunkDone:
    """``oom_retry``: the chunk as two halves, one after the other, joined (the first half's snapshots only)."""
    middle = exp.samples.start + len(exp.samples) // 2
    halves = (range(exp.samples.start, middle), range(middle, exp.samples.stop))
    log.warning("out of memory at %d samples: chunk %d in halves of %d", len(exp.samples), index, len(halves[0]))
    parts = [
        sample_chunk(exp.for_samples(h), index, measures, observers, snapshots and i == 0, True)
        for i, h in enumerate(halves)
    ]
    a, b = parts
    return ChunkDone(
        index=index,
        samples=exp.samples,
        images=torch.cat([a.images, b.images]),
        latents=None if a.latents is None else torch.cat([a.latents, b.latents]),
        values={k: torch.cat([a.values[k], b.values[k]]) for k in a.values},
        cost={k: a.cost[k] + b.cost[k] if k.endswith("_s") else a.cost[k] for k in a.cost},
        final=None,
    )
