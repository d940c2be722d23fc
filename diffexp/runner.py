"""One run: compose the parts a config names, sample, and tell the observers.

``prepare`` builds everything (also for notebooks); ``run`` samples and records.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.config import Precision
from diffexp.device import device_name, peak_memory_mb, reset_peak_memory, resolve_device, resolve_dtype
from diffexp.errors import DiffexpError
from diffexp.files import RunFiles, mark_failed
from diffexp.metrics import RunMetrics
from diffexp.models import LoadedModel, load_model
from diffexp.observers import Observer, RunInfo
from diffexp.progress import ProgressBar
from diffexp.sampler import CountingModel, StepState, initial_noise, iter_steps
from diffexp.schedulers import BuiltScheduler, build_scheduler, scheduler_label, split_options
from diffexp.tracking import WandbRun

log = logging.getLogger("diffexp")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose(overrides: Sequence[str] = (), config_name: str = "run") -> DictConfig:
    """The config the CLI would build from these overrides (Hydra's compose API), for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def check_config(cfg: DictConfig) -> None:
    """What composition lets through: keys added with ``+`` that the schema lacks, and impossible numbers."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise DiffexpError(
            f"Unknown config key(s): {', '.join(unknown)}. The schema (diffexp/config.py) has no such key; "
            "check the spelling, or see configs/ for the keys each group takes."
        )
    for key in ("steps", "batch_size", "log_every"):
        if cfg[key] <= 0:
            raise DiffexpError(f"{key}={cfg[key]} is not allowed: {key} must be a positive integer.")
    if "name" not in cfg.scheduler:
        raise DiffexpError("The scheduler config has no 'name'; choose one with scheduler=<name>.")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that ``+key=value`` added to a typed node of the schema."""
    found = []
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if key == "hydra" and not prefix:
            continue
        if known is not None and key not in known:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(child := node._get_node(key)) and not OmegaConf.is_missing(node, key):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


@dataclass
class Experiment:
    """A model, a scheduler and the initial noise, ready to sample step by step."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    loaded: LoadedModel
    built: BuiltScheduler
    model: CountingModel
    noise: torch.Tensor
    generators: list[torch.Generator]

    @property
    def label(self) -> str:
        return f"{scheduler_label(self.built.options | {'name': self.built.name})}-{self.cfg.steps}"

    def steps(self) -> Iterator[StepState]:
        """The loop, one model call at a time: x, x0, timestep and NFE at each."""
        self.model.calls = 0
        with torch.inference_mode():
            yield from iter_steps(
                self.model,
                self.built.scheduler,
                self.noise,
                self.cfg.steps,
                self.generators,
                self.built.step_kwargs,
                self.cfg.log_every,
            )


def prepare(cfg: DictConfig, model: LoadedModel | None = None) -> Experiment:
    """Build what ``cfg`` names. ``model`` replaces the configured one: any module called like UNet2DModel."""
    check_config(cfg)
    options = OmegaConf.to_container(cfg.scheduler, resolve=True)
    name = options.pop("name")
    split_options(name, options)  # refuse a bad scheduler or option before loading anything
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision)
    loaded = model or load_model(cfg.model, device, dtype)
    built = build_scheduler(name, loaded.scheduler_config, options, seed=cfg.seed)
    try:
        built.scheduler.set_timesteps(cfg.steps, device=device)  # checks the step count before any output
    except (ValueError, IndexError) as err:
        raise DiffexpError(f"Scheduler '{name}' cannot run {cfg.steps} steps: {err}") from None
    noise, generators = initial_noise(loaded.sample_shape, cfg.seed, cfg.batch_size, device)
    return Experiment(cfg, device, dtype, loaded, built, CountingModel(loaded.model), noise, generators)


def snapshot_record(state: StepState, previous: StepState | None, index: int) -> dict[str, Any]:
    """The scalars of one snapshot, computed once for every observer."""
    record: dict[str, Any] = {
        "index": index,
        "step": state.step,
        "num_steps": state.num_steps,
        "nfe": state.nfe,
        "timestep": state.timestep,
        "sigma": state.sigma,
        "elapsed_s": state.elapsed_s,
    }
    for name, v in (("x", state.x), ("x0", state.x0)):
        v = v.float()
        record |= {
            f"{name}_mean": v.mean().item(),
            f"{name}_std": v.std().item(),
            f"{name}_min": v.min().item(),
            f"{name}_max": v.max().item(),
        }
    if previous is not None:
        record["x0_change"] = (state.x0.float() - previous.x0.float()).pow(2).mean().sqrt().item()
        record["step_s"] = (state.elapsed_s - previous.elapsed_s) / max(state.step - previous.step, 1)
    else:
        record["x0_change"] = None
        record["step_s"] = state.elapsed_s / max(state.step, 1)
    return record


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def run(cfg: DictConfig, out_dir: Path, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Sample once as ``cfg`` says, writing the run folder ``out_dir``; returns the metrics."""
    try:
        exp = prepare(cfg)
        measures = RunMetrics(cfg, exp, cfg.progress)  # reference solve, feature network: before the clock
    except BaseException as err:
        mark_failed(Path(out_dir), err)
        raise
    for warning in exp.built.warnings:
        log.warning(warning)
    reset_peak_memory(exp.device)
    info = RunInfo(
        config=OmegaConf.to_container(cfg, resolve=True),
        out_dir=Path(out_dir),
        label=exp.label,
        model=exp.loaded,
        scheduler=exp.built,
        device=exp.device,
        dtype=exp.dtype,
        total_calls=len(exp.built.scheduler.timesteps),
        environment=environment(exp.device),
    )
    everyone: list[Observer] = [RunFiles(out_dir), *observers]
    if cfg.get("logger") is not None:
        everyone.append(WandbRun(cfg.logger))
    if cfg.progress:
        everyone.append(ProgressBar())
    error: BaseException | None = None
    try:
        for o in everyone:
            o.start(info)
        final = previous = None
        snapshots = 0
        for state in exp.steps():
            for o in everyone:
                o.call(state)
            if state.snapshot:
                record = snapshot_record(state, previous, snapshots) | measures.snapshot(state)
                for o in everyone:
                    o.snapshot(state, record)
                previous, snapshots = state, snapshots + 1
            final = state
        assert final is not None
        metrics = {
            "status": "finished",
            "label": info.label,
            "steps": cfg.steps,
            "nfe": final.nfe,
            "wall_s": final.elapsed_s,
            "images_per_s": cfg.batch_size / final.elapsed_s,
            "load_s": exp.loaded.load_s,
            "peak_mem_mb": peak_memory_mb(exp.device),
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "precision": Precision(cfg.precision).value,
            "model": {"name": exp.loaded.name, "id": exp.loaded.id, "revision": exp.loaded.revision},
            "scheduler": exp.built.effective_config(),
            "scheduler_name": exp.built.name,
            "scheduler_options": exp.built.options,
            "warnings": exp.built.warnings,
            **info.environment,
        }
        metrics |= measures.final(final)
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
