"""The reference solution: the model's probability-flow ODE solved accurately from the run's own noise.

A deterministic sampler with N steps approximates this solution; its distance to it is the discretisation
error. The reference runs through the same loop (``diffexp.sampling.loop.sample``) with a configurable deterministic
diffusers scheduler, many steps, and clipping and thresholding forced off, so it solves the model's true ODE.
It is cached on disk under a key that changes whenever the model, seed, batch, resolution, precision, device
type or solver settings change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffexp.catalog import option_signatures, resolve_class
from diffexp.errors import DiffexpError
from diffexp.folders import atomic
from diffexp.sampling.adapters import Adapter, pixel_adapter
from diffexp.sampling.flow import is_flow
from diffexp.sampling.loop import StepState, iter_steps, sample
from diffexp.sampling.models import LoadedModel
from diffexp.sampling.schedulers import BuiltScheduler, build_scheduler

log = logging.getLogger("diffexp")

FORMAT = 1  # bump when the way a reference is computed changes: every cached one is then recomputed
# options that would make the reference follow another ODE than the model's own
CLIPPING_OPTIONS = ("clip_sample", "thresholding")


def build_reference_scheduler(spec: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> BuiltScheduler:
    """The reference's scheduler: deterministic, and with clipping and thresholding off."""
    options = dict(spec)
    name = str(options.pop("name", ""))
    if name == "heun" and is_flow(scheduler_config):  # the default reference: Heun, on the flow path for a flow model
        name, options = "flow-heun", {}
    init, _ = option_signatures(resolve_class(name, options.get("diffusers_class")))
    for key in CLIPPING_OPTIONS:
        if options.get(key):
            raise DiffexpError(
                f"metrics.reference.scheduler.{key}=true is not allowed: the reference must solve the model's "
                "true probability-flow ODE, and clipping or thresholding x0 changes that ODE."
            )
        if key in init:
            options[key] = False
    built = build_scheduler(name, scheduler_config, options)
    if built.stochastic:
        raise DiffexpError(
            f"metrics.reference.scheduler.name={name} with these options is stochastic; the reference must be "
            "a deterministic solver of the probability-flow ODE (e.g. heun, dpmsolver, unipc, euler)."
        )
    return built


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the parameters and buffers: a retrained model at the same path gets a new key."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            v = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{v.sum().item():.10e}{v.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def reference_key(
    loaded: LoadedModel,
    seed: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    built: BuiltScheduler,
    steps: int,
    model: Adapter | None = None,
    first: int = 0,
) -> tuple[str, dict[str, Any]]:
    """The cache key and what it was made of."""
    model_config = {k: v for k, v in dict(getattr(loaded.model, "config", {})).items() if not k.startswith("_")}
    parts = {
        "format": FORMAT,
        "model": {
            "name": loaded.name,
            "id": loaded.id,
            "revision": loaded.revision,
            "class": type(loaded.model).__name__,
            "config": model_config,
            "weights": weights_fingerprint(loaded.model),
            "scheduler_config": {k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")},
        },
        "shape": list(loaded.sample_shape),
        "seed": seed,
        "batch_size": batch_size,
        "precision": precision,
        "device_type": device.type,
        "solver": built.effective_config(),
        "steps": steps,
    }
    if first:  # a later chunk of the run: samples first .. first + batch_size - 1
        parts["first"] = first
    labels = getattr(model, "labels", None)
    if model is not None and (labels or model.guidance.settings.enabled or model.cond):  # a conditioned ODE
        null = getattr(getattr(model, "source", None), "null_class", None)
        condition = {"labels": None if labels is None else list(labels), "null": null}
        parts["condition"] = condition | model.guidance.settings.record
        if "encoder_hidden_states" in model.cond:  # a text model: its halves' embeddings (SDXL: pooled, time ids)
            halves = [model.cond, model.uncond or {}]
            data = b"".join(h[k].float().cpu().numpy().tobytes() for h in halves if h for k in sorted(h))
            parts["condition"]["text"] = hashlib.sha1(data).hexdigest()
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20], json.loads(text)


@dataclass
class Reference:
    x: torch.Tensor  # the final samples, float32 on the CPU
    key: str
    path: Path
    cached: bool  # loaded from the cache rather than solved now
    nfe: int
    solver: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "cached": self.cached, "nfe": self.nfe, **self.solver}


def solve_reference(
    spec: Mapping[str, Any],
    steps: int,
    loaded: LoadedModel,
    noise: torch.Tensor,
    seed: int,
    precision: str,
    cache_dir: Path,
    progress: bool = False,
    model: Adapter | None = None,
    first: int = 0,
) -> Reference:
    """Load the reference for this model, noise (samples ``first ..`` of ``seed``) and solver, or solve and cache it.

    ``spec`` is the scheduler's name and options, as in the run config's ``scheduler``.
    """
    if steps <= 0:
        raise DiffexpError(f"metrics.reference.steps={steps} is not allowed: it must be a positive integer.")
    built = build_reference_scheduler(spec, loaded.scheduler_config)
    # a run passes its own adapter: with its labels and guidance
    model = model or pixel_adapter(loaded.model, loaded.prediction_type, loaded.scheduler_config)
    key, parts = reference_key(loaded, seed, len(noise), precision, noise.device, built, steps, model, first)
    path = Path(cache_dir) / "reference" / f"{key}.safetensors"
    solver = {"scheduler": built.name, "steps": steps, "options": built.options}
    if path.exists():
        try:
            stored = load_file(path)
            x = stored["x"]
            if tuple(x.shape) == tuple(noise.shape):
                return Reference(x, key, path, True, int(stored["nfe"]), solver)
        except Exception as err:  # a damaged file is recomputed, not trusted
            log.warning("reference cache %s is unreadable (%s); solving again", path, err)

    log.info("solving the reference: %s, %d steps (cached as %s)", built.name, steps, path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        built.scheduler.set_timesteps(steps, device=noise.device)
        bar = tqdm(total=len(built.scheduler.timesteps), desc=f"reference {built.name}-{steps}", unit="call")

    def tick(_: StepState) -> None:
        if bar is not None:
            bar.update(1)

    try:
        with torch.inference_mode():
            final = sample(iter_steps(model, built.scheduler, noise, steps, None, built.step_kwargs, steps), tick)
    finally:
        if bar is not None:
            bar.close()
    x = final.x.float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        save_file({"x": x, "nfe": torch.tensor(final.nfe)}, str(tmp), metadata={"key": json.dumps(parts)})
    return Reference(x, key, path, False, final.nfe, solver)
