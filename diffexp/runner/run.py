"""One run: prepare what the config names, build its observers, drive the loop and record the summary.

``diffexp.prepare`` builds everything (also for notebooks); ``run`` samples and tells the observers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import mark_failed
from diffexp.metrics.suite import RunMetrics
from diffexp.runner.folder import RunFiles
from diffexp.runner.observers import Observer, RunInfo
from diffexp.runner.summary import environment, run_summary, snapshot_record
from diffexp.sampling.device import process_age_s, reset_peak_memory, synchronize
from diffexp.sampling.experiment import Experiment, prepare
from diffexp.sampling.loop import StepState

log = logging.getLogger("diffexp")
_started: list[float | None] = []  # the process's age at its first run's first model call


def build_observers(cfg: DictConfig) -> list[Observer]:
    """The config's ``observers``, in order; the run folder (``RunFiles``) must be among them."""
    built = []
    for name, node in (cfg.get("observers") or {}).items():
        if node is None:
            continue
        try:
            observer = instantiate(node)
        except Exception as err:  # Hydra wraps import and constructor errors
            raise DiffexpError(f"observers.{name} could not be built: {err}") from None
        if not isinstance(observer, Observer):
            raise DiffexpError(f"observers.{name} is a {type(observer).__name__}, not a diffexp Observer.")
        built.append(observer)
    if not any(isinstance(o, RunFiles) for o in built):
        raise DiffexpError(
            "observers.files (diffexp.runner.folder.RunFiles) is missing: the run folder is the source of truth "
            "of a run, so it cannot be removed."
        )
    return built


def run_info(exp: Experiment, out_dir: Path) -> RunInfo:
    return RunInfo(
        cfg=exp.cfg,
        config=OmegaConf.to_container(exp.cfg, resolve=True),
        out_dir=Path(out_dir),
        label=exp.label,
        model=exp.loaded,
        scheduler=exp.built,
        device=exp.device,
        dtype=exp.dtype,
        total_calls=exp.total_calls,
        environment=environment(exp.device),
    )


def decode(exp: Experiment, state: StepState) -> float:
    """A latent model's x and x0 as images at a snapshot (the last one exactly, whatever the preview); the seconds
    it took, kept apart from sampling time."""
    if exp.loaded.latent is None:
        return 0.0
    start = time.perf_counter()
    state.x_image = exp.to_pixels(state.x, exact=state.last)
    state.x0_image = exp.to_pixels(state.x0, exact=state.last)
    synchronize(exp.device)
    return time.perf_counter() - start


def drive(exp: Experiment, measures: RunMetrics, observers: Sequence[Observer]) -> tuple[StepState, float]:
    """The loop, with every call and snapshot handed to the observers; returns the last state and decode time."""
    final = previous = None
    snapshots, decode_s = 0, 0.0
    for state in exp.steps():
        for o in observers:
            o.call(state)
        if state.snapshot:
            decode_s += decode(exp, state)
            record = snapshot_record(state, previous, snapshots) | measures.snapshot(state)
            for o in observers:
                o.snapshot(state, record)
            previous, snapshots = state, snapshots + 1
        final = state
    assert final is not None
    return final, decode_s


def run(cfg: DictConfig, out_dir: Path, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Sample once as ``cfg`` says, writing the run folder ``out_dir``; returns the metrics."""
    try:
        exp = prepare(cfg)
        everyone = [*build_observers(cfg), *observers]
        measures = RunMetrics(cfg, exp, cfg.progress)  # reference solve, feature network: before the clock
    except BaseException as err:
        mark_failed(Path(out_dir), err)
        raise
    for warning in exp.built.warnings:
        log.warning(warning)
    reset_peak_memory(exp.device)
    info = run_info(exp, out_dir)
    error: BaseException | None = None
    try:
        for o in everyone:
            o.start(info)
        startup_s = None if _started else process_age_s()  # a later run of a sweep has no start-up of its own
        _started.append(startup_s)
        final, decode_s = drive(exp, measures, everyone)
        metrics = run_summary(exp, final, info.environment, decode_s) | measures.final(final)
        metrics |= {} if startup_s is None else {"startup_s": startup_s}
        for o in everyone:
            o.finish(final, metrics)
        return metrics
    except BaseException as err:
        error = err
        raise
    finally:
        for o in reversed(everyone):
            try:
                o.close(error)
            except Exception as close_err:  # one observer's failure must not hide the run's own error
                log.warning("observer %s failed to close: %s", type(o).__name__, close_err)
