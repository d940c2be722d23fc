"""Build a diffusers scheduler for a model, refusing options it would silently ignore.

A scheduler is always a diffusers class built with ``from_config(model_scheduler_config, **options)``, so the
betas are the ones the model was trained with. Which class a name means, and what it declares (stochastic,
theoretical order), comes from its file in ``configs/scheduler/`` (``diffexp.catalog``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffexp.catalog import (
    MODEL_KEYS,
    SchedulerSpec,
    option_signatures,
    resolve_class,
    scheduler_files,
    scheduler_spec,
)
from diffexp.errors import DiffexpError
from diffexp.sampling.flow import FLOW_PREDICTION, dynamic_mu, flow_mode, image_seq_len, is_flow


@dataclass
class BuiltScheduler:
    """A scheduler ready for the loop, with its spec and what it was built with."""

    spec: SchedulerSpec
    scheduler: SchedulerMixin
    step_kwargs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timesteps_kwargs: dict[str, Any] = field(default_factory=dict)  # an explicit schedule for set_timesteps
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "default"})  # the schedule group's node
    sampler: Any = None  # a k-diffusion sampler (diffexp.sampling.kdiffusion.KSampler); ``scheduler`` then only
    # carries the model's table and the timesteps the adapter is called at (warm-up, memory check): it never steps

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        """Fresh timesteps: the scheduler's own for ``steps``, or the explicit schedule placed on it."""
        kwargs = self.timesteps_kwargs
        if "timesteps" in kwargs or "sigmas" in kwargs:
            self.scheduler.set_timesteps(device=device, **kwargs)
        else:  # the steps, and a flow model's dynamic shift (mu)
            self.scheduler.set_timesteps(steps, device=device, **kwargs)

    def sigmas_used(self) -> list[float]:
        """The noise levels of the timesteps set, on the model's own schedule, and the final one (0 or the last)."""
        from diffexp.sampling.noise import log_sigmas, sigma_at

        if self.sampler:
            return [float(v) for v in self.sampler.sigmas]
        if getattr(self.scheduler, "timesteps", None) is None:
            return []  # no timesteps set yet
        own = getattr(self.scheduler, "sigmas", None)
        if own is not None and len(own) == len(self.scheduler.timesteps) + 1:
            return [float(v) for v in own.cpu()]  # Euler-family: its own, with the final 0
        if self.scheduler.config.get("use_flow_sigmas") or self.class_name.startswith("FlowMatch"):
            return [float(v) for v in own.cpu()]  # a flow scheduler's own sigmas in [0, 1]
        return sigma_at(log_sigmas(self.scheduler.alphas_cumprod), self.scheduler.timesteps.cpu()).tolist()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def options(self) -> dict[str, Any]:
        """What the user set (non-null), config and step options together."""
        return dict(self.spec.options)

    @property
    def stochastic(self) -> bool:
        return self.spec.stochastic

    @property
    def theory_order(self) -> int | None:
        return self.spec.theory_order

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def class_name(self) -> str:
        return f"k_diffusion.sampling.{self.sampler.function}" if self.sampler else type(self.scheduler).__name__

    @property
    def total_calls(self) -> int:
        """Model calls per run (NFE); a k-diffusion sampler's from its function (dpm-adaptive: 0, unknown)."""
        return self.sampler.total_calls if self.sampler else len(self.scheduler.timesteps)

    def effective_config(self) -> dict[str, Any]:
        """Class, every setting in force (config and step arguments) and a short hash of them."""
        params = inspect.signature(type(self.scheduler).__init__).parameters
        settings = {k: _plain(v) for k, v in self.scheduler.config.items() if k in params}
        if self.sampler:
            settings = _plain(self.sampler.options)
        record = {"class": self.class_name, "config": settings, "step_kwargs": _plain(self.step_kwargs)}
        record["schedule"] = {**_plain(self.schedule), "sigmas": self.sigmas_used()}
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        return {**record, "hash": digest}


def as_spec(scheduler: SchedulerSpec | str, options: Mapping[str, Any] | None = None) -> SchedulerSpec:
    """A spec, or the spec of scheduler ``name`` with ``options`` (its file's declarations filled in)."""
    if isinstance(scheduler, SchedulerSpec):
        return scheduler
    return scheduler_spec({**(options or {}), "name": scheduler})


