"""Flow-matching models: the linear path x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1], and a network that
predicts its velocity v = eps - x0 (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3). So
x0 = x - sigma v, and the network's timestep is sigma times ``num_train_timesteps``.

A flow model's scheduler config is a ``FlowMatch*`` one (``shift``, dynamic shifting). diffusers' DPM-Solver,
DPM-Solver single-step, UniPC, DEIS and SA-Solver sample it in their flow mode (``use_flow_sigmas``,
``flow_shift``, ``prediction_type="flow_prediction"``), which diffexp sets from the model's config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

FLOW_PREDICTION = "flow_prediction"


def is_flow(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a model's scheduler config is a flow-matching one."""
    name = str(scheduler_config.get("_class_name") or "")
    return name.startswith("FlowMatch") or scheduler_config.get("prediction_type") == FLOW_PREDICTION


@dataclass(frozen=True)
class FlowSchedule:
    """A flow model's noise levels: sigma = t / num_train_timesteps, alpha = 1 - sigma (the path's scale of x0)."""

    num_train_timesteps: int = 1000

    def sigma_at(self, timestep: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(timestep, dtype=torch.float64).cpu() / self.num_train_timesteps

    def alpha_sigma(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma_at(timestep).float()
        return 1 - sigma, sigma

    def timestep_at(self, sigma: float) -> torch.Tensor:
        return torch.tensor(sigma * self.num_train_timesteps, dtype=torch.float32)


def flow_mode(cls: type, model_config: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The options that put a VP solver with a flow mode into it, for a flow model: its shift is the model's
    (``flow_shift`` set in the scheduler file wins)."""
    import inspect

    if cls.__name__.startswith("FlowMatch") or "use_flow_sigmas" not in inspect.signature(cls.__init__).parameters:
        return {}
    shift = config.get("flow_shift") or model_config.get("shift") or 1.0
    return {"use_flow_sigmas": True, "prediction_type": FLOW_PREDICTION, "flow_shift": float(shift)}


def image_seq_len(sample_shape: tuple[int, ...]) -> int:
    """The token count the pipelines compute the dynamic shift from: the latent (or pixel) grid in 2x2 patches,
    as Flux packs it."""
    return (sample_shape[-2] // 2) * (sample_shape[-1] // 2)


def dynamic_mu(config: Mapping[str, Any], tokens: int) -> float:
    """mu of dynamic shifting, linear in the token count between the base and max sequence lengths (diffusers'
    ``calculate_shift`` in the Flux and SD3 pipelines)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + base_shift - slope * base_len


def flow_warnings(scheduler: Any) -> list[str]:
    """What a flow scheduler gives the network that differs from the flow it samples: a last sigma that is not 0
    (noise left), a first sigma that is not 1, timesteps rounded to integers."""
    sigmas = [float(s) for s in scheduler.sigmas]
    name = type(scheduler).__name__
    out = []
    if sigmas[-1] != 0:
        out.append(
            f"{name} ends at sigma={sigmas[-1]:.4g}, not 0: its last sample keeps that much noise "
            "(it repeats the last sigma in flow mode)."
        )
    if not math.isclose(sigmas[0], 1.0, abs_tol=1e-6):
        out.append(f"{name} starts at sigma={sigmas[0]:.4g}, not 1: the initial noise is scaled as if slightly clean.")
    if not torch.is_floating_point(scheduler.timesteps):
        out.append(
            f"{name} rounds the network's timestep to an integer (t={int(scheduler.timesteps[0])} for "
            f"sigma={sigmas[0]:.5g}): the network sees a slightly different noise level than the solver uses."
        )
    return out
