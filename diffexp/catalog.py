"""The scheduler catalog: what each ``configs/scheduler/*.yaml`` declares, and the names of runs.

A scheduler file holds its diffexp ``name``, three declarations and the options people compare:
- ``diffusers_class``: the diffusers class it builds;
- ``stochastic``: whether it injects fresh noise (an interpolation of its options where that depends on them);
- ``theory_order``: the global order of accuracy that theory gives its ODE solver (null: none);
- ``prediction_types``: the model parameterisations it can take (epsilon, v_prediction, sample);
- ``ranges`` (optional): ``option: [low, high]`` (null: open), the values diffusers honours, where it would
  otherwise run another value silently (DPM-Solver's ``solver_order=9`` runs order 3).

Everything else in the file is an option of the class. Adding a scheduler is adding a file: the tables here are
read from the files. Classes that cannot drive a DDPM-style UNet are refused, with the reason.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from diffexp.config import NO_GUIDANCE, RunConfig, config_dir, guided
from diffexp.errors import DiffexpError
from diffexp.folders import safe_name

# keys of a scheduler file that are no options
DECLARED = ("name", "diffusers_class", "stochastic", "theory_order", "prediction_types", "ranges")
REQUIRED = DECLARED[:5]  # every scheduler file declares these

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
# the loop passes these itself; they are never options
LOOP_ARGS = {"self", "model_output", "timestep", "sample", "generator", "variance_noise", "return_dict"}
# configuration that belongs to the model, not to a scheduler comparison
MODEL_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"}


@dataclass(frozen=True)
class SchedulerFile:
    """One ``configs/scheduler/<name>.yaml``: its declarations and its options, unresolved."""

    name: str
    diffusers_class: str
    path: Path

    def spec(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The file's contents with ``overrides`` on top, interpolations resolved."""
        register()  # the resolvers its declarations use
        merged = OmegaConf.merge(OmegaConf.load(self.path), dict(overrides or {}))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


@functools.cache
def scheduler_files() -> dict[str, SchedulerFile]:
    """Every scheduler file of the package's configs, by name (plain YAML: names and classes are literals, and
    libyaml reads the files in a few milliseconds, at every start)."""
    import yaml

    files = {}
    for path in sorted((config_dir() / "scheduler").glob("*.yaml")):
        node = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        files[str(node["name"])] = SchedulerFile(str(node["name"]), str(node["diffusers_class"]), path)
    return files


def check_ranges(name: str, options: Mapping[str, Any], ranges: Mapping[str, Any] | None) -> None:
    """Refuse an option outside the range its file declares (what diffusers honours)."""
    for key, (low, high) in (ranges or {}).items():
        value = options.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise DiffexpError(
                f"Scheduler option {name}.{key}={value} is outside {span}, the range diffusers honours for it "
                f"(configs/scheduler/{name}.yaml, ranges): it would run another value silently, so diffexp "
                "refuses it."
            )


def valid_names() -> str:
    return ", ".join(scheduler_files())


def class_name_of(name: str, declared: str | None = None) -> str:
    """The diffusers class of scheduler ``name``: its file's, else ``declared`` (a file on another config path)."""
    if name in REFUSED_NAMES or (declared or name) in REFUSED:
        class_name = REFUSED_NAMES.get(name) or declared or name
        raise DiffexpError(
            f"Scheduler '{name}' ({class_name}) cannot drive an epsilon-prediction UNet2DModel: "
            f"{REFUSED[class_name]}. Valid schedulers are: {valid_names()}."
        )
    known = scheduler_files().get(name)
    class_name = known.diffusers_class if known else declared
    if not class_name:
        raise DiffexpError(f"Unknown scheduler '{name}'. Valid schedulers are: {valid_names()}.")
    return class_name


