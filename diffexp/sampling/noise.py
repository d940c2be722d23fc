"""Noise levels of a discrete DDPM schedule, also between its integer timesteps."""

from __future__ import annotations

import torch


def log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t with sigma_t = sqrt((1 - abar_t) / abar_t), in float64."""
    abar = alphas_cumprod.double().cpu()
    return ((1 - abar) / abar).sqrt().log()


def sigma_at(log_sigma: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """Sigma at (possibly fractional) timesteps: log-sigma interpolated linearly, the inverse of diffusers'
    ``_sigma_to_t``, which places Karras and KDPM2 timesteps between the integers. A non-finite timestep (some
    schedulers produce NaN ones at few steps) has a NaN sigma; the loop reports the NaN sample it leads to."""
    raw = torch.as_tensor(timestep).detach().cpu().double()
    t = raw.nan_to_num(0.0).clamp(0, len(log_sigma) - 1)
    low = t.floor().long().clamp(max=len(log_sigma) - 2)
    frac = t - low
    sigma = ((1 - frac) * log_sigma[low] + frac * log_sigma[low + 1]).exp()
    return torch.where(raw.isfinite(), sigma, torch.nan)
