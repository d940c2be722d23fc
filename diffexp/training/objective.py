"""The training objective (Ho et al. 2020, eq. 14) for each prediction type, min-SNR weights and label dropout.

    L = E_{x0, t, eps} w_t |target - f_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2,  t ~ U{0..T-1},

where the target follows ``prediction_type``: the noise eps (``epsilon``), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
(``v_prediction``, Salimans & Ho 2022) or x0 (``sample``). Class-conditional training replaces each label by the
null class with probability ``label_dropout``, which trains the unconditional model that classifier-free guidance
(Ho & Salimans 2022) needs.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffexp.errors import DiffexpError
from diffexp.sampling.parameterisation import PREDICTION_TYPES


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
    """What the UNet should output: the noise, v or x0."""
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
