"""The scheduler catalog: what each ``configs/scheduler/*.yaml`` declares, and the names of runs.

A scheduler file holds its diffexp ``name``, three declarations and the options people compare:
- ``diffusers_class``: the diffusers class it builds;
- ``stochastic``: whether it injects fresh noise (an interpolation of its options where that depends on them);
- ``theory_order``: the global order of accuracy that theory gives its ODE solver (null: none);
- ``prediction_types``: the model parameterisations it can take (epsilon, v_prediction, sample);
- ``ranges`` (optional): ``option: [low, high]`` (null: open), the values diffusers honours, where it would
  otherwise run another value silently (DPM-Solver's ``solver_order=9`` runs order 3);
- ``takes`` (optional): the explicit schedule it takes (sigmas | timesteps; null: none, so ``schedule=`` is refused);
- ``family: k-diffusion`` and ``function``: a k-diffusion sampler (``diffexp.sampling.kdiffusion``);
- ``graph_step`` (optional, default false): its ``step()`` keeps no state between steps and draws no noise on the
  host, so ``graph=step`` can capture each step as a CUDA graph (``diffexp.graph_settings``).

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

from diffexp.config import RunConfig, config_dir, schedule_label
from diffexp.errors import DiffexpError
from diffexp.folders import safe_name
from diffexp.guidance_settings import NO_GUIDANCE
from diffexp.naming import cache_label, run_label, scheduler_label
from diffexp.numbers import out_of_range
from diffexp.refused import REFUSED, REFUSED_NAMES

# keys of a scheduler file that are no options
DECLARED = ("name", "diffusers_class", "stochastic", "theory_order", "prediction_types", "ranges")
DECLARED += ("takes", "family", "function", "graph_step")
REQUIRED = DECLARED[:5]  # every scheduler file declares these (a k-diffusion one: diffusers_class null)
TAKES = ("sigmas", "timesteps")  # what explicit schedule a scheduler takes (``takes``; null: none)
K_FAMILY = "k-diffusion"  # ``family`` of the files that name a k-diffusion sampler (``function``)

# the loop passes these itself; they are never options
LOOP_ARGS = {"self", "model_output", "timestep", "sample", "generator", "variance_noise", "return_dict"}
# configuration that belongs to the model, not to a scheduler comparison
MODEL_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"}


@dataclass(frozen=True)
class SchedulerFile:
    """One ``configs/scheduler/<name>.yaml``: its declarations and its options, unresolved."""

    name: str
    diffusers_class: str  # "" for a k-diffusion sampler
    path: Path
    family: str = "diffusers"

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
        family = str(node.get("family") or "diffusers")
        files[str(node["name"])] = SchedulerFile(
            str(node["name"]), str(node.get("diffusers_class") or ""), path, family
        )
    return files


def check_ranges(name: str, options: Mapping[str, Any], ranges: Mapping[str, Any] | None) -> None:
    """Refuse an option outside the range its file declares (what diffusers honours)."""
    if found := out_of_range(options, ranges):
        key, value, low, high = found
        span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise DiffexpError(
            f"Scheduler option {name}.{key}={value} is outside {span}, the range diffusers honours for it "
            f"(configs/scheduler/{name}.yaml, ranges): it would run another value silently, so diffexp refuses it."
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
    takes: str | None = None  # the explicit schedule it takes: sigmas, timesteps, or None (none)
    family: str = "diffusers"  # or k-diffusion: ``function`` of k_diffusion.sampling
    function: str | None = None
    graph_step: bool = False  # each step can be captured as a CUDA graph (graph=step)

    @property
    def is_k(self) -> bool:
        return self.family == K_FAMILY

    @property
    def record(self) -> dict[str, Any]:
        """Name, class (or k-diffusion function) and the options set: what a run records of its scheduler."""
        if self.is_k:
            return {**self.options, "name": self.name, "family": self.family, "function": self.function}
        return {**self.options, "name": self.name, "diffusers_class": self.diffusers_class}

    def non_default_options(self) -> dict[str, Any]:
        """The options that differ from the diffusers class default ({} for a class diffusers lacks); for a
        k-diffusion sampler, those that differ from its file's (the function's defaults)."""
        if self.is_k:
            known = scheduler_files().get(self.name)
            defaults = known.spec() if known else {}
            return {k: v for k, v in self.options.items() if v != defaults.get(k)}
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
    known = scheduler_files().get(name)
    family = str(node.get("family") or (known.family if known else "diffusers"))
    class_name = "" if family == K_FAMILY else class_name_of(name, node.get("diffusers_class"))
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
    takes = node.get("takes")
    if takes is not None and takes not in TAKES:
        raise DiffexpError(f"Scheduler '{name}' declares takes: {takes}; a scheduler takes sigmas, timesteps or null.")
    if family == K_FAMILY and not node.get("function"):
        raise DiffexpError(f"Scheduler '{name}' is a k-diffusion sampler without 'function' (k_diffusion.sampling's).")
    return SchedulerSpec(
        name=name,
        diffusers_class=class_name,
        stochastic=stochastic,
        theory_order=None if order is None else int(order),
        prediction_types=tuple(node.get("prediction_types") or ("epsilon",)),
        ranges=ranges,
        options=options,
        takes=takes,
        family=family,
        function=node.get("function"),
        graph_step=bool(node.get("graph_step", False)),
    )


def run_label_resolver(
    scheduler: Any,
    steps: int,
    guidance_scale: float = NO_GUIDANCE,
    schedule: Any = None,
    method: str = "cfg",
    cache: Any = None,
) -> str:
    """The run label as a folder name (``${run_label:...}`` in hydra.run.dir): ``safe_name`` keeps a '/' or '..'
    in an option value out of the path. A scheduler the run will refuse is named as given: the run says why."""
    node = OmegaConf.to_container(scheduler, resolve=True) if OmegaConf.is_config(scheduler) else scheduler
    plan = OmegaConf.to_container(schedule, resolve=True) if OmegaConf.is_config(schedule) else schedule
    try:
        cached = cache_label(OmegaConf.to_container(cache, resolve=True) if OmegaConf.is_config(cache) else cache)
        label = run_label(scheduler_spec(node), steps, guidance_scale, schedule_label(plan), str(method), cached)  # type: ignore[arg-type]
    except (DiffexpError, TypeError):
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


# name -> diffusers class; name -> k-diffusion function's file
SCHEDULERS: dict[str, str] = {name: f.diffusers_class for name, f in scheduler_files().items() if f.family != K_FAMILY}
K_SAMPLERS: dict[str, Path] = {name: f.path for name, f in scheduler_files().items() if f.family == K_FAMILY}
