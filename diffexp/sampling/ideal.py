"""The exact denoiser of the scikit-learn digits, wrapped as an epsilon-prediction UNet2DModel (or v, x0, or the
velocity of the linear flow path).

For data that is a finite set of images y_i (or a Gaussian mixture around them, std s), the denoiser
D(x; sigma) = E[x0 | x0 + sigma * n = x] is closed-form (the "ideal denoiser" of Karras et al. 2022, EDM):
    w_i = softmax_i(-|x - y_i|^2 / (2 (s^2 + sigma^2)))
    D   = m + s^2 / (s^2 + sigma^2) * (x - m),   m = sum_i w_i y_i
It has no model error at all, so every difference between schedulers is the schedulers' own.

On the flow path x = (1 - sigma) x0 + sigma n (sigma = t / 1000), component i is seen as N((1 - sigma) y_i,
(1 - sigma)^2 s^2 + sigma^2), so with v_f = (1 - sigma)^2 s^2 + sigma^2:
    w_i = softmax_i(-|x - (1 - sigma) y_i|^2 / (2 v_f))
    D   = m + (1 - sigma) s^2 / v_f * (x - (1 - sigma) m),   and the velocity v = eps - x0 = (x - D) / sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffexp.sampling.noise import log_sigmas, sigma_at


def digits_images(sample_size: int = 32) -> torch.Tensor:
    """The 1797 scikit-learn digits (8x8, 17 grey levels) in [-1, 1], bilinearly upsampled: (N, 1, H, W)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    return upsample_digits(images, sample_size).clamp(-1, 1)


def upsample_digits(images: torch.Tensor, sample_size: int) -> torch.Tensor:
    """8x8 images (N, 1, 8, 8) at ``sample_size``, bilinearly, as the digits models see them: a linear map, so the
    digits lie in the 64-dimensional span of the upsampled 8x8 basis images."""
    if sample_size == 8:
        return images
    return F.interpolate(images, size=(sample_size, sample_size), mode="bilinear", align_corners=False)


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target)


# the noise schedule of google/ddpm-*, as their scheduler_config.json sets it
DDPM_SCHEDULER_CONFIG: dict = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "variance_type": "fixed_small",
}


# a flow-matching model's scheduler config (FlowMatchEulerDiscreteScheduler, no shift), as the pipelines save it
FLOW_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}


def _exact(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class DigitsIdealDenoiser(ModelMixin, ConfigMixin):
    """Called like UNet2DModel: ``model(sample, timestep).sample`` is the exact prediction of the noise, of
    v = alpha_t eps - sigma_t x0, or of x0 itself, as ``prediction_type`` says."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        std: float = 0.0,
        prediction_type: str = "epsilon",
        in_channels: int = 1,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        # plain tensors, not buffers: `.to(dtype)` for the precision setting must not round the exact data
        self.images = digits_images(sample_size).flatten(1)
        self._images_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.log_sigmas = log_sigmas(DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG).alphas_cumprod)
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Noise level of (possibly fractional) timesteps."""
        return sigma_at(self.log_sigmas, timestep)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x] for x = x0 + sigma * n (sigma per sample, shape (B,))."""
        b = x.shape[0]
        key = (x.device, x.dtype)
        if key not in self._images_on:
            self._images_on[key] = self.images.to(x.device, x.dtype)
        y = self._images_on[key]
        flat = x.reshape(b, -1)
        var = (self.config.std**2 + sigma**2)[:, None]
        d2 = torch.cdist(flat[None], y[None], compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
        w = torch.softmax(-d2 / (2 * var), dim=1)
        m = w @ y
        shrink = self.config.std**2 / var
        return (m + shrink * (flat - m)).reshape(x.shape)

    def flow_velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact velocity eps - x0 at x = (1 - sigma) x0 + sigma n (sigma per sample, shape (B,))."""
        b = x.shape[0]
        key = (x.device, x.dtype)
        if key not in self._images_on:
            self._images_on[key] = self.images.to(x.device, x.dtype)
        y, flat, keep = self._images_on[key], x.reshape(b, -1), (1 - sigma)[:, None]
        var = keep**2 * self.config.std**2 + sigma[:, None] ** 2
        d2 = torch.cdist(flat[:, None], keep[:, :, None] * y[None], compute_mode="donot_use_mm_for_euclid_dist")
        w = torch.softmax(-(d2[:, 0] ** 2) / (2 * var), dim=1)
        m = w @ y
        x0 = m + keep * self.config.std**2 / var * (flat - keep * m)
        return ((flat - x0) / sigma[:, None]).reshape(x.shape)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True):
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        if self.config.prediction_type == "flow_prediction":
            sigma = (t.double() / 1000).to(sample.device, _exact(sample.device))
            out = self.flow_velocity(sample.to(_exact(sample.device)), sigma).to(sample.dtype)
            return UNet2DOutput(sample=out) if return_dict else (out,)
        sigma = self.sigma(t).to(sample.device, _exact(sample.device), non_blocking=True)  # on the host: no wait
        a = (1 + sigma**2).rsqrt()[:, None, None, None]  # alpha_t of the VP process x_t = a (x0 + sigma n)
        x = sample.to(_exact(sample.device)) / a
        x0 = self.denoise(x, sigma)
        eps = (x - x0) / sigma[:, None, None, None]
        if self.config.prediction_type == "v_prediction":  # VP: alpha_t = a, sigma_t = a sigma
            out = a * eps - a * sigma[:, None, None, None] * x0
        else:
            out = x0 if self.config.prediction_type == "sample" else eps
        out = out.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)
