"""Stable Diffusion 3 and 3.5 (Esser et al. 2024): ``SD3Transformer2DModel`` as ``StableDiffusion3Pipeline``
drives it, on the flow path, conditioned on text embeddings (``encoder_hidden_states``) and pooled projections
(``pooled_projections``) that the pipeline's own ``encode_prompt`` makes (``diffexp.sampling.mmdit``).

``SD3Adapter`` is also the base of Flux's (``diffexp.sampling.flux``): prompts that become several keyword
arguments of the network, one row per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffexp.errors import DiffexpError
from diffexp.sampling.adapters import Adapter, DiTAdapter, build_adapter
from diffexp.sampling.latent import LatentModel
from diffexp.sampling.mmdit import PIPELINE_SEQUENCE_LIMIT, TransformerLatent


@dataclass(frozen=True)
class TextOptions:
    """What a run asks of a text transformer: prompts and negative prompts (None: none given), the T5 prompt length
    and the guidance embedding (None: the pipeline's own)."""

    prompts: tuple[str, ...] | None = None
    negatives: tuple[str, ...] | None = None
    max_sequence_length: int | None = None
    guidance_embed: float | None = None


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

    @classmethod
    def fields(cls, options: TextOptions, latent: TransformerLatent) -> dict[str, Any]:
        """The family's own fields beyond the prompts (Flux: the guidance embedding)."""
        return {}

    @classmethod
    def build(
        cls,
        options: TextOptions,
        latent: TransformerLatent,
        samples: range,
        device: torch.device,
        common: dict[str, Any],
    ) -> Adapter:
        """This family's adapter bound to ``samples``, its prompts encoded at the run's max_sequence_length."""
        length = options.max_sequence_length
        source = PromptParts(lambda p: latent.encode_parts(p, device, length), options.prompts, options.negatives)
        return build_adapter(cls, samples, source=source, **common, **cls.fields(options, latent))


def check_text_options(options: TextOptions, name: str, latent: LatentModel | None) -> None:
    """guidance_embed and max_sequence_length, refused where the model has no such input or the limit is passed."""
    transformer = latent if isinstance(latent, TransformerLatent) else None
    if options.guidance_embed is not None and not (transformer and transformer.guidance_embeds):
        raise DiffexpError(
            f"guidance_embed={options.guidance_embed:g} is not allowed: {name} has no guidance embedding. Only "
            "guidance-distilled models take one (Flux.1-dev: its transformer's guidance_embeds); Flux.1-schnell, SD3 "
            "and Stable Diffusion do not. guidance_scale is classifier-free guidance with a negative prompt."
        )
    length = options.max_sequence_length
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
