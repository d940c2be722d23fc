"""Flux.1 (Black Forest Labs 2024): ``FluxTransformer2DModel`` as ``FluxPipeline`` drives it, on 16-channel latents
packed into 2x2 patches, sampled on the flow path with a shift that grows with the image's token count (dynamic
shifting; its noise levels: ``diffexp.sampling.mmdit.FluxLatent``).

The loop holds a sample unpacked, (16, h, w), like any latent model; the adapter packs it for the network and
unpacks the output with the pipeline's own static ``_pack_latents`` / ``_unpack_latents``, and gives the network
the pipeline's ``_prepare_latent_image_ids`` and zero text ids. The network's timestep is sigma (t / 1000).

Two guidance knobs, as in the pipeline:
- ``guidance_embed``: the distilled guidance scale that Flux.1-dev takes as an input (``guidance_scale`` of
  FluxPipeline; default 3.5, its default); Flux.1-schnell has no guidance embedding;
- ``guidance_scale``: true classifier-free guidance with the negative prompt (FluxPipeline's ``true_cfg_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline

from diffexp.sampling.mmdit import TransformerLatent
from diffexp.sampling.network import Condition, Network
from diffexp.sampling.sd3 import SD3Adapter, TextOptions

PIPELINE_GUIDANCE_EMBED = 3.5  # FluxPipeline's default guidance_scale (the embedded one)


@dataclass(frozen=True, eq=False)
class FluxAdapter(SD3Adapter):
    """FluxTransformer2DModel as FluxPipeline drives it: packed latents, image and text ids, sigma as the
    timestep, and the guidance embedding (one per sample) where the transformer has one."""

    guidance_embed: float | None = None  # None: the transformer has no guidance embedding
    cache_timestep_scale: ClassVar[float] = 1000.0  # sigma in, FluxPipeline's current_timestep (t) to the hooks

    @classmethod
    def fields(cls, options: TextOptions, latent: TransformerLatent) -> dict[str, Any]:
        if not latent.guidance_embeds:
            return {}
        return {"guidance_embed": PIPELINE_GUIDANCE_EMBED if options.guidance_embed is None else options.guidance_embed}

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
