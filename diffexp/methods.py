"""The guidance methods: what each ``configs/guidance/*.yaml`` declares, read into ``GuidanceSettings``.

A guidance file names a diffusers guider class and its options, as a scheduler file names a scheduler:
- ``name``, ``diffusers_class``: the method and the guider class (``diffusers.guiders``) it builds;
- ``aliases`` (optional): short sweep keys for the class's long parameter names (``momentum`` for
  ``adaptive_projected_guidance_momentum``);
- ``own_scale`` (optional): the option that guides by itself at ``guidance_scale=1`` (PAG's perturbed scale);
- ``conditional`` (default true): whether ``guidance_scale`` needs the unconditional input;
- ``prediction_types`` (optional): the model outputs the method assumes, with ``why`` (CFG-Zero*: flow velocity);
- ``layers`` (perturbation guiders): module paths; null: the model family's default;
- ``weak_model`` (autoguidance): the model config of the weaker network;
- ``scale_offset`` (optional): the class's guidance_scale is ``guidance_scale + scale_offset``, where the class's
  formulation counts the scale from another base than the paper (APG).
- ``scale_levels`` (optional): the class takes one scale per frequency level (FDG's ``guidance_scales``, from the
  highest frequency to the lowest); each is ``guidance_scale`` times its factor here, so ``guidance_scale`` stays the
  one scale a sweep varies.

Everything else is an option of the class (null: the class default). ``guidance_scale`` and ``guidance_rescale``
stay top-level keys and set the class's ``guidance_scale`` and ``guidance_rescale``; ``guidance_interval`` is
diffexp's own (noise levels, any method). Options are checked against the class's signature where the guider is
built (``diffexp.sampling.guiders``), before any model loads. Light to import (no torch).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from diffexp.config import config_dir
from diffexp.errors import DiffexpError
from diffexp.guidance_settings import GuidanceSettings

DECLARED = ("name", "diffusers_class", "aliases", "own_scale", "conditional", "prediction_types", "why", "layers",
            "weak_model", "scale_offset", "scale_levels")  # fmt: skip
SET_BY_RUN = ("guidance_scale", "guidance_rescale")  # top-level keys of the run, never options of a file

# guiders diffexp refuses, and why (each reason is tested against the installed diffusers: tests/test_guiders.py)
REFUSED: dict[str, tuple[str, str]] = {
    "seg": (
        "SmoothedEnergyGuidance",
        "in diffusers 0.42.1 it is a no-op: its prepare_models never increments _count_prepared "
        "(smoothed_energy_guidance.py:147-150), so its blur hooks never apply, the third pass equals the "
        "conditional one and the output equals plain CFG's at 1.5 times the cost",
    ),
    "mambo-g": (
        "MagnitudeAwareGuidance",
        "it measures the update with torch.linalg.matrix_norm over every non-batch dimension, which fails on "
        "4-D image tensors (dim must be a 2-tuple)",
    ),
}


@functools.cache
def guidance_files() -> dict[str, dict[str, Any]]:
    """Every guidance file of the package's configs, by name (plain YAML, read once)."""
    import yaml

    files = {}
    for path in sorted((config_dir() / "guidance").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())
        files[str(node["name"])] = node
    return files


def valid() -> str:
    """The methods diffexp runs."""
    return ", ".join(n for n in guidance_files() if n not in REFUSED)


def refuse(name: str, class_name: str | None = None) -> None:
    """Refuse a method diffexp cannot run honestly, with the reason."""
    for short, (refused_class, why) in REFUSED.items():
        if name == short or class_name == refused_class:
            raise DiffexpError(f"Guidance '{name}' ({refused_class}) is refused: {why}. Valid methods are: {valid()}.")


def read_guidance(
    scale: float, rescale: float, interval: Sequence[float] | None, node: Mapping[str, Any] | None = None
) -> GuidanceSettings:
    """The guidance settings of a run (``node``: its ``guidance`` group, resolved; empty: cfg), or a refusal."""
    if scale < 0:
        raise DiffexpError(f"guidance_scale={scale} is not allowed: it must be >= 0 (1 is no guidance).")
    if not 0 <= rescale <= 1:
        raise DiffexpError(f"guidance_rescale={rescale} is not allowed: it must be in [0, 1] (0 is no rescaling).")
    span = None
    if interval is not None:
        values = list(interval)
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not 0 <= values[0] < values[1]:
            raise DiffexpError(
                f"guidance_interval={values} is not allowed: it must be two increasing noise levels "
                "[sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (sigma = sqrt((1 - abar) / abar))."
            )
        span = (float(values[0]), float(values[1]))
    node = dict(node or {"name": "cfg", "diffusers_class": "ClassifierFreeGuidance"})
    name = str(node.get("name"))
    refuse(name, node.get("diffusers_class"))
    known = guidance_files().get(name, {})
    node = {**{k: v for k, v in known.items() if k in DECLARED}, **node}
    if not node.get("diffusers_class"):
        raise DiffexpError(f"Unknown guidance '{name}'. Valid methods are: {valid()}.")
    aliases = dict(node.get("aliases") or {})
    options = {aliases.get(k, k): v for k, v in node.items() if k not in DECLARED and v is not None}
    if clash := [k for k in SET_BY_RUN if k in options]:
        raise DiffexpError(
            f"guidance.{clash[0]} is not allowed: the run's own key {clash[0]}= sets it for every method."
        )
    own = node.get("own_scale")
    layers = node.get("layers")
    levels = scale_levels(name, node.get("scale_levels"), options)
    return GuidanceSettings(
        scale=float(scale),
        rescale=float(rescale),
        interval=span,
        method=name,
        diffusers_class=str(node["diffusers_class"]),
        options=tuple(sorted((k, hashable(v)) for k, v in options.items())),
        layers=None if layers is None else tuple(str(p) for p in ([layers] if isinstance(layers, str) else layers)),
        weak_model=node.get("weak_model"),
        perturbs=bool(own) and options.get(aliases.get(own, own), 0) != 0,
        conditional=bool(node.get("conditional", True)),
        prediction_types=tuple(node["prediction_types"]) if node.get("prediction_types") else None,
        scale_offset=float(node.get("scale_offset") or 0.0),
        scale_levels=levels,
    )


def scale_levels(method: str, factors: Any, options: Mapping[str, Any]) -> tuple[float, ...] | None:
    """A method's factors of guidance_scale per frequency level (FDG), checked; None for a method with one scale."""
    if factors is None:
        return None
    if "guidance_scales" in options:
        raise DiffexpError(
            f"guidance.guidance_scales is not allowed for {method}: its levels' scales are guidance_scale times "
            "guidance.scale_levels (from the highest frequency to the lowest), e.g. guidance.scale_levels=[1,0.5]."
        )
    values = list(factors) if isinstance(factors, (list, tuple)) else [factors]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DiffexpError(
            f"guidance.scale_levels={values} is not allowed: it must be a non-empty list of factors >= 0, one per "
            "frequency level from the highest to the lowest (each level's scale is guidance_scale times its factor)."
        )
    return tuple(float(v) for v in values)


def why_prediction(settings: GuidanceSettings) -> str:
    """The file's reason for its prediction types."""
    return str(guidance_files().get(settings.method, {}).get("why") or "its formula assumes them")


def hashable(value: Any) -> Any:
    """Lists as tuples, so the settings can key a cache."""
    if isinstance(value, (list, tuple)):
        return tuple(hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value
