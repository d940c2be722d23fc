"""Flux.1 (Black Forest Labs 2024): an MMDiT transformer (``FluxTransformer2DModel``) on 16-channel latents packed
into 2x2 patches (64 channels a token), sampled on the flow path with a shift that grows with the image's token
count (dynamic shifting), as ``FluxPipeline`` does.

The loop holds a sample unpacked, (16, h, w), like any latent model; the adapter packs it for the network and
unpacks the output with the pipeline's own static ``_pack_latents`` / ``_unpack_latents``, and gives the network
the pipeline's ``_prepare_latent_image_ids`` and zero text ids. The network's timestep is sigma (t / 1000).

Two guidance knobs, as in the pipeline:
- ``guidance_embed``: the distilled guidance scale that Flux.1-dev takes as an input (``guidance_scale`` of
  FluxPipeline; default 3.5, its default); Flux.1-schnell has no guidance embedding;
- ``guidance_scale``: true classifier-free guidance with the negative prompt (FluxPipeline's ``true_cfg_scale``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline

from diffexp.errors import DiffexpError
from diffexp.sampling.network import Condition, Network
from diffexp.sampling.sd3 import SD3Adapter, TransformerLatent

if TYPE_CHECKING:
    from diffexp.settings import RunSettings

PIPELINE_GUIDANCE_EMBED = 3.5  # FluxPipeline's default guidance_scale (the embedded one)


@dataclass(frozen=True, eq=False)
class FluxAdapter(SD3Adapter):
    """FluxTransformer2DModel as FluxPipeline drives it: packed latents, image and text ids, sigma as the
    timestep, and the guidance embedding (one per sample) where the transformer has one."""

    guidance_embed: float | None = None  # None: the transformer has no guidance embedding

    def bound(self, samples: range) -> dict[str, Any]:
        fields = super().bound(samples)
        if self.guidance_embed is not None:  # the same for both halves of guidance, as in the pipeline
            device = fields["cond"]["encoder_hidden_states"].device
            embed = torch.full((len(samples),), self.guidance_embed, dtype=torch.float32, device=device)
            fields = {key: {**value, "guidance": embed} for key, value in fields.items()}
        return fields

    def evaluate(
        self, x: torch.Tensor, t: torch.Tensor, condition: Condition, passes: int = 1, network: Network | None = None
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, n, c, h, w)
        ids = {
            "txt_ids": x.new_zeros(condition["encoder_hidden_states"].shape[1], 3),
            "img_ids": FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype),
        }
        sigma = torch.as_tensor(t).to(x.device, non_blocking=True).reshape(-1).expand(n) / 1000
        out = super().evaluate(packed, sigma, {**condition, **ids}, passes, network)
        return FluxPipeline._unpack_latents(out, h, w, 1)  # scale 1: h and w are the latent's own


@dataclass
class FluxLatent(TransformerLatent):
    """FluxPipeline's parts: CLIP (pooled) and T5 (embeddings), the packed transformer, the VAE."""

    family: ClassVar[type[SD3Adapter]] = FluxAdapter
    t5_tokenizer: ClassVar[str] = "tokenizer_2"

    @property
    def channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # 2x2 patches of the VAE's channels a token

    @property
    def default_hw(self) -> tuple[int, int]:
        size = int(self.pipeline.default_sample_size) * self.scale  # FluxPipeline's 1024 px
        return size, size

    def set_size(self, height: int | None, width: int | None) -> None:
        h, w = height or self.default_hw[0], width or self.default_hw[1]
        if h % (2 * self.scale) or w % (2 * self.scale):
            raise DiffexpError(
                f"height={h} / width={w} is not allowed: Flux packs its latents in 2x2 patches and the VAE downsamples "
                f"by {self.scale}, so both must be multiples of {2 * self.scale}."
            )
        super().set_size(height, width)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def encode_parts(
        self, prompts: list[str], device: torch.device, max_sequence_length: int | None
    ) -> dict[str, torch.Tensor]:
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=device, **length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def adapter_fields(self, run: RunSettings) -> dict[str, Any]:
        if not self.guidance_embeds:
            return {}
        return {"guidance_embed": PIPELINE_GUIDANCE_EMBED if run.guidance_embed is None else run.guidance_embed}

    def timesteps_kwargs(self, scheduler: Any, steps: int) -> dict[str, Any]:
        """FluxPipeline's noise levels before the shift, linspace(1, 1/steps, steps), for a scheduler that takes
        them (not in flow-sigma mode, where the pipeline passes none)."""
        takes = "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
        if scheduler.config.get("use_flow_sigmas") or not takes:
            return {}
        return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist()}
