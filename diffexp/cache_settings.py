"""The ``cache`` group: a training-free cache of diffusers' hooks (``configs/cache/*.yaml``), read into
``CacheSettings``. Light to import (no torch).

A cache file declares:
- ``name`` and ``diffusers_class``: the cache and its config class in ``diffusers.hooks`` (null for ``none``);
- ``label``: the option whose value names the run (``first-block0.05``);
- ``ranges``: ``option: [low, high]`` (null: open), the values that make sense; outside is refused.

Everything else is an option of the config class, checked against its signature where the cache is applied
(``diffexp.sampling.caches``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffexp.config import config_dir
from diffexp.errors import DiffexpError
from diffexp.naming import cache_label
from diffexp.numbers import out_of_range

DECLARED = ("name", "diffusers_class", "label", "ranges")
NO_CACHE = "none"


@dataclass(frozen=True)
class CacheSettings:
    """A cache and its options by the config class's own names (a tuple: hashable)."""

    name: str = NO_CACHE
    diffusers_class: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    label_option: str | None = None  # the option that names the run

    @property
    def enabled(self) -> bool:
        return self.diffusers_class is not None

    @property
    def label(self) -> str:
        """The cache in a run's name: ``first-block0.05``, ``pab2``; ``none`` when off."""
        return cache_label({"name": self.name, "label": self.label_option, **dict(self.options)})

    @property
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.diffusers_class, "options": {k: v for k, v in self.options}}


@functools.cache
def cache_files() -> dict[str, dict[str, Any]]:
    """Every cache file of the package's configs, by name (plain YAML, read once)."""
    import yaml

    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((config_dir() / "cache").glob("*.yaml"))}


def read_cache(node: Mapping[str, Any] | None) -> CacheSettings:
    """The cache of a run (its ``cache`` group, resolved; empty: none), or a refusal of an unknown name or of an
    option outside its declared range."""
    node = dict(node or {"name": NO_CACHE})
    name = str(node.get("name"))
    known = cache_files().get(name)
    if known is None:
        raise DiffexpError(f"cache={name} is unknown. Caches: {', '.join(cache_files())}.")
    node = {**known, **node}
    options = {k: v for k, v in node.items() if k not in DECLARED and v is not None}
    if found := out_of_range(options, node.get("ranges")):
        key, value, low, high = found
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise DiffexpError(
            f"cache.{key}={value} is outside {span}, the range configs/cache/{name}.yaml declares for "
            f"{node.get('diffusers_class')}: outside it the cache either never reuses work or reuses it at "
            "every step, so diffexp refuses it."
        )
    return CacheSettings(
        name=name,
        diffusers_class=node.get("diffusers_class"),
        options=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())),
        label_option=node.get("label"),
    )
