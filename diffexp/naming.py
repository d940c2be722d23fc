"""The names of runs: a scheduler's label (only the options that differ from the class default) and a run's."""

from __future__ import annotations

from typing import Any, Protocol

from diffexp.guidance_settings import NO_GUIDANCE, guided


class Labelled(Protocol):
    """What a label is made of: a scheduler spec's name and its options that differ from the defaults."""

    name: str

    def non_default_options(self) -> dict[str, Any]: ...


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


def scheduler_label(spec: Labelled) -> str:
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


def run_label(
    spec: Labelled,
    steps: int,
    guidance_scale: float = NO_GUIDANCE,
    schedule: str = "default",
    method: str = "cfg",
    cache: str = "none",
) -> str:
    """What a run is: the scheduler label, a schedule other than the scheduler's own, the steps and any guidance,
    e.g. ``dpmsolver-karras-20-cfg3``, ``k-euler-beta-20``, ``dpmsolver-20-apg3`` (a method other than cfg is named
    at scale 1 too: ``-pag``) and a cache last (``dit-ddim-20-first-block0.05``)."""
    head = f"{scheduler_label(spec)}{'' if schedule == 'default' else f'-{schedule}'}-{steps}"
    tail = "" if cache == "none" else f"-{cache}"
    if guided(guidance_scale):
        return f"{head}-{method}{guidance_scale:g}{tail}"
    return head + ("" if method == "cfg" else f"-{method}") + tail


def cache_label(node: Any) -> str:
    """A cache in a run's name: its name and the value of the option its file names as ``label``
    (``first-block0.05``, ``pab2``); ``none`` when off. ``node``: the ``cache`` group's values."""
    node = dict(node or {})
    name = str(node.get("name") or "none")
    value = node.get(str(node.get("label")))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{name}{value:g}" if number and name != "none" else name
