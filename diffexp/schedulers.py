"""Which diffusers schedulers can drive an epsilon-prediction UNet2DModel, and how to build one for a model.

A scheduler is always a diffusers class built with ``from_config(model_scheduler_config, **options)``, so the
betas are the ones the model was trained with. Options are checked against the class's own signature.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffexp.errors import DiffexpError

# name -> diffusers class: every scheduler that can drive an epsilon-prediction UNet2DModel
SCHEDULERS: dict[str, str] = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "deis": "DEISMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver-single": "DPMSolverSinglestepScheduler",
    "dpmsolver-sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "sasolver": "SASolverScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2-ancestral": "KDPM2AncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}

# diffusers schedulers that cannot drive such a model, and why
REFUSED: dict[str, str] = {
    "EDMEulerScheduler": "it uses EDM timestep and output scaling",
    "EDMDPMSolverMultistepScheduler": "it uses EDM timestep and output scaling",
    "IPNDMScheduler": "it expects continuous time in [0, 1]",
    "LCMScheduler": "it is only for consistency-distilled models",
    "TCDScheduler": "it is only for trajectory-consistency-distilled models",
    "ScoreSdeVeScheduler": "it is a variance-exploding score-SDE sampler",
    "CMStochasticIterativeScheduler": "it is only for consistency models",
    "RePaintScheduler": "it inpaints and needs a mask",
    "UnCLIPScheduler": "it is specific to unCLIP",
    "FlowMatchEulerDiscreteScheduler": "it is for flow-matching models",
    "FlowMatchHeunDiscreteScheduler": "it is for flow-matching models",
    "FlowMatchLCMScheduler": "it is for flow-matching models",
    "CogVideoXDDIMScheduler": "it is specific to CogVideoX",
    "CogVideoXDPMScheduler": "it is specific to CogVideoX",
    "DDIMInverseScheduler": "it inverts images into noise",
    "DPMSolverMultistepInverseScheduler": "it inverts images into noise",
    "AmusedScheduler": "it samples discrete tokens",
    "VQDiffusionScheduler": "it samples discrete tokens",
}

# the loop passes these itself; they are never options
_LOOP_ARGS = {"self", "model_output", "timestep", "sample", "generator", "variance_noise", "return_dict"}
# configuration that belongs to the model, not to a scheduler comparison
_MODEL_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"}


@dataclass
class BuiltScheduler:
    """A scheduler ready for the loop, with everything needed to record what was actually used."""

    name: str
    scheduler: SchedulerMixin
    step_kwargs: dict[str, Any]
    options: dict[str, Any]  # what the user set (non-null), config and step options together
    warnings: list[str] = field(default_factory=list)

    @property
    def class_name(self) -> str:
        return type(self.scheduler).__name__

    def effective_config(self) -> dict[str, Any]:
        """Class, every setting in force (config and step arguments) and a short hash of them."""
        params = inspect.signature(type(self.scheduler).__init__).parameters
        settings = {k: _plain(v) for k, v in self.scheduler.config.items() if k in params}
        record = {"class": self.class_name, "config": settings, "step_kwargs": _plain(self.step_kwargs)}
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        return {**record, "hash": digest}


# short names people try for the refused ones
REFUSED_NAMES: dict[str, str] = {
    "edm-euler": "EDMEulerScheduler",
    "edm-dpmsolver": "EDMDPMSolverMultistepScheduler",
    "ipndm": "IPNDMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "score-sde-ve": "ScoreSdeVeScheduler",
    "consistency": "CMStochasticIterativeScheduler",
    "repaint": "RePaintScheduler",
    "unclip": "UnCLIPScheduler",
    "flow-match-euler": "FlowMatchEulerDiscreteScheduler",
    "flow-match-heun": "FlowMatchHeunDiscreteScheduler",
    "ddim-inverse": "DDIMInverseScheduler",
}


def resolve_class(name: str) -> type[SchedulerMixin]:
    """Map a diffexp name (or a diffusers class name) to a usable class, or refuse with the valid names."""
    class_name = SCHEDULERS.get(name) or REFUSED_NAMES.get(name, name)
    valid = ", ".join(SCHEDULERS)
    if class_name in REFUSED:
        raise DiffexpError(
            f"Scheduler '{name}' ({class_name}) cannot drive an epsilon-prediction UNet2DModel: "
            f"{REFUSED[class_name]}. Valid schedulers are: {valid}."
        )
    if class_name not in SCHEDULERS.values():
        raise DiffexpError(f"Unknown scheduler '{name}'. Valid schedulers are: {valid}.")
    return getattr(diffusers, class_name)


def option_signatures(
    cls: type[SchedulerMixin],
) -> tuple[dict[str, inspect.Parameter], dict[str, inspect.Parameter]]:
    """The options a class accepts: its config (``__init__``) and its per-step arguments (``step``)."""
    init = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k not in _LOOP_ARGS}
    step = {k: p for k, p in inspect.signature(cls.step).parameters.items() if k not in _LOOP_ARGS}
    return init, step


def split_options(name: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check every option against the class and split them into config options and step arguments.

    ``None`` means "not set": the model's scheduler config, then the class default, decide.
    """
    cls = resolve_class(name)
    init, step = option_signatures(cls)
    config, step_kwargs = {}, {}
    for key, value in options.items():
        if key == "name" or value is None:
            continue
        param = init.get(key) or step.get(key)
        if param is None or key in _MODEL_KEYS:
            accepted = ", ".join(sorted(k for k in {**init, **step} if k not in _MODEL_KEYS))
            raise DiffexpError(
                f"Scheduler '{name}' ({cls.__name__}) has no option '{key}'. diffusers would ignore it "
                f"silently, so diffexp refuses it. Options it accepts: {accepted}."
            )
        if not _matches(value, param.annotation):
            raise DiffexpError(
                f"Scheduler option {name}.{key}={value!r} has the wrong type or value; "
                f"{cls.__name__} expects {_describe(param.annotation)}."
            )
        (config if key in init else step_kwargs)[key] = value
    return config, step_kwargs