@functools.cache
def resolve_class(name: str, declared: str | None = None) -> type:
    """The diffusers scheduler class of ``name``, or a clear refusal that lists the valid names."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    class_name = class_name_of(name, declared)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise DiffexpError(
            f"Scheduler '{name}' declares diffusers_class: {class_name}, which is no diffusers scheduler class."
        )
    return cls


def option_signatures(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, inspect.Parameter]]:
    """The options a class accepts: its config (``__init__``) and its per-step arguments (``step``)."""
    init = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k not in LOOP_ARGS}
    step = {k: p for k, p in inspect.signature(cls.step).parameters.items() if k not in LOOP_ARGS}
    return init, step


@dataclass(frozen=True, eq=False)
class SchedulerSpec:
    """A scheduler resolved once from its config node: name, class, declarations and the options in force.

    The run label, the folder name, the report and W&B all read this spec."""

    name: str
    diffusers_class: str
    stochastic: bool  # it injects fresh noise, so its samples are no ODE solution
    theory_order: int | None  # the global order of accuracy of its ODE solver
    prediction_types: tuple[str, ...]  # the model parameterisations it can take
    ranges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # what is set (non-null): config and step options

    @property
    def record(self) -> dict[str, Any]:
        """Name, class and the options set: what a run records of its scheduler."""
        return {**self.options, "name": self.name, "diffusers_class": self.diffusers_class}

    def non_default_options(self) -> dict[str, Any]:
        """The options that differ from the diffusers class default ({} for a class diffusers lacks)."""
        try:
            init, step = option_signatures(resolve_class(self.name, self.diffusers_class))
        except DiffexpError:
            return {}
        params = {**init, **step}
        return {k: v for k, v in self.options.items() if k in params and v != params[k].default and k not in MODEL_KEYS}

    @property
    def label(self) -> str:
        return scheduler_label(self)


def scheduler_spec(node: Mapping[str, Any]) -> SchedulerSpec:
    """The spec of a scheduler node (a composed config's, resolved, or a record's): declarations missing from
    the node come from its file (a spec from elsewhere, e.g. the reference's, gets them)."""
    node = dict(node)
    name = node.get("name")
    if name is None:
        raise DiffexpError("The scheduler config has no 'name'; choose one with scheduler=<name>.")
    name = str(name)
    class_name = class_name_of(name, node.get("diffusers_class"))
    known = scheduler_files().get(name)
    if known is not None and not all(k in node for k in REQUIRED[1:]):
        overrides = {k: v for k, v in node.items() if k != "name"}
        node = {**{k: v for k, v in known.spec(overrides).items() if k in DECLARED}, **node}
    stochastic = node.get("stochastic")
    if not isinstance(stochastic, bool):
        raise DiffexpError(
            f"Scheduler '{name}' declares no 'stochastic: true|false' in its file; every scheduler file must say "
            "whether the scheduler injects fresh noise (see configs/scheduler/ddim.yaml)."
        )
    options = {k: v for k, v in node.items() if k not in DECLARED and v is not None}
    ranges = {k: (v[0], v[1]) for k, v in (node.get("ranges") or {}).items()}
    check_ranges(name, options, ranges)
    order = node.get("theory_order")
    return SchedulerSpec(
        name=name,
        diffusers_class=class_name,
        stochastic=stochastic,
        theory_order=None if order is None else int(order),
        prediction_types=tuple(node.get("prediction_types") or ("epsilon",)),
        ranges=ranges,
        options=options,
    )


# short words for the options people compare; the rest are spelled key-value
_TAGS = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
    "use_lu_lambdas": "lu",
    "skip_prk_steps": "plms",
    "thresholding": "thresholding",
}
_VALUE_ONLY = ("algorithm_type", "timestep_spacing", "solver_type")


def scheduler_label(spec: SchedulerSpec) -> str:
    """A name that says what a scheduler is: ``ddim``, ``dpmsolver-karras``, ``ddim-eta1`` ...

    Only options that differ from the class default appear, so a row named "karras" really is Karras.
    """
    parts = [spec.name]
    for key, value in spec.non_default_options().items():
        short = key.replace("_", "")
        if key in _TAGS and value is True:
            parts.append(_TAGS[key])
        elif key in _VALUE_ONLY:
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(f"{short}{'on' if value else 'off'}")
        else:
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
    return "-".join(parts)


def run_label(spec: SchedulerSpec, steps: int, guidance_scale: float = NO_GUIDANCE, method: str = "cfg") -> str:
    """What a run is: the scheduler label, the steps and any guidance, e.g. ``dpmsolver-karras-20-cfg3`` or
    ``dpmsolver-20-apg3`` (a method other than cfg is named at scale 1 too: ``-pag``)."""
    if guided(guidance_scale):
        return f"{spec.label}-{steps}-{method}{guidance_scale:g}"
    return f"{spec.label}-{steps}" + ("" if method == "cfg" else f"-{method}")


def run_label_resolver(scheduler: Any, steps: int, guidance_scale: float = NO_GUIDANCE, method: str = "cfg") -> str:
    """The run label as a folder name (``${run_label:...}`` in hydra.run.dir): ``safe_name`` keeps a '/' or '..'
    in an option value out of the path. A scheduler the run will refuse is named as given: the run says why."""
    node = OmegaConf.to_container(scheduler, resolve=True) if OmegaConf.is_config(scheduler) else scheduler
    try:
        label = run_label(scheduler_spec(node), steps, guidance_scale, str(method))  # type: ignore[arg-type]
    except DiffexpError:
        label = f"{node.get('name')}-{steps}"  # type: ignore[union-attr]
    return safe_name(label)


_PROCESS_ID = uuid.uuid4().hex[:6]
# small functions that the YAML files use, e.g. ``stochastic: ${gt:${.eta},0}`` in configs/scheduler/ddim.yaml
RESOLVERS = {
    "uid": lambda: _PROCESS_ID,  # one random id per process: run folders never collide, even in the same second
    "safe": safe_name,  # a value in a folder name: ${safe:${model.name}}
    "gt": lambda a, b: a > b,
    "startswith": lambda text, prefix: str(text).startswith(str(prefix)),
    "add": lambda a, b: a + b,
    "if": lambda condition, then, otherwise: then if condition else otherwise,
    "run_label": run_label_resolver,  # hydra.run.dir and hydra.sweep.subdir name runs with it
}


def register() -> None:
    """Store the schema and the resolvers that the YAML files use; safe to call twice."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


SCHEDULERS: dict[str, str] = {name: f.diffusers_class for name, f in scheduler_files().items()}  # name -> class
