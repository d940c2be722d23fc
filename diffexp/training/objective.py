"""The training objective (Ho et al. 2020, eq. 14) for each prediction type, min-SNR weights and label dropout.

    L = E_{x0, t, eps} w_t |target - f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2,  t ~ U{0..T-1},

where the target follows ``prediction_type``: the noise eps (``epsilon``), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
(``v_prediction``, Salimans & Ho 2022) or x0 (``sample``). Class-conditional training replaces each label by the
null class with probability ``label_dropout``, which trains the unconditional model that classifier-free guidance
(Ho & Salimans 2022) needs.

The rectified-flow objective (``flow_prediction``; Liu et al. 2023, Esser et al. 2024) follows diffusers'
FlowMatchEuler noise path and its SD3 training scripts: sigma is drawn from the scheduler's training table (uniform,
or logit-normal as SD3), x_sigma = (1 - sigma) x0 + sigma eps, the network sees t = sigma * 1000 and learns
v = eps - x0.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from diffexp.errors import DiffexpError
from diffexp.sampling.flow import FLOW_PREDICTION
from diffexp.sampling.parameterisation import PREDICTION_TYPES
from diffexp.training.config import TIMESTEP_SAMPLING


def _unknown(prediction_type: str) -> DiffexpError:
    return DiffexpError(f"prediction_type={prediction_type}: use one of {', '.join(PREDICTION_TYPES)}.")


def snr_weights(
    noise_scheduler: DDPMScheduler, t: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), SNR_t = abar_t / (1 - abar_t), as diffusers' train_text_to_image
    sets them: the x0-loss weight min(SNR_t, gamma) expressed in the loss actually computed, for epsilon
    min(SNR_t, gamma) / SNR_t, for v min(SNR_t, gamma) / (SNR_t + 1), for sample min(SNR_t, gamma)."""
    snr = compute_snr(noise_scheduler, t)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise _unknown(prediction_type)


def loss_target(
    noise_scheduler: DDPMScheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network should output: the noise, v or x0 (the flow's velocity: ``flow_target``)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x0, eps, t)
    if prediction_type == "sample":
        return x0
    raise _unknown(prediction_type)


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by ``null_class`` with probability ``p`` (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def flow_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    n: int,
    sampling: str,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, sigma) of ``n`` samples, drawn as diffusers' SD3 training scripts draw them: u uniform or
    sigmoid(N(logit_mean, logit_std)), then the entry floor(u N) of the scheduler's training timesteps."""
    if sampling not in TIMESTEP_SAMPLING:
        raise DiffexpError(f"timestep_sampling={sampling}: use one of {', '.join(TIMESTEP_SAMPLING)}.")
    u = compute_density_for_timestep_sampling(sampling, n, logit_mean, logit_std, generator=generator)
    count = len(scheduler.timesteps)
    index = (u * count).long().clamp(0, count - 1)
    return scheduler.timesteps[index], scheduler.sigmas[index]


def flow_noised(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps (FlowMatchEulerDiscreteScheduler.scale_noise), per sample."""
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - sigma) * x0 + sigma * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity of the linear path, d x_sigma / d sigma = eps - x0 (``flow_prediction``)."""
    return eps - x0


def is_flow_objective(prediction_type: str) -> bool:
    return prediction_type == FLOW_PREDICTION
