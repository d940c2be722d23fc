"""Noise levels of a discrete DDPM schedule, also between its integer timesteps."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's discrete variance-preserving schedule, read as noise levels: x_t = alpha_t x0 + s_t eps with
    sigma_t = s_t / alpha_t, so alpha_t = 1 / sqrt(1 + sigma_t^2) (Karras et al. 2022, table 1)."""

    alphas_cumprod: torch.Tensor  # float32, on the host, as the model's scheduler holds it

    @functools.cached_property
    def log_sigma(self) -> torch.Tensor:
        return log_sigmas(self.alphas_cumprod)

    @functools.cached_property
    def _log_sigma32(self) -> torch.Tensor:
        """diffusers' own table (``EulerDiscreteScheduler``: float32 sigmas, then their log)."""
        abar = self.alphas_cumprod.float().cpu()
        return ((1 - abar) / abar).sqrt().log().double()

    def sigma_at(self, timestep: torch.Tensor | float) -> torch.Tensor:
        return sigma_at(self.log_sigma, timestep)

    def alpha_sigma(self, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and s_t at a (possibly fractional) timestep, float32 host scalars."""
        sigma = self.sigma_at(timestep)
        alpha = (1 + sigma**2).rsqrt()
        return alpha.float(), (sigma * alpha).float()

    def timestep_at(self, sigma: float) -> torch.Tensor:
        """The (fractional) timestep of noise level ``sigma``: log sigma interpolated linearly between the integer
        timesteps, as diffusers' ``_sigma_to_t`` and k-diffusion's ``DiscreteSchedule.sigma_to_t`` place it."""
        table = self._log_sigma32
        log_sigma = torch.tensor(max(sigma, 1e-10), dtype=torch.float32).log().double()
        low = int((log_sigma >= table).sum().clamp(1, len(table) - 1)) - 1
        w = ((table[low] - log_sigma) / (table[low] - table[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).float()
