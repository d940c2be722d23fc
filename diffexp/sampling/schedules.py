"""Noise schedules: where a sampler's steps sit, as decreasing noise levels sigma_0 > ... > sigma_{N-1} > 0 = sigma_N.

Each schedule is a small pure function of the step count and either the model's sigma range (``sigma_min``,
``sigma_max``) or its discrete table (``table``: the model's sigma at each training timestep, ascending, as
ComfyUI's ``model_sampling.sigmas``). Sources are named on each; the values are pinned in tests/test_schedules.py
(against k-diffusion's own functions where it is installed, and against published values). This module needs no
k-diffusion. Every function returns float64 noise levels ending in 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Align Your Steps (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"):
# the published 10-step noise levels, as diffusers.schedulers.AysSchedules holds them (its *Sigmas lists).
AYS_TABLES = {
    "sd15": "StableDiffusionSigmas",
    "sdxl": "StableDiffusionXLSigmas",
    "svd": "StableDiffusionVideoSigmas",
}


def _zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.double(), values.new_zeros(1, dtype=torch.float64)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    (k-diffusion's ``get_sigmas_karras``)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """log sigma evenly spaced from log sigma_max to log sigma_min (k-diffusion's ``get_sigmas_exponential``)."""
    return _zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma = log sigma_min + r^rho (log sigma_max - log sigma_min), r from 1 to 0 (k-diffusion's
    ``get_sigmas_polyexponential``); rho = 1 is ``exponential``."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """sigma_i = tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min)) (Sabour et al. 2024, eq. 21;
    ComfyUI's ``kl_optimal_scheduler``)."""
    ramp = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return _zero((ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan())


def _nearest_index(table: torch.Tensor, sigma: float) -> int:
    """The training timestep whose sigma is nearest in log (ComfyUI's ``ModelSamplingDiscrete.timestep``)."""
    return int((table.log() - math.log(sigma)).abs().argmin())


def _sigma_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log sigma interpolated linearly at fractional timesteps (ComfyUI's ``ModelSamplingDiscrete.sigma``)."""
    t = t.clamp(0, len(table) - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * table[low].log() + w * table[high].log()).exp()


def normal(n: int, table: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly spaced from the timestep of sigma_max to that of sigma_min, inclusive (ComfyUI's
    ``normal_scheduler``)."""
    start, end = _nearest_index(table, float(table[-1])), _nearest_index(table, float(table[0]))
    return _zero(_sigma_at(table, torch.linspace(start, end, n, dtype=torch.float64)))


def sgm_uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    """n + 1 timesteps evenly spaced from sigma_max's to sigma_min's, the last dropped (ComfyUI's
    ``normal_scheduler`` with ``sgm=True``, the spacing of Stability's sgm code)."""
    start, end = _nearest_index(table, float(table[-1])), _nearest_index(table, float(table[0]))
    return _zero(_sigma_at(table, torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]))


def simple(n: int, table: torch.Tensor) -> torch.Tensor:
    """Every (T/n)-th training sigma from the top: sigma_i = table[T - 1 - floor(i T / n)] (ComfyUI's
    ``simple_scheduler``)."""
    total = len(table)
    return _zero(torch.stack([table[-(1 + int(i * total / n))] for i in range(n)]))


def ddim_uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    """Training sigmas at timesteps 1, 1 + c, 1 + 2c, ... with c = T // n, reversed, then 0 (ComfyUI's
    ``ddim_scheduler``; its leading-spacing DDIM grid shifted by one)."""
    stride = max(len(table) // n, 1)
    return _zero(table[1::stride].flip(0))


def beta(n: int, table: torch.Tensor, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """ComfyUI's ``beta_scheduler`` (Lee et al. 2024, "Beta Sampling is All You Need", arXiv 2407.12173): timestep
    indices rint(ppf_Beta(alpha, beta)(1 - i/n) (T - 1)) for i < n, a repeat of the previous index dropped, read from
    the model's discrete table. It places the beta quantiles on the timestep index, unlike diffusers'
    ``use_beta_sigmas``, which places them on the sigma range."""
    import scipy.stats

    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta_) * (len(table) - 1))
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return _zero(table[kept])


def linear_quadratic(
    n: int, sigma_max: float, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """Mochi's schedule (genmoai/models, ``infer.py``; ComfyUI's ``linear_quadratic_schedule``): 1 - s, with s rising
    linearly to ``threshold_noise`` over the first ``linear_steps`` (default n // 2), then quadratically to 1; scaled
    by sigma_max. Made for flow models (sigma in [0, 1]); on a VP model it spans [0, sigma_max] linearly."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    lin = n // 2 if linear_steps is None else linear_steps
    diff = lin - threshold_noise * n
    quad = n - lin
    a = diff / (lin * quad**2)
    b = threshold_noise / lin - 2 * diff / quad**2
    c = a * lin**2
    rise = [i * threshold_noise / lin for i in range(lin)] + [a * i**2 + b * i + c for i in range(lin, n)] + [1.0]
    return torch.tensor([1.0 - s for s in rise], dtype=torch.float64) * sigma_max


def loglinear_interp(values: Sequence[float], count: int) -> torch.Tensor:
    """``count`` values whose log is interpolated linearly over the normalised index of ``values`` (decreasing):
    the AYS paper's ``loglinear_interp`` for other step counts."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    new = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(ys)), ys)
    return torch.from_numpy(np.exp(new)[::-1].copy())


def ays(n: int, table: str) -> torch.Tensor:
    """Align Your Steps: the published 10 noise levels of ``table`` (sd15, sdxl, svd; diffusers' lists end in the
    final 0), log-linearly interpolated to n levels where n differs from 10, then 0. (ComfyUI instead interpolates
    the paper's 11-value lists, whose last is sigma_min, to n + 1 and sets the last to 0.)"""
    from diffusers.schedulers import AysSchedules

    published = [float(v) for v in AysSchedules[AYS_TABLES[table]] if v > 0]
    values = torch.tensor(published, dtype=torch.float64) if n == len(published) else loglinear_interp(published, n)
    return _zero(values)


def model_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The model's sigma at each training timestep, ascending: sqrt((1 - abar) / abar) (Karras et al. 2022, table 1)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()
