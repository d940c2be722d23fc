"""One run: prepare what the config names, build its observers, drive the loop and record the summary.

``diffexp.prepare`` builds everything (also for notebooks); ``run`` samples chunk by chunk and tells the observers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from diffexp.errors import DiffexpError
from diffexp.folders import mark_failed
from diffexp.metrics.suite import RunMetrics
from diffexp.runner.budget import check_budget
from diffexp.runner.chunks import sample_chunk
from diffexp.runner.claim import Claim
from diffexp.runner.claim import claim as claim_folder
from diffexp.runner.distributed import World, broadcast, gather, shared_dir, world
from diffexp.runner.folder import RunFiles, writing
from diffexp.runner.observers import Observer, RunInfo
from diffexp.runner.summary import environment, run_summary
from diffexp.samples import ChunkFile, chunk_path, file_digest, read_chunk, write_chunk, write_manifest
from diffexp.sampling.device import process_age_s, reset_peak_memory
from diffexp.sampling.experiment import Experiment, prepare
from diffexp.sampling.loop import StepState
from diffexp.settings import RunSettings, read_settings
from diffexp.startup import end_startup
from diffexp.targets import build

log = logging.getLogger("diffexp")
_started: list[float | None] = []  # the process's age at its first run's first model call


def build_observers(settings: RunSettings) -> list[Observer]:
    """The config's ``observers``, in order; the run folder (``RunFiles``) must be among them."""
    built = []
    for name, node in settings.observers.items():
        if node is None:
            continue
        built.append(build(node, Observer, f"observers.{name}"))  # the class is checked before it is called
    if not any(isinstance(o, RunFiles) for o in built):
        raise DiffexpError(
            "observers.files (diffexp.runner.folder.RunFiles) is missing: the run folder is the source of truth "
            "of a run, so it cannot be removed."
        )
    return built


def run_info(exp: Experiment, out_dir: Path, **chunking: Any) -> RunInfo:
    return RunInfo(
        settings=exp.run,
        out_dir=Path(out_dir),
        label=exp.label,
        model=exp.loaded,
        scheduler=exp.built,
        device=exp.device,
        dtype=exp.dtype,
        total_calls=exp.total_calls,
        environment=environment(exp.device),
        **chunking,
    )


def take(out_dir: Path, settings: RunSettings, w: World) -> Claim:
    """Rank 0 claims the folder (lock, resume, refusal) and tells the others what it found."""
    claim, found = None, None
    if w.main:
        try:
            claim = claim_folder(out_dir, settings)
            found = {"finished": sorted(claim.finished), "done": claim.done}
        except DiffexpError as err:
            found = {"error": err}
    found = broadcast(found, w)
    if "error" in found:
        raise found["error"]
    return claim or Claim(out_dir, finished={i: chunk_path(out_dir, i) for i in found["finished"]}, done=found["done"])


