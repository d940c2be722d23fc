"""The latent models of the MMDiT text-to-image pipelines, SD3 (``StableDiffusion3Pipeline``) and Flux
(``FluxPipeline``): their parts around the transformer, how prompts become the network's keyword arguments (the
pipeline's own ``encode_prompt``), their size, their T5 limit and the noise levels the pipeline passes. Their
adapters are ``diffexp.sampling.sd3`` and ``diffexp.sampling.flux``.

SD3 (Esser et al. 2024) conditions on text embeddings (two CLIP encoders and T5) and the CLIPs' pooled projections;
without T5 (``model.t5=false``: the pipeline's ``text_encoder_3=None``) its part of the embeddings is zeros. Flux
conditions on T5's embeddings and CLIP's pooled output, on latents packed 2x2 (64 channels a token); the loop holds
them unpacked, (16, h, w).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.latent import LatentModel

if TYPE_CHECKING:
    from diffexp.config import ModelConfig

PIPELINE_SEQUENCE_LIMIT = 512  # the SD3 and Flux pipelines refuse a longer max_sequence_length (check_inputs)


@dataclass
class TransformerLatent(LatentModel):
    """A latent text-to-image transformer: its pipeline's parts, and how prompts reach the network."""

    t5_tokenizer: ClassVar[str] = "tokenizer_3"  # the pipeline's name of its T5 tokenizer

    @property
    def denoiser(self) -> Any:
        return self.pipeline.transformer

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes a distilled guidance scale as an input (Flux.1-dev)."""
        return False

    @classmethod
    def components(cls, index: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
        """Parts to leave out when loading (``model.t5=false``), from the folder's ``model_index.json``."""
        if not cfg.t5:
            raise DiffexpError(
                f"model.t5=false is not allowed for {cfg.name}: its T5 encoder gives the text embeddings the "
                "transformer attends to. Only SD3 can leave T5 out (text_encoder_3=None)."
            )
        return {}

    def sequence_limit(self) -> int:
        """The longest max_sequence_length: the T5 tokenizer's model_max_length, at most the pipelines' 512."""
        tokenizer = getattr(self.pipeline, self.t5_tokenizer, None)
        length = getattr(tokenizer, "model_max_length", None) or PIPELINE_SEQUENCE_LIMIT
        return min(int(length), PIPELINE_SEQUENCE_LIMIT)

    def encode_parts(
        self, prompts: list[str], device: torch.device, max_sequence_length: int | None
    ) -> dict[str, torch.Tensor]:
        """The network's keyword arguments for ``prompts``, one row each, from the pipeline's ``encode_prompt``."""
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False, **length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@dataclass
class SD3Latent(TransformerLatent):
    """StableDiffusion3Pipeline's parts; T5 may be left out."""

    @classmethod
    def components(cls, index: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
        entry = index.get("text_encoder_3") or [None]
        return {} if cfg.t5 and entry[0] is not None else {"text_encoder_3": None, "tokenizer_3": None}


@dataclass
class FluxLatent(TransformerLatent):
    """FluxPipeline's parts: CLIP (pooled) and T5 (embeddings), the packed transformer, the VAE."""

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

    def timesteps_kwargs(self, scheduler: Any, steps: int) -> dict[str, Any]:
        """FluxPipeline's noise levels before the shift, linspace(1, 1/steps, steps), for a scheduler that takes
        them (not in flow-sigma mode, where the pipeline passes none)."""
        takes = "sigmas" in inspect.signature(scheduler.set_timesteps).parameters
        if scheduler.config.get("use_flow_sigmas") or not takes:
            return {}
        return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist()}


# the pipeline class -> its latent model
TRANSFORMER_LATENTS: dict[str, type[TransformerLatent]] = {
    "StableDiffusion3Pipeline": SD3Latent,
    "FluxPipeline": FluxLatent,
}
