"""What a model predicts, and the clean image each prediction implies (variance preserving, or the linear flow
path of a flow-matching model)."""

from __future__ import annotations

from typing import Any

import torch

from diffexp.errors import DiffexpError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def x0_from_output(
    output: torch.Tensor, x: torch.Tensor, alpha_t: Any, sigma_t: Any, prediction_type: str
) -> torch.Tensor:
    """The clean image a model output implies, for x = alpha_t x0 + sigma_t eps (variance preserving)."""
    if prediction_type == "epsilon":
        return (x - sigma_t * output) / alpha_t
    if prediction_type == "v_prediction":  # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)
        return alpha_t * x - sigma_t * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow_prediction":  # x = (1 - sigma) x0 + sigma eps, v = eps - x0: alpha_t = 1 - sigma_t
        return x - sigma_t * output
    raise DiffexpError(f"Unknown prediction_type '{prediction_type}'; diffexp knows {', '.join(PREDICTION_TYPES)}.")
