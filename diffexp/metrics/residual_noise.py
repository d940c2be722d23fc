"""Residual noise: high-frequency energy of the final samples, against the real images' own.

A sampler that stops before the noise is gone (or a model that is poorly trained at low noise, where an ODE
solver's last steps rely on it) leaves grain that a classifier still reads through. The measure: each image, grey
(channels averaged), resized to 32x32 and clamped to [-1, 1], is filtered with the 3x3 Laplacian
(``kornia.filters.laplacian``, a second-difference high-pass); its energy is the mean square of the response.
Smooth strokes respond only at their edges, white noise of standard deviation s everywhere (``E = 72 s^2 / 16^2``
for kornia's normalised 3x3 kernel), so the energy of a noisy image exceeds that of the real images. The limit is the
99th percentile of the real images' energies: a sample above it is noisier than 99% of the real set.

- ``residual_noise``: the median over samples of energy / limit (the real digits themselves: 0.70).
- ``noisy_share``: the share of samples above the limit (the real set itself: 0.01).

The real set: the scikit-learn digits for the digits models (``digits-*``); for other models ``metrics.fid.real``,
a folder of images or an .npz whose ``residual_noise_p99`` ``scripts/fid_stats.py`` writes. Without one the metric
writes ``residual_noise_left_out`` with the reason.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.metrics.real_stats import is_stats, real_images
from diffexp.sampling.loop import StepState

log = logging.getLogger(__name__)

SIZE = 32  # every image is measured at 32x32: limits compare across models and resolutions
QUANTILE = 0.99  # the limit: this quantile of the real images' energies
STATS_KEY = "residual_noise_p99"  # the limit in an .npz of real statistics (scripts/fid_stats.py)


def energy(x: torch.Tensor) -> torch.Tensor:
    """Per image: the mean squared 3x3 Laplacian of x (N, C, H, W in [-1, 1]), grey and at 32x32."""
    import kornia

    x = x.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    response = kornia.filters.laplacian(x.clamp(-1, 1), kernel_size=3, border_type="reflect")
    return response.square().mean(dim=(1, 2, 3))


def limit_of(real: torch.Tensor) -> float:
    """The noise limit of a real set: the 99th percentile of its images' energies."""
    return torch.quantile(energy(real).double(), QUANTILE).item()


@functools.cache
def digits_limit() -> float:
    from diffexp.sampling.ideal import digits_images

    return limit_of(digits_images(SIZE))


def real_limit(source: str, channels: int) -> float:
    """The limit of ``metrics.fid.real``: from a folder's images or an .npz that records it."""
    if is_stats(source):
        with np.load(Path(source).expanduser()) as stats:
            if STATS_KEY not in stats:
                raise KeyError(f"{source} has no {STATS_KEY} (written by scripts/fid_stats.py)")
            return float(stats[STATS_KEY])
    return limit_of(real_images(source, (channels, SIZE, SIZE)))


def noise_limit(ctx: Context) -> tuple[float | None, str]:
    """The run's limit and the real set it comes from, or None and why there is none."""
    run = ctx.run
    if run.model.name.startswith("digits"):
        return digits_limit(), "digits"
    source = ctx.settings.fid.real
    if source == "digits":
        return None, f"model {run.model.name} is not a digits model and metrics.fid.real names no real set of its own"
    try:
        return real_limit(source, run.pixel_shape[0]), source
    except (OSError, KeyError, ValueError) as err:
        return None, f"metrics.fid.real={source}: {err}"


class ResidualNoise(Metric):
    """``metrics.residual_noise``: the high-frequency energy of the final samples against the real set's."""

    name = "noise"
    keys = (
        Key("residual_noise", "lower"),
        Key("noisy_share", "lower"),
        Key("residual_noise_real"),
        Key("residual_noise_left_out"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return ctx.settings.residual_noise

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.limit, self.source = noise_limit(ctx)
        if self.limit is None:
            log.warning("residual_noise left out: %s", self.source)

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        if self.limit is None:
            return {}
        return {"ratio": energy(final.x_pixels.cpu()) / self.limit}

    def final(self, values: Values) -> dict[str, Any]:
        if self.limit is None:
            return {"residual_noise_left_out": self.source}
        ratio = values["ratio"].double()
        return {
            "residual_noise": ratio.quantile(0.5).item(),
            "noisy_share": (ratio > 1).double().mean().item(),
            "residual_noise_real": self.source,
        }
