"""Linear latent-to-RGB maps (``preview=latent``): each known VAE's latents, in the pipelines' scaled space, to RGB
in [-1, 1] by rgb = latents . factors + bias, with no decoder call.

The factors are the published ones of ComfyUI, ``comfy/latent_formats.py`` (commit 040a3243, classes SD15, SDXL,
SD3 and Flux: ``latent_rgb_factors``, rows the latent channels, and ``latent_rgb_factors_bias``), which its
``Latent2RGBPreviewer`` applies to the same scaled latents. A VAE is known by its latent channels, scaling factor and
shift factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentRGB:
    """One VAE's map: ``factors`` (latent channels x RGB) and a ``bias`` per RGB channel."""

    name: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> RGB (N, 3, H, W), unclamped."""
        factors = torch.tensor(self.factors, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        return torch.einsum("nchw,cr->nrhw", latents.float(), factors) + bias.view(1, 3, 1, 1)


SD = LatentRGB(  # SD 1.x/2.x (and DiT): ComfyUI's SD15
    "SD 1.x/2.x (and DiT)",
    (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
SDXL = LatentRGB(
    "SDXL",
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)
SD3 = LatentRGB(  # SD3 and SD3.5
    "SD3/SD3.5",
    (
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    (0.2394, 0.2135, 0.1925),
)
FLUX = LatentRGB(  # Flux.1 dev and schnell
    "Flux.1",
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)

# (latent channels, scaling_factor, shift_factor) of a VAE's config -> its map
LATENT_RGB: dict[tuple[int, float, float], LatentRGB] = {
    (4, 0.18215, 0.0): SD,
    (4, 0.13025, 0.0): SDXL,
    (16, 1.5305, 0.0609): SD3,
    (16, 0.3611, 0.1159): FLUX,
}


def vae_key(config: Any) -> tuple[int, float, float]:
    """A VAE config's (latent channels, scaling factor, shift factor), rounded as the table holds them."""
    shift = round(float(getattr(config, "shift_factor", None) or 0.0), 5)
    return int(config.latent_channels), round(float(config.scaling_factor), 5), shift


def known_previews() -> str:
    """The VAEs with a map, for messages."""
    return "; ".join(
        f"{m.name}: {c} channels, scaling_factor {s}" + (f", shift_factor {f}" if f else "")
        for (c, s, f), m in LATENT_RGB.items()
    )
