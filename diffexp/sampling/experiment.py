"""An experiment: the model, the condition, the scheduler and the initial noise that a config names, ready to
sample. Sample k's noise and label depend only on k and the seed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.config import check_config
from diffexp.errors import DiffexpError
from diffexp.sampling.denoisers import Denoiser, check_guidance, sample_labels
from diffexp.sampling.device import resolve_device, resolve_dtype
from diffexp.sampling.loop import StepState, initial_noise, iter_steps
from diffexp.sampling.models import LoadedModel, load_model
from diffexp.sampling.noise import log_sigmas
from diffexp.sampling.schedulers import BuiltScheduler, build_scheduler, split_options


@dataclass
class Experiment:
    """A model, a scheduler and the initial noise, ready to sample step by step."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    loaded: LoadedModel
    built: BuiltScheduler
    model: Denoiser
    noise: torch.Tensor
    generators: list[torch.Generator]
    labels: list[int] | None = None  # the class of each sample; None: unconditional

    @property
    def label(self) -> str:
        scale = self.cfg.get("guidance_scale", 1.0)
        return f"{self.built.label}-{self.cfg.steps}" + (f"-cfg{scale:g}" if scale != 1 else "")

    @property
    def total_calls(self) -> int:
        """The model calls this run will make (NFE)."""
        return len(self.built.scheduler.timesteps)

    def steps(self) -> Iterator[StepState]:
        """The loop, one model call at a time: x, x0, timestep and NFE at each."""
        self.model.reset()
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
    labels = class_labels(cfg, loaded)
    return Experiment(
        cfg, device, dtype, loaded, built, denoiser(cfg, loaded, built, labels, device), noise, generators, labels
    )


def class_labels(cfg: DictConfig, loaded: LoadedModel) -> list[int] | None:
    """Sample k's class; for a class-conditional model without ``labels``, the null class (unconditional)."""
    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.get("labels")) else cfg.get("labels")
    if loaded.num_classes is None:
        if labels is not None:
            raise DiffexpError(
                f"labels={labels} was given, but {loaded.name} is unconditional: it takes no class labels."
            )
        return None
    if labels is None:
        if loaded.null_class is None:
            raise DiffexpError(
                f"{loaded.name} is class-conditional without a known null class: set labels=all or labels=[...] "
                "(or model.null_class=<id> to sample it unconditionally)."
            )
        return [loaded.null_class] * cfg.batch_size
    return sample_labels(labels, loaded.num_classes, 0, cfg.batch_size)


def denoiser(
    cfg: DictConfig, loaded: LoadedModel, built: BuiltScheduler, labels: list[int] | None, device: torch.device
) -> Denoiser:
    """The model with its labels and guidance bound, or a clear refusal of guidance it cannot do."""
    interval = cfg.get("guidance_interval")
    guidance = check_guidance(
        float(cfg.get("guidance_scale", 1.0)),
        float(cfg.get("guidance_rescale", 0.0)),
        None if interval is None else list(interval),
    )
    if guidance.enabled and (labels is None or loaded.null_class is None):
        raise DiffexpError(
            f"guidance_scale={guidance.scale} needs a conditional model with a null class (or unconditional input) "
            f"for the unconditional half; {loaded.name} has "
            + ("no class labels." if loaded.num_classes is None else "no known null class (set model.null_class).")
        )
    return Denoiser(
        loaded.model,
        loaded.prediction_type,
        None if labels is None else torch.tensor(labels, device=device),
        loaded.null_class,
        guidance,
        log_sigmas(built.scheduler.alphas_cumprod),
    )