def build_scheduler(
    name: str,
    model_scheduler_config: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> BuiltScheduler:
    """Build scheduler ``name`` from the model's scheduler config, with the user's options on top."""
    options = dict(options or {})
    cls = resolve_class(name)
    config, step_kwargs = split_options(name, options)
    init, _ = option_signatures(cls)
    if "noise_sampler_seed" in init and config.get("noise_sampler_seed") is None:
        config["noise_sampler_seed"] = seed  # DPMSolverSDE draws its noise from a Brownian tree seeded here
    try:
        scheduler = cls.from_config(dict(model_scheduler_config), **config)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise DiffexpError(f"diffusers refused scheduler '{name}' ({cls.__name__}) with these options: {err}") from None

    # the betas must be the ones the model was trained with (from_config drops keys left at defaults)
    expected = DDPMScheduler.from_config(dict(model_scheduler_config)).alphas_cumprod
    if not torch.allclose(scheduler.alphas_cumprod, expected, rtol=1e-5, atol=1e-7):
        raise DiffexpError(
            f"Scheduler '{name}' does not reproduce the model's noise schedule (alphas_cumprod differ). "
            "Set the model's beta_start, beta_end and beta_schedule in its scheduler config."
        )
    warnings = []
    inherited = [
        k for k in ("clip_sample", "thresholding") if scheduler.config.get(k) and k in init and k not in config
    ]
    if inherited:
        warnings.append(
            f"{cls.__name__} inherits {', '.join(inherited)}=True from the model's scheduler config: x0 is clipped, "
            f"so it follows a different ODE from unclipped schedulers (set scheduler.{inherited[0]}=false to compare)."
        )
    set_options = {k: v for k, v in options.items() if k != "name" and v is not None}
    return BuiltScheduler(name, scheduler, step_kwargs, set_options, warnings)


# short words for the options people compare; the rest are spelled key-value
_TAGS = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
    "use_lu_lambdas": "lu",
    "skip_prk_steps": "plms",
    "thresholding": "thresholding",
}


def scheduler_label(options: Mapping[str, Any]) -> str:
    """A name that says what a run is: ``ddim``, ``dpmsolver-karras``, ``ddim-eta1`` ...

    Only options that differ from the class default appear, so a row named "karras" really is Karras.
    """
    name = str(options.get("name"))
    try:
        init, step = option_signatures(resolve_class(name))
    except DiffexpError:
        return name
    parts = [name]
    for key, value in options.items():
        param = init.get(key) or step.get(key)
        if key == "name" or value is None or param is None or value == param.default:
            continue
        if key in _TAGS and value is True:
            parts.append(_TAGS[key])
        elif key in ("algorithm_type", "timestep_spacing", "solver_type"):
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(f"{key.replace('_', '')}{'on' if value else 'off'}")
        else:
            parts.append(
                f"{key.replace('_', '')}{value:g}" if isinstance(value, float) else f"{key.replace('_', '')}{value}"
            )
    return "-".join(parts)


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
