"""SDXL (``StableDiffusionXLPipeline``; Podell et al. 2023): a UNet2DConditionModel conditioned on the two text
encoders' concatenated embeddings (``encoder_hidden_states``) and, through ``added_cond_kwargs``, on the second
encoder's pooled embedding (``text_embeds``) and the size conditioning (``time_ids``: original size, crop corner,
target size).

Prompts are encoded with the pipeline's own ``encode_prompt`` and the time ids built with its own
``_get_add_time_ids``, so both are the pipeline's. As in the pipeline, a run without a negative prompt gets zero
embeddings for guidance's unconditional half where the model's config says ``force_zeros_for_empty_prompt``, and
both halves share the time ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffexp.sampling.adapters import TextAdapter, build_adapter
from diffexp.sampling.latent import LatentModel
from diffexp.sampling.network import Condition, Network
from diffexp.settings import RunSettings

PIPELINE = "StableDiffusionXLPipeline"
ADDED = ("text_embeds", "time_ids")  # the condition's keys that the UNet takes in added_cond_kwargs

Embeddings = tuple[torch.Tensor, torch.Tensor]  # (embeddings, pooled embedding), one row per prompt


def is_sdxl(latent: LatentModel | None) -> bool:
    return latent is not None and type(latent.pipeline).__name__ == PIPELINE


@dataclass(frozen=True, eq=False)
class SDXLPrompts:
    """Sample k's prompt and negative prompt (``[k mod len]``; none given: the empty prompt), each distinct prompt
    encoded once per run; ``zero_negative``: no negative prompt, and zeros for it (``force_zeros_for_empty_prompt``)."""

    encode: Callable[[list[str]], Embeddings]
    prompts: tuple[str, ...] | None
    negatives: tuple[str, ...] | None
    zero_negative: bool
    known: dict[str, Embeddings] = field(default_factory=dict, compare=False)

    def of(self, samples: range, negative: bool = False) -> tuple[str, ...]:
        values = (self.negatives if negative else self.prompts) or ("",)
        return tuple(values[k % len(values)] for k in samples)

    def embeddings(self, prompts: tuple[str, ...]) -> Embeddings:
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        if new:
            with torch.inference_mode():
                embeds, pooled = self.encode(new)
            self.known.update({p: (embeds[i], pooled[i]) for i, p in enumerate(new)})
        return torch.stack([self.known[p][0] for p in prompts]), torch.stack([self.known[p][1] for p in prompts])

    def negative(self, samples: range) -> Embeddings:
        embeds, pooled = self.embeddings(self.of(samples, negative=True))
        return (torch.zeros_like(embeds), torch.zeros_like(pooled)) if self.zero_negative else (embeds, pooled)


@dataclass(frozen=True, eq=False)
class SDXLAdapter(TextAdapter):
    """SDXL's UNet: the prompts' embeddings, pooled embeddings and time ids bound; negative prompts first in
    guidance's doubled batch, as in StableDiffusionXLPipeline."""

    sdxl_prompts: SDXLPrompts | None = None
    time_ids: torch.Tensor | None = None  # (1, 6): original size, crop corner, target size

    def bound(self, samples: range) -> dict[str, Any]:
        assert self.sdxl_prompts is not None and self.time_ids is not None
        ids = self.time_ids.repeat(len(samples), 1)
        embeds, pooled = self.sdxl_prompts.embeddings(self.sdxl_prompts.of(samples))
        negative, negative_pooled = self.sdxl_prompts.negative(samples)
        return {
            "cond": {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": ids},
            "uncond": {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": ids},
        }

    @property
    def prompts(self) -> tuple[str, ...]:
        assert self.sdxl_prompts is not None
        return self.sdxl_prompts.of(self.samples)

    def evaluate(
        self, x: torch.Tensor, t: torch.Tensor, condition: Condition, passes: int = 1, network: Network | None = None
    ) -> torch.Tensor:
        """The UNet's call: pooled embeddings and time ids in ``added_cond_kwargs`` (guidance stacks flat keys)."""
        nested: Any = {k: v for k, v in condition.items() if k not in ADDED}
        nested["added_cond_kwargs"] = {k: condition[k] for k in ADDED}
        return super().evaluate(x, t, nested, passes, network)


def encoder(latent: LatentModel, device: torch.device) -> Callable[[list[str]], Embeddings]:
    """The pipeline's ``encode_prompt`` on a list of prompts: (embeddings, pooled embeddings)."""

    def encode(prompts: list[str]) -> Embeddings:
        embeds, _, pooled, _ = latent.pipeline.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    return encode


def add_time_ids(run: RunSettings, latent: LatentModel, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pipeline's time ids: original size and target size default to the image's, the crop corner to (0, 0)."""
    pipe = latent.pipeline
    size = (latent.size[0] * latent.scale, latent.size[1] * latent.scale)
    projection = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids(
        run.original_size or size,
        run.crops_coords_top_left or (0, 0),
        run.target_size or size,
        dtype=dtype,
        text_encoder_projection_dim=projection,
    )
    return ids.to(device)


def sdxl_adapter(
    run: RunSettings, latent: LatentModel, samples: range, device: torch.device, **common: Any
) -> SDXLAdapter:
    """The SDXL adapter of a run, bound to ``samples`` (``common``: the network, schedule and guidance)."""
    zero = run.negative_prompts is None and bool(latent.pipeline.config.force_zeros_for_empty_prompt)
    prompts = SDXLPrompts(encoder(latent, device), run.prompts, run.negative_prompts, zero)
    dtype = latent.pipeline.text_encoder_2.dtype
    ids = add_time_ids(run, latent, dtype, device)
    adapter = build_adapter(SDXLAdapter, samples, sdxl_prompts=prompts, time_ids=ids, **common)
    assert isinstance(adapter, SDXLAdapter)
    return adapter
