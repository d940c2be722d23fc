"""Numbers in a config: non-finite floats by dotted key, and options outside their declared ranges. Imports nothing
of diffexp (the config layer and the training schema both use it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# scheduler options whose infinity means "no bound" (euler's s_tmax: .inf, the DPM solvers' -inf clipping)
INFINITY_ALLOWED = {"s_tmax": math.inf, "lambda_min_clipped": -math.inf}


def non_finite(cfg: DictConfig, allowed: dict[str, float] | None = None) -> str | None:
    """Why the config's first NaN or infinite float (typed keys, free-form options such as the scheduler's, list
    items) is refused, naming its key; None when every float is finite. ``allowed``: keys whose given infinity
    means "no bound" (default ``INFINITY_ALLOWED``)."""
    allowed = INFINITY_ALLOWED if allowed is None else allowed
    values = OmegaConf.to_container(cfg, resolve=True)
    for key, value in float_values({k: v for k, v in values.items() if k != "hydra"}):  # type: ignore[union-attr]
        if not math.isfinite(value) and allowed.get(key.rsplit(".", 1)[-1]) != value:
            return (
                f"{key}={value} is not allowed: every number in the config must be finite (no nan or inf), so that "
                "a run never records a result of a value it could not use."
            )
    return None


def float_values(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """The dotted keys and values of every float in a plain container."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in float_values(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in float_values(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), node)] if isinstance(node, float) else []


def out_of_range(options: Mapping[str, Any], ranges: Mapping[str, Any] | None) -> tuple[str, Any, Any, Any] | None:
    """The first numeric option outside its declared ``(low, high)`` range (either bound None: open), as
    ``(key, value, low, high)``; None when all are inside. Booleans and non-numbers are not ranged."""
    for key, (low, high) in (ranges or {}).items():
        value = options.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            return key, value, low, high
    return None
