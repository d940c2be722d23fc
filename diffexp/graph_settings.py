"""The ``graph`` key: ``none``, or ``step``, each step of the loop (the network's call and the scheduler's update)
captured as one CUDA graph and replayed (``diffexp.sampling.graphs``). Light to import (no torch).

A graph replays the kernels it recorded, with the host-side values of the recording baked in. So a step can be
captured only where nothing on the host changes between replays of it:
- the scheduler's ``step()`` keeps no state between steps and draws no noise on the host: its file declares
  ``graph_step: true`` (today DDIM). Multistep solvers keep past outputs and a step index in Python lists and
  counters; the Euler family draws noise on the host at every step, even when unused; DDPM and the ancestral and
  SDE samplers draw fresh noise;
- guidance decides on the host per call (its step, interval and momentum), and a cache per pass: both refused;
- ``compile=reduce-overhead`` and ``max-autotune`` record CUDA graphs of their own, which cannot nest in one.
"""

from __future__ import annotations

from typing import Protocol

from diffexp.config import config_dir
from diffexp.errors import DiffexpError

GRAPH_MODES = ("none", "step")


class SchedulerSpec(Protocol):
    """What the check reads of a scheduler (``diffexp.catalog.SchedulerSpec``)."""

    name: str
    diffusers_class: str
    function: str | None
    stochastic: bool
    graph_step: bool

    @property
    def is_k(self) -> bool: ...


def capturable() -> str:
    """The schedulers whose files declare ``graph_step: true`` (plain YAML, read when a refusal names them)."""
    import yaml

    files = sorted((config_dir() / "scheduler").glob("*.yaml"))
    return ", ".join(p.stem for p in files if yaml.safe_load(p.read_text()).get("graph_step") is True) or "none"


def read_graph(value: str, scheduler: SchedulerSpec, cache: str, guided: bool, compile_mode: str | None) -> str:
    """``graph`` as a run uses it, or a refusal that says why this run's step cannot be captured."""
    value = str(value).strip()
    if value not in GRAPH_MODES:
        raise DiffexpError(f"graph={value} is not allowed: use {' or '.join(GRAPH_MODES)}.")
    if value == "none":
        return value
    what = f"graph=step cannot capture scheduler={scheduler.name}"
    if scheduler.stochastic:
        raise DiffexpError(
            f"{what}: it is stochastic with these options, and draws fresh noise at every step from each sample's "
            "CPU generator, which a CUDA graph would replay as the same noise. Use a deterministic scheduler "
            f"(graph=step captures: {capturable()}), or graph=none."
        )
    if scheduler.is_k:
        raise DiffexpError(
            f"{what}: a k-diffusion sampler runs its whole loop inside one function of k-diffusion, with no step "
            f"that diffexp could capture. Use a scheduler whose file declares graph_step: true ({capturable()})."
        )
    if not scheduler.graph_step:
        raise DiffexpError(
            f"{what} ({scheduler.diffusers_class or scheduler.function}): its step keeps state on the host between "
            "steps (past outputs, a step index) or draws noise there, which a replayed graph would not update. "
            f"Only schedulers whose file declares graph_step: true can be captured ({capturable()}); use graph=none."
        )
    if guided:
        raise DiffexpError(
            "graph=step cannot capture guided calls: the guider decides on the host at every call (its step, "
            "interval and state). Use guidance_scale=1, or graph=none."
        )
    if cache != "none":
        raise DiffexpError(
            f"graph=step cannot combine with cache={cache}: the cache decides on the host, per pass, whether to run "
            "or reuse a block. Use cache=none, or graph=none."
        )
    if compile_mode in ("reduce-overhead", "max-autotune"):
        raise DiffexpError(
            f"graph=step cannot combine with compile={compile_mode}, which records CUDA graphs of its own (graphs "
            "cannot nest). Use compile=default (its kernels are captured in the step's graph) or compile=false."
        )
    return value
