"""Config-named classes (``_target_`` nodes): resolved and checked before anything is called.

A config may name only a subclass of what its key expects (an observer, a Hydra callback); the class is
resolved and checked first, and its arguments may not name other ``_target_`` nodes, so no other callable
named in a config ever runs. Light to import (no torch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffexp.errors import DiffexpError, exit_with

T = TypeVar("T")
TARGET = "_target_"
# Hydra's instantiate keys that change what is built or called (a partial is no instance of anything)
REFUSED_KEYS = ("_partial_", "_args_")


def nested_targets(node: Any, prefix: str) -> list[str]:
    """The dotted keys of ``_target_`` entries inside ``node`` (the arguments of a target)."""
    found = []
    if isinstance(node, (DictConfig, Mapping)):
        for key, value in node.items():
            if key == TARGET:
                found.append(f"{prefix}{key}")
            else:
                found += nested_targets(value, f"{prefix}{key}.")
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, value in enumerate(node):
            found += nested_targets(value, f"{prefix}{i}.")
    return found


def resolve_target(node: Any, base: type[T], key: str) -> type[T]:
    """The class that ``node``'s ``_target_`` names, if it is a subclass of ``base``; a clear refusal otherwise.
    Only the class's module is imported: nothing the config names is called."""
    from hydra._internal.utils import _locate

    what = f"{base.__module__}.{base.__qualname__}"
    if not isinstance(node, (DictConfig, Mapping)) or not isinstance(node.get(TARGET), str):
        raise DiffexpError(f"{key} must be a node with a {TARGET} naming a {what} subclass; it is {node!r}.")
    name = node[TARGET]
    try:
        cls = _locate(name)  # imports the module that holds the name; calls nothing it names
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffexpError(f"{key}.{TARGET}={name} cannot be found ({reason}).") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DiffexpError(
            f"{key}.{TARGET}={name} is not allowed: {key} takes a {what} subclass, and {name} is not one; "
            "nothing was built or called."
        )
    inner = [k for k in nested_targets({k: v for k, v in node.items() if k != TARGET}, f"{key}.")]
    refused = [f"{key}.{k}" for k in REFUSED_KEYS if k in node]
    if inner or refused:
        raise DiffexpError(
            f"{', '.join(inner + refused)} is not allowed: the arguments of {key} are plain values (no nested "
            f"{TARGET}, {', '.join(REFUSED_KEYS)}); nothing was built or called."
        )
    return cls


def build(node: Any, base: type[T], key: str) -> T:
    """An instance of the checked class of ``node``, with its arguments as plain values."""
    cls = resolve_target(node, base, key)
    kwargs = {k: v for k, v in node.items() if not (isinstance(k, str) and k.startswith("_") and k.endswith("_"))}
    args = OmegaConf.to_container(OmegaConf.create(kwargs), resolve=True) if kwargs else {}
    try:
        return cls(**args)  # type: ignore[arg-type]
    except Exception as err:
        raise DiffexpError(f"{key} ({node[TARGET]}) could not be built: {err}") from None


def check_logging(conf: Mapping[str, Any], key: str) -> None:
    """A logging configuration (``hydra.job_logging``, ``hydra.hydra_logging``) names only logging classes: each
    handler, formatter and filter's ``class`` or ``()`` a subclass of what its section builds, and no other
    ``()`` factory anywhere (``logging.config`` would call whatever they name)."""
    from hydra._internal.utils import _locate

    sections = {"handlers": logging.Handler, "formatters": logging.Formatter, "filters": logging.Filter}
    for section, base in sections.items():
        for name, entry in (conf.get(section) or {}).items():
            if not isinstance(entry, Mapping):
                continue
            for field in ("class", "()"):
                target = entry.get(field)
                if target is None:
                    continue
                try:
                    cls = _locate(target) if isinstance(target, str) else None
                except Exception:
                    cls = None
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    raise DiffexpError(
                        f"{key}: {section}.{name}.{field}={target} is not allowed: {section} of a logging config "
                        f"are {base.__module__}.{base.__qualname__} subclasses; nothing was built or called."
                    )
            factories = nested_keys({k: v for k, v in entry.items() if k != "()"}, "()", f"{section}.{name}.")
            if factories:
                raise DiffexpError(f"{key}: {', '.join(factories)} is not allowed; nothing was built or called.")
    rest = {k: v for k, v in conf.items() if k not in sections}
    if factories := nested_keys(rest, "()", ""):
        raise DiffexpError(f"{key}: {', '.join(factories)} is not allowed; nothing was built or called.")


def nested_keys(node: Any, name: str, prefix: str) -> list[str]:
    """The dotted keys called ``name`` inside a plain container."""
    if isinstance(node, Mapping):
        return [f"{prefix}{k}" for k in node if k == name] + [
            found for k, v in node.items() if k != name for found in nested_keys(v, name, f"{prefix}{k}.")
        ]
    if isinstance(node, (list, tuple)):
        return [found for i, v in enumerate(node) for found in nested_keys(v, name, f"{prefix}{i}.")]
    return []


def guard_hydra_logging() -> None:
    """Make Hydra check a logging config before ``logging.config`` builds what it names."""
    from hydra._internal import logging_config

    original = logging_config.configure_logging
    if getattr(original, "checked", False):
        return

    def checked(config: dict[str, Any]) -> None:
        try:
            check_logging(config, "the logging config (hydra.job_logging or hydra.hydra_logging)")
        except DiffexpError as err:
            exit_with(err, "none yet (the config was refused before Hydra made it)")
        original(config)

    checked.checked = True  # type: ignore[attr-defined]
    logging_config.configure_logging = checked


def guard_hydra() -> None:
    """For the commands (``hydra.main``): Hydra checks its callbacks and logging configs before building them."""
    guard_hydra_logging()
    guard_hydra_callbacks()


def guard_hydra_callbacks() -> None:
    """Make Hydra check ``hydra.callbacks`` before it builds them: each must name a Hydra ``Callback`` subclass
    with plain arguments (Hydra alone would call any ``_target_``)."""
    from hydra._internal import callbacks
    from hydra.experimental.callback import Callback

    original = callbacks.Callbacks.__init__
    if getattr(original, "checked", False):
        return

    def checked_init(self: Any, config: DictConfig | None = None) -> None:
        nodes = OmegaConf.select(config, "hydra.callbacks") if config is not None else None
        try:
            for name, node in (nodes or {}).items():
                resolve_target(node, Callback, f"hydra.callbacks.{name}")
        except DiffexpError as err:  # before any folder exists: a message and exit status 2, no traceback
            exit_with(err, "none yet (the config was refused before Hydra made it)")
        original(self, config)

    checked_init.checked = True  # type: ignore[attr-defined]
    callbacks.Callbacks.__init__ = checked_init  # type: ignore[method-assign]