def run(config: RunSettings | DictConfig, out_dir: Path, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Sample ``num_samples`` as the settings (or a composed config) say, in chunks, writing the run folder
    ``out_dir``; returns the metrics.

    Under torchrun (or a submitit job of several tasks) the chunks are shared among the processes; every process
    returns the same metrics. Started again in its folder, a run continues from its finished chunks."""
    settings = config if isinstance(config, RunSettings) else read_settings(config)
    w = world(use_cuda=settings.device.startswith(("auto", "cuda")) and torch.cuda.is_available())
    out_dir = shared_dir(Path(out_dir), w)
    claim = take(out_dir, settings, w)
    try:
        if claim.done is not None:
            log.info("%s finished before in %s with this config: nothing to do", claim.done.get("label"), out_dir)
            return claim.done
        try:
            exp = prepare(settings)
            everyone = [*build_observers(settings), *observers] if w.main else []
            measures = RunMetrics(exp, settings.progress and w.main)  # reference, features: before the clock
            check_budget(exp, out_dir, claim.finished)  # the samples' disk and the cap, before sampling
        except BaseException as err:
            if w.main:
                mark_failed(out_dir, err)
            raise
        if claim.finished and w.main:
            log.info("%s: continuing from %d finished chunks of %d", exp.label, len(claim.finished), len(exp.chunks()))
        for warning in exp.built.warnings if w.main else ():
            log.warning(warning)
        return sample_run(exp, measures, everyone, claim, w)
    finally:
        claim.release()


def sample_run(
    exp: Experiment, measures: RunMetrics, everyone: Sequence[Observer], claim: Claim, w: World
) -> dict[str, Any]:
    """Every chunk of this process, then (rank 0) the metrics from every chunk's values, told to the observers."""
    chunks = exp.chunks()
    todo = (i for i in range(w.rank, len(chunks), w.size) if i not in claim.finished)  # this process's, lazily
    left = len(range(w.rank, len(chunks), w.size)) - sum(1 for i in claim.finished if w.owns(i))
    info = run_info(exp, claim.out_dir, chunks=len(chunks), todo=left, first_done=0 in claim.finished)
    error: BaseException | None = None
    try:
        for o in everyone:
            o.start(info)
        reset_peak_memory(exp.device)
        end_startup()  # a command's start-up ends here: what it imported is frozen out of the collector's reach
        startup_s = None if _started else process_age_s()  # a later run of a sweep has no start-up of its own
        _started.append(startup_s)
        mine, first, failure = sample_chunks(exp, chunks, todo, measures, everyone, claim.out_dir, w)
        results = gather({"chunks": mine, "failure": failure}, w)
        metrics = None
        if w.main:
            assert results is not None
            failed = [r["failure"] for r in results if r["failure"]]
            if not failed:
                done = {i: c for r in results for i, c in r["chunks"].items()}
                metrics = summarise(exp, measures, claim, done, info.environment, w)
                metrics |= {} if startup_s is None else {"startup_s": startup_s}
                if len(chunks) > 1:  # before finished is written: a finished run's chunks can be verified
                    write_manifest(claim.out_dir, digests(done, claim.finished))
                for o in everyone:
                    o.finish(first, metrics)
            failure = "; ".join(failed) or None
        outcome = broadcast({"metrics": metrics, "failure": failure}, w)
        if outcome["failure"]:
            raise DiffexpError(
                f"The run failed: {outcome['failure']}. Its finished chunks are kept in {claim.out_dir}: start the "
                "run again with the same config and folder to resume."
            )
        return outcome["metrics"]
    except BaseException as err:
        error = err
        raise
    finally:
        for o in reversed(everyone):
            try:
                o.close(error)
            except Exception as close_err:  # one observer's failure must not hide the run's own error
                log.warning("observer %s failed to close: %s", type(o).__name__, close_err)


def sample_chunks(
    exp: Experiment,
    chunks: Sequence[range],
    todo: Iterable[int],
    measures: RunMetrics,
    everyone: Sequence[Observer],
    out_dir: Path,
    w: World,
) -> tuple[dict[int, ChunkFile], StepState | None, str | None]:
    """This process's chunks: each sampled, measured, stored (a chunked run) and told to the observers. Under
    several processes, a failure is returned (named by rank) rather than raised, so every rank reaches the gather."""
    mine: dict[int, ChunkFile] = {}
    first: StepState | None = None
    started = time.perf_counter()
    try:
        for i in todo:
            done = sample_chunk(
                exp if i == 0 else exp.for_samples(chunks[i]), i, measures, everyone, i == 0, exp.run.oom_retry
            )
            if len(chunks) > 1:
                with writing(chunk_path(out_dir, i)):
                    values = {k: v.numpy() for k, v in done.values.items()}
                    latents = None if done.latents is None else done.latents.numpy()
                    path = write_chunk(out_dir, i, done.samples, done.images.numpy(), values, done.cost, latents)
            for o in everyone:
                o.chunk(done)
            cost = done.cost | {"run_s": time.perf_counter() - started}
            digest = file_digest(path) if len(chunks) > 1 else None  # read back from the page cache
            mine[i] = ChunkFile(i, done.samples, done.values, cost, digest)
            first = done.final if i == 0 else first
    except Exception as err:
        if w.size == 1:
            raise
        log.error("rank %d: %s", w.rank, err)
        return mine, first, f"rank {w.rank} failed: {err}"
    return mine, first, None


def digests(sampled: dict[int, ChunkFile], finished: dict[int, Path]) -> dict[int, dict[str, Any]]:
    """Every chunk file's size and sha256: taken when written, or now for chunks of an earlier try."""
    now = {i: c.digest for i, c in sampled.items() if c.digest is not None}
    return {i: file_digest(p) for i, p in finished.items() if i not in now} | now


def summarise(
    exp: Experiment,
    measures: RunMetrics,
    claim: Claim,
    sampled: dict[int, ChunkFile],
    env: dict[str, Any],
    w: World,
) -> dict[str, Any]:
    """The final metrics from every chunk, sampled now or finished before, in sample order."""
    every = {i: read_chunk(p) for i, p in claim.finished.items()} | sampled
    order = [every[i] for i in sorted(every)]
    assert len(order) == len(exp.chunks()), f"chunks {sorted(set(range(len(exp.chunks()))) - set(every))} missing"
    names = dict.fromkeys(k for c in order for k in c.values)
    values = {k: torch.cat([torch.as_tensor(c.values[k]) for c in order if k in c.values]) for k in names}
    cost = {
        "sampling_s": sum(c.cost["sampling_s"] for c in order),
        "decode_s": sum(c.cost["decode_s"] for c in order),
        "nfe": order[0].cost["nfe"],
        "net_evals": order[0].cost["net_evals"],
        "net_evals_nominal": order[0].cost.get("net_evals_nominal"),  # a cache's: every pass, the skipped too
        "world_size": w.size,
        "run_s": max((c.cost.get("run_s", 0.0) for c in sampled.values()), default=0.0),
    }
    return run_summary(exp, cost, env) | measures.final(values)
