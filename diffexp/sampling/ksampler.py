"""A k-diffusion sampler as a run holds it (its function, options and noise levels), and its options checked
against the function's signature; ``diffexp.sampling.kdiffusion`` runs it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.kload import k_sampling

# what the loop passes itself; never options
K_LOOP_ARGS = {"model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler", "sigma_min", "sigma_max"}
K_LOOP_ARGS |= {"n", "return_info"}
BROWNIAN = {"sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}  # one Brownian tree per sample
RANGE_ONLY = {"sample_dpm_fast", "sample_dpm_adaptive"}  # they take sigma_min and sigma_max, not a schedule
SECOND_ORDER = {
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
}
CHURN = {"sample_euler", "sample_heun", "sample_dpm_2"}  # their churn noise comes from torch's global generator


@dataclass
class KSampler:
    """A k-diffusion sampler ready to run: its function, options and noise levels (float64, ending in 0)."""

    function: str
    options: dict[str, Any]
    sigmas: torch.Tensor
    steps: int
    stochastic: bool
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        """Model calls per run: second-order samplers end with an Euler step (2N - 1); dpm-adaptive: unknown (0)."""
        if self.function == "sample_dpm_adaptive":
            return 0
        return 2 * self.steps - 1 if self.function in SECOND_ORDER else self.steps


def check_options(name: str, function: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options checked against the function's signature (needs k-diffusion), or a clear refusal."""
    params = {k: p for k, p in inspect.signature(getattr(k_sampling(), function)).parameters.items()}
    accepted = sorted(k for k in params if k not in K_LOOP_ARGS)
    for key in options:
        if key not in accepted:
            raise DiffexpError(
                f"Scheduler '{name}' (k-diffusion {function}) has no option '{key}'. Options it accepts: "
                f"{', '.join(accepted) or 'none'}."
            )
    if function in CHURN and float(options.get("s_churn", 0.0)) > 0:
        raise DiffexpError(
            f"{name}.s_churn={options['s_churn']}: k-diffusion's {function} draws churn noise from torch's global "
            "generator, so a sample would depend on its batch (the seed contract). Use diffusers' euler with "
            "s_churn, or k-euler-ancestral."
        )
    return dict(options)
