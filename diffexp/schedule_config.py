"""The ``schedule`` group (``configs/schedule/*.yaml``): where the steps sit, independently of the sampler.

``default`` is the scheduler's own. The others are formulas of ``diffexp.sampling.schedules`` (sources cited
there); ``custom`` takes ``sigmas=[...]`` or ``timesteps=[...]``. What is checked here needs no model: a custom
schedule's order and sign; the model's range is checked when the schedule is placed on it. Light (no torch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from diffexp.config import ScheduleConfig
from diffexp.errors import DiffexpError

# name -> what the formula reads: the model's sigma range (or schedule.sigma_min / sigma_max), its discrete table,
# a published table, or the values given
SCHEDULES = {
    "default": "the scheduler's own",
    "karras": "range",
    "exponential": "range",
    "polyexponential": "range",
    "kl_optimal": "range",
    "linear_quadratic": "range",
    "simple": "table",
    "sgm_uniform": "table",
    "ddim_uniform": "table",
    "normal": "table",
    "beta": "table",
    "ays": "published",
    "custom": "given",
}
AYS_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "svd": "Stable Video Diffusion"}


def read_schedule(node: ScheduleConfig, steps: int, steps_given: bool) -> tuple[ScheduleConfig, int]:
    """Check a schedule and return it with the run's step count (a custom schedule's own; ``steps_given``: the
    user set steps, which must then agree)."""
    if node.name not in SCHEDULES:
        raise DiffexpError(f"schedule={node.name} is unknown. Schedules: {', '.join(SCHEDULES)}.")
    given = {k: v for k, v in (("sigmas", node.sigmas), ("timesteps", node.timesteps)) if v is not None}
    if node.name != "custom" and given:
        raise DiffexpError(f"schedule.{next(iter(given))} is only read by schedule=custom (schedule={node.name}).")
    if node.name == "ays" and node.table is not None and node.table not in AYS_NAMES:
        raise DiffexpError(f"schedule.table={node.table} is unknown; Align Your Steps tables: {', '.join(AYS_NAMES)}.")
    lo, hi = node.sigma_min, node.sigma_max
    if (lo is not None and lo <= 0) or (hi is not None and hi <= 0) or (lo is not None and hi is not None and lo >= hi):
        raise DiffexpError(f"schedule.sigma_min={lo}, sigma_max={hi}: noise levels with 0 < sigma_min < sigma_max.")
    if node.rho <= 0 or node.alpha <= 0 or node.beta <= 0:
        raise DiffexpError("schedule.rho, schedule.alpha and schedule.beta must be positive.")
    if node.name != "custom":
        return node, steps
    if len(given) != 1:
        raise DiffexpError("schedule=custom takes exactly one of schedule.sigmas=[...] or schedule.timesteps=[...].")
    key, values = next(iter(given.items()))
    count = check_custom(key, values)
    if steps_given and steps != count:
        raise DiffexpError(f"steps={steps} contradicts schedule.{key}, which has {count} steps; leave steps unset.")
    return node, count


def check_custom(key: str, values: Sequence[float]) -> int:
    """The step count of custom noise levels or timesteps, or a refusal: strictly decreasing, finite, and
    noise levels positive (a final 0 allowed), timesteps >= 0 (their upper bound is the model's)."""
    numbers = [float(v) for v in values]
    body = numbers[:-1] if key == "sigmas" and numbers and numbers[-1] == 0 else numbers
    if not body or not all(math.isfinite(v) for v in numbers):
        raise DiffexpError(f"schedule.{key}={list(values)}: give at least one finite value.")
    if any(b >= a for a, b in itertools.pairwise(numbers)):
        raise DiffexpError(
            f"schedule.{key}={list(values)} is not strictly decreasing: a schedule runs from noise down."
        )
    if key == "sigmas" and body[-1] <= 0:
        raise DiffexpError(f"schedule.sigmas={list(values)}: noise levels must be positive (only a final 0 allowed).")
    if key == "timesteps" and numbers[-1] < 0:
        raise DiffexpError(f"schedule.timesteps={list(values)}: timesteps must be >= 0.")
    return len(body)
