"""Stable Diffusion 3 and 3.5 (Esser et al. 2024): an MMDiT transformer (``SD3Transformer2DModel``) on 16-channel
latents, sampled on the flow path, conditioned on text embeddings (two CLIP encoders and T5, as
``encoder_hidden_states``) and on the CLIP encoders' pooled projections (``pooled_projections``).
``StableDiffusion3Pipeline``'s own ``encode_prompt`` makes both. Without T5 (``model.t5=false``: the pipeline's
``text_encoder_3=None``) its part of the embeddings is zeros, as the pipeline makes it.

The classes here are also the base of Flux (``diffexp.sampling.flux``): a latent transformer whose prompts become
several keyword arguments of the network, one row per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.adapters import Adapter, DiTAdapter, build_adapter
from diffexp.sampling.latent import LatentModel

if TYPE_CHECKING:
    from diffexp.config import ModelConfig
    from diffexp.settings import RunSettings

PIPELINE_SEQUENCE_LIMIT = 512  # the SD3 and Flux pipelines refuse a longer max_sequence_length (check_inputs)


@dataclass(frozen=True, eq=False)
class PromptParts:
    """Sample k's prompt and negative prompt (``[k mod len]``; none given: the empty prompt), encoded with the
    pipeline's own ``encode_prompt`` into the network's keyword arguments, each distinct prompt once per run."""

    encode: Callable[[list[str]], dict[str, torch.Tensor]]
    prompts: tuple[str, ...] | None
    negatives: tuple[str, ...] | None
    known: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, compare=False)

    def of(self, samples: range, negative: bool = False) -> tuple[str, ...]:
        values = (self.negatives if negative else self.prompts) or ("",)
        return tuple(values[k % len(values)] for k in samples)

    def condition(self, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        if new:
            with torch.inference_mode():
                parts = self.encode(new)
            for i, prompt in enumerate(new):
                self.known[prompt] = {key: value[i] for key, value in parts.items()}
        keys = self.known[prompts[0]] if prompts else {}
        return {key: torch.stack([self.known[p][key] for p in prompts]) for key in keys}


@dataclass(frozen=True, eq=False)
class SD3Adapter(Adapter):
    """SD3Transformer2DModel as StableDiffusion3Pipeline drives it: one timestep per sample; text embeddings and
    pooled projections as the condition; the negative prompt's are guidance's unconditional half, first."""

    expand_t: ClassVar[bool] = True
    source: PromptParts | None = None

    def bound(self, samples: range) -> dict[str, Any]:
        assert self.source is not None
        return {
            "cond": self.source.condition(self.source.of(samples)),
            "uncond": self.source.condition(self.source.of(samples, negative=True)),
        }

    @classmethod
    def default_layers(cls, kind: str, module: torch.nn.Module) -> tuple[str, ...] | None:
        """The middle transformer blocks, as for DiT (SD3.5's skip-layer guidance skips 7-9 of 24)."""
        return DiTAdapter.default_layers(kind, module)

    @property
    def prompts(self) -> tuple[str, ...]:
        assert self.source is not None
        return self.source.of(self.samples)


@dataclass
class TransformerLatent(LatentModel):
    """A latent text-to-image transformer (SD3, Flux): its pipeline's parts, and how prompts reach the network."""

    family: ClassVar[type[SD3Adapter]] = SD3Adapter
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

    def adapter_fields(self, run: RunSettings) -> dict[str, Any]:
        """The family's own adapter fields beyond the prompts (Flux: the guidance embedding)."""
        return {}

    def adapter(self, run: RunSettings, samples: range, device: torch.device, common: dict[str, Any]) -> Adapter:
        """The adapter of this family bound to ``samples``: prompts encoded at the run's max_sequence_length."""
        length = run.max_sequence_length
        source = PromptParts(lambda p: self.encode_parts(p, device, length), run.prompts, run.negative_prompts)
        return build_adapter(self.family, samples, source=source, **common, **self.adapter_fields(run))


@dataclass
class SD3Latent(TransformerLatent):
    """StableDiffusion3Pipeline's parts; T5 may be left out."""

    @classmethod
    def components(cls, index: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
        entry = index.get("text_encoder_3") or [None]
        return {} if cfg.t5 and entry[0] is not None else {"text_encoder_3": None, "tokenizer_3": None}


def check_text_options(run: RunSettings, name: str, latent: LatentModel | None) -> None:
    """guidance_embed and max_sequence_length, refused where the model has no such input or limit is passed."""
    transformer = latent if isinstance(latent, TransformerLatent) else None
    if run.guidance_embed is not None and not (transformer and transformer.guidance_embeds):
        raise DiffexpError(
            f"guidance_embed={run.guidance_embed:g} is not allowed: {name} has no guidance embedding. Only "
            "guidance-distilled models take one (Flux.1-dev: its transformer's guidance_embeds); Flux.1-schnell, SD3 "
            "and Stable Diffusion do not. guidance_scale is classifier-free guidance with a negative prompt."
        )
    length = run.max_sequence_length
    if length is None:
        return
    if transformer is None:
        raise DiffexpError(
            f"max_sequence_length={length} is not allowed: it is the prompt length of a T5 text encoder (SD3, Flux), "
            f"and {name} has none."
        )
    limit = transformer.sequence_limit()
    if length > limit:
        raise DiffexpError(
            f"max_sequence_length={length} is above the limit of {name}'s T5 encoder: {limit} tokens (its "
            f"tokenizer's model_max_length; the pipelines refuse more than {PIPELINE_SEQUENCE_LIMIT})."
        )