def split_options(spec: SchedulerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check every option against the class and split them into config options and step arguments (once per
    spec; copies, so a caller may add to them)."""
    config, step_kwargs = _split(spec)
    return dict(config), dict(step_kwargs)


@functools.cache
def _split(spec: SchedulerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    cls = resolve_class(spec.name, spec.diffusers_class)
    init, step = option_signatures(cls)
    config, step_kwargs = {}, {}
    for key, value in spec.options.items():
        param = init.get(key) or step.get(key)
        if param is None or key in MODEL_KEYS:
            accepted = ", ".join(sorted(k for k in {**init, **step} if k not in MODEL_KEYS))
            raise DiffexpError(
                f"Scheduler '{spec.name}' ({cls.__name__}) has no option '{key}'. diffusers would ignore it "
                f"silently, so diffexp refuses it. Options it accepts: {accepted}."
            )
        if not _matches(value, param.annotation):
            raise DiffexpError(
                f"Scheduler option {spec.name}.{key}={value!r} has the wrong type or value; "
                f"{cls.__name__} expects {_describe(param.annotation)}."
            )
        (config if key in init else step_kwargs)[key] = value
    return config, step_kwargs


def build_scheduler(
    scheduler: SchedulerSpec | str,
    model_scheduler_config: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    sample_shape: tuple[int, ...] | None = None,
) -> BuiltScheduler:
    """Build a scheduler (a spec, or a name with ``options``) from the model's scheduler config; ``sample_shape``
    gives a flow model's dynamic shift its token count."""
    spec = as_spec(scheduler, options)
    cls = resolve_class(spec.name, spec.diffusers_class)
    config, step_kwargs = split_options(spec)
    init, _ = option_signatures(cls)
    flow = is_flow(model_scheduler_config)
    model_prediction = FLOW_PREDICTION if flow else str(model_scheduler_config.get("prediction_type") or "epsilon")
    if model_prediction not in spec.prediction_types:
        counterpart = f"k-{spec.name}"  # k-diffusion's sampler of the same name runs through denoise(x, sigma)
        hint = f" ({counterpart} is k-diffusion's, which takes it)" if counterpart in scheduler_files() else ""
        raise DiffexpError(
            f"Scheduler '{spec.name}' ({cls.__name__}) cannot sample a model that predicts {model_prediction}: "
            f"diffusers implements only {', '.join(spec.prediction_types)} for it. Choose another scheduler{hint}."
        )
    for key in ("shift", "flow_shift"):
        if config.get(key) is not None and not config[key] > 0:
            raise DiffexpError(f"scheduler.{key}={config[key]} is not allowed: a flow shift must be > 0.")
    if flow:
        config |= flow_mode(cls, model_scheduler_config, config)
    if config.get("prediction_type", model_prediction) != model_prediction:
        raise DiffexpError(
            f"scheduler.prediction_type={config['prediction_type']} contradicts the model, which predicts "
            f"{model_prediction}; leave scheduler.prediction_type unset (it comes from the model's scheduler config)."
        )
    if "noise_sampler_seed" in init and config.get("noise_sampler_seed") is None:
        config["noise_sampler_seed"] = seed  # DPMSolverSDE draws its noise from a Brownian tree seeded here
    try:
        built = cls.from_config(dict(model_scheduler_config), **config)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise DiffexpError(
            f"diffusers refused scheduler '{spec.name}' ({cls.__name__}) with these options: {err}"
        ) from None

    # the betas must be the ones the model was trained with (from_config drops keys left at defaults)
    expected = None if flow else DDPMScheduler.from_config(dict(model_scheduler_config)).alphas_cumprod
    if expected is not None and not torch.allclose(built.alphas_cumprod, expected, rtol=1e-5, atol=1e-7):
        raise DiffexpError(
            f"Scheduler '{spec.name}' does not reproduce the model's noise schedule (alphas_cumprod differ). "
            "Set the model's beta_start, beta_end and beta_schedule in its scheduler config."
        )
    warnings = []
    inherited = [k for k in ("clip_sample", "thresholding") if built.config.get(k) and k in init and k not in config]
    if inherited:
        source = "from the model's scheduler config" if inherited[0] in model_scheduler_config else "by class default"
        warnings.append(
            f"{cls.__name__} inherits {', '.join(inherited)}=True {source}: x0 is clipped, so it follows a different "
            f"ODE from unclipped schedulers (set scheduler.{inherited[0]}=false to compare)."
        )
    return BuiltScheduler(
        spec, built, step_kwargs, warnings, dynamic_shift(built, model_scheduler_config, sample_shape)
    )


def dynamic_shift(
    scheduler: SchedulerMixin, model_config: Mapping[str, Any], sample_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """``mu`` for ``set_timesteps`` where the shift is dynamic: the scheduler's own setting (flow-euler), or a flow
    model's that a solver in flow mode follows through ``mu``, from the image's token count."""
    dynamic = scheduler.config.get("use_dynamic_shifting")
    if dynamic is None and scheduler.config.get("use_flow_sigmas"):
        dynamic = model_config.get("use_dynamic_shifting")
    if not dynamic:
        return {}
    if "mu" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise DiffexpError(
            f"{type(scheduler).__name__} has no dynamic shifting (its set_timesteps takes no mu), but the model's "
            "scheduler config asks for it; use flow-euler, dpmsolver, dpmsolver-single, unipc or deis."
        )
    if sample_shape is None:
        raise DiffexpError("Dynamic shifting needs the image size (its token count) to compute the shift.")
    return {"mu": dynamic_mu({**model_config, **scheduler.config}, image_seq_len(sample_shape))}


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples and tensors as lists, non-finite floats as strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _matches(value: Any, annotation: Any) -> bool:
    """A light check of an option value against the class's annotation; unknown annotations pass."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))
