"""An experiment: the model, the scheduler and the initial noise that a config names, ready to sample."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.config import check_config
from diffexp.errors import DiffexpError
from diffexp.sampling.device import resolve_device, resolve_dtype
from diffexp.sampling.loop import CountingModel, StepState, initial_noise, iter_steps
from diffexp.sampling.models import LoadedModel, load_model
from diffexp.sampling.schedulers import BuiltScheduler, build_scheduler, split_options


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
        return f"{self.built.label}-{self.cfg.steps}"

    @property
    def total_calls(self) -> int:
        """The model calls this run will make (NFE)."""
        return len(self.built.scheduler.timesteps)

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
