"""Model adapters: one immutable class per model family, all on one contract.

- ``output(x, t)``: the network's output in its own prediction type (epsilon, v or sample), for diffusers'
  schedulers, which call it at their own timesteps (the loop calls the adapter itself, ``adapter(x, t)``);
- ``denoise(x, sigma)``: the clean image, for samplers written in noise levels (k-diffusion, EDM), with
  x = x0 + sigma eps (variance exploding) and sigma on the model's own schedule;
- ``x0(output, x, t)``: the clean image an output implies at timestep t, for x in the model's own variables;
- ``calls`` (NFE) and ``net_evals`` (network evaluations per sample), counted here, not in the loop.

The condition of a chunk's samples (labels, text embeddings) is bound when an adapter is built;
``with_samples`` returns a new adapter bound to other samples. Guidance is a separate object the adapter calls
(``diffexp.sampling.guidance``). Each parameterisation turns into x0 in one known way (Karras et al. 2022, table 1;
k-diffusion's ``external.py``): eps: x0 = x - sigma eps; v: x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
(Salimans & Ho 2022); sample: x0 is the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffexp.sampling.caches import AppliedCache
from diffexp.sampling.flow import FlowSchedule, is_flow
from diffexp.sampling.guidance import Guidance, no_guidance
from diffexp.sampling.network import Condition, Counter, Network
from diffexp.sampling.noise import NoiseSchedule
from diffexp.sampling.parameterisation import x0_from_output


@dataclass(frozen=True, eq=False)
class Adapter:
    """A network of one family with its samples' condition and guidance bound (the base: an unconditional UNet)."""

    network: Network
    prediction_type: str
    schedule: NoiseSchedule | FlowSchedule  # the model's noise levels, to place a timestep or a sigma
    samples: range
    guidance: Guidance = field(default_factory=no_guidance)
    cond: Condition = field(default_factory=dict)  # the network's keyword arguments for the bound samples
    uncond: Condition | None = None  # those of guidance's unconditional half; None: the family cannot guide
    counter: Counter = field(default_factory=Counter, compare=False)
    cache: AppliedCache | None = None  # a training-free cache on the network (diffexp.sampling.caches)

    uncond_first: ClassVar[bool] = True  # the halves of guidance's doubled batch: [uncond, cond] (the pipelines')
    expand_t: ClassVar[bool] = False  # the timestep as one per sample
    cache_timestep_scale: ClassVar[float] = 1.0  # network timestep -> the scheduler's, which cache hooks compare

    def bound(self, samples: range) -> dict[str, Any]:
        """The fields that depend on the samples (a family's condition), for ``with_samples``."""
        return {}

    @property
    def kept_channels(self) -> int | None:
        """Keep the output's first channels (None: all)."""
        return None

    @property
    def calls(self) -> int:
        return self.counter.calls

    @property
    def net_evals(self) -> int:
        """Network evaluations per sample that ran: a pass a cache skipped does not count."""
        return self.counter.net_evals - (self.cache.count.nominal - self.cache.count.ran if self.cache else 0)

    @property
    def module(self) -> torch.nn.Module:
        return self.network.module

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def with_samples(self, samples: range) -> Adapter:
        """The same network and guidance bound to other samples, counting afresh."""
        return dataclasses.replace(self, samples=samples, counter=Counter(), **self.bound(samples))

    def with_network(self, network: Network) -> Adapter:
        return dataclasses.replace(self, network=network)

    @classmethod
    def default_layers(cls, kind: str, module: torch.nn.Module) -> tuple[str, ...] | None:
        """The layers a perturbation guider acts on where none are named (``kind``: attention for PAG, block for
        SLG): a UNet's mid-block attention (PAG: Ahn et al. 2024 perturb SD's mid block)."""
        return ("mid_block.attentions",) if hasattr(module, "mid_block") else None

    def evaluate(
        self, x: torch.Tensor, t: torch.Tensor, condition: Condition, passes: int = 1, network: Network | None = None
    ) -> torch.Tensor:
        """One network evaluation (of ``network``, default the adapter's) of a batch that holds each sample
        ``passes`` times, float32 out."""
        host_t = t
        t = torch.as_tensor(t).to(x.device, non_blocking=True)  # host timesteps: a copy without waiting
        if self.expand_t:
            t = t.reshape(-1).expand(x.shape[0])
        self.counter.net_evals += passes
        if self.cache is None or network is not None:
            return (network or self.network)(x, t, condition, self.kept_channels)
        self.counter.passes += 1
        timestep = float(torch.as_tensor(host_t).reshape(-1)[0]) * self.cache_timestep_scale
        name = f"pass{self.counter.passes}"
        with self.cache.context(name, self.counter.calls - 1, timestep, passes):
            return self.network(x, t, condition, self.kept_channels)

    def output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output in its prediction type at timestep ``t``, guided as the guidance says."""
        self.counter.calls += 1
        self.counter.passes = 0
        return self.guidance(self, x, t)

    __call__ = output

    def x0(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The clean image ``output`` implies at timestep ``t``, for x in the model's variance-preserving variables."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_from_output(output, x, alpha, sigma, self.prediction_type)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """D(x, sigma): the clean image, for x = x0 + sigma eps at the model's noise level ``sigma``."""
        s = float(sigma)
        if self.prediction_type == "flow_prediction":  # x = (1 - sigma) x0 + sigma eps, sigma in [0, 1]: as it is
            return x - s * self.output(x, self.schedule.timestep_at(s))
        scale = (s * s + 1) ** -0.5  # to the model's variance-preserving input
        out = self.output(x * scale, self.schedule.timestep_at(s))
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x * scale**2 - s * scale * out
        return x0_from_output(out, x, 1.0, s, self.prediction_type)

    def warm_up(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """The network on every batch shape this adapter calls it with (compiles them), uncounted."""
        self.guidance.warm_up(self, x, t)
        self.counter.reset()


@dataclass(frozen=True)
class LabelSource:
    """Sample k's class: ``labels[k mod len]``, or with ``all`` class ``k mod num_classes``; None: the null class.
    A label depends only on k, never on the batch."""

    labels: str | tuple[int, ...] | None
    num_classes: int
    null_class: int | None
    device: torch.device

    def of(self, samples: range) -> tuple[int, ...]:
        if self.labels is None:
            assert self.null_class is not None
            return (self.null_class,) * len(samples)
        if self.labels == "all":
            return tuple(k % self.num_classes for k in samples)
        return tuple(self.labels[k % len(self.labels)] for k in samples)

    def tensor(self, labels: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(labels, device=self.device)


@dataclass(frozen=True, eq=False)
class ClassAdapter(Adapter):
    """A class-conditional UNet2DModel (``class_labels``); the null class is guidance's unconditional half."""

    source: LabelSource | None = None
    labels: tuple[int, ...] = ()

    def bound(self, samples: range) -> dict[str, Any]:
        assert self.source is not None
        labels = self.source.of(samples)
        null = self.source.null_class
        return {
            "labels": labels,
            "cond": {"class_labels": self.source.tensor(labels)},
            "uncond": None if null is None else {"class_labels": self.source.tensor((null,) * len(labels))},
        }


@dataclass(frozen=True, eq=False)
class DiTAdapter(ClassAdapter):
    """DiTTransformer2DModel as DiTPipeline drives it: halves [class, null], one timestep per sample, and the eps
    half of a transformer that learns sigma (its variance channels dropped)."""

    uncond_first: ClassVar[bool] = False
    expand_t: ClassVar[bool] = True
    learned_channels: int | None = None  # the input's channel count where the output doubles it

    @property
    def kept_channels(self) -> int | None:
        return self.learned_channels

    @classmethod
    def default_layers(cls, kind: str, module: torch.nn.Module) -> tuple[str, ...] | None:
        """The middle transformer block (PAG), the three middle ones (SLG; SD3.5 skips 7-9 of 24)."""
        n = len(getattr(module, "transformer_blocks", ()))
        if not n:
            return None
        middle = range(max(n // 2 - 1, 0), min(n // 2 + 2, n)) if kind == "block" else [n // 2]
        return tuple(f"transformer_blocks.{i}" for i in middle)


@dataclass(frozen=True, eq=False)
class PromptSource:
    """Sample k's prompt and negative prompt (``[k mod len]``; none given: the empty prompt), encoded with the
    pipeline's own ``encode_prompt``, each distinct prompt once per run (``known`` keeps them)."""

    encode: Callable[[list[str]], torch.Tensor]
    prompts: tuple[str, ...] | None
    negatives: tuple[str, ...] | None
    known: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)

    def of(self, samples: range, negative: bool = False) -> tuple[str, ...]:
        values = (self.negatives if negative else self.prompts) or ("",)
        return tuple(values[k % len(values)] for k in samples)

    def embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        if new:
            with torch.inference_mode():
                self.known.update(zip(new, self.encode(new), strict=True))
        return torch.stack([self.known[p] for p in prompts])


@dataclass(frozen=True, eq=False)
class TextAdapter(Adapter):
    """A Stable Diffusion UNet2DConditionModel: text embeddings as ``encoder_hidden_states``; the negative prompt's
    are guidance's unconditional half, first, as in StableDiffusionPipeline."""

    source: PromptSource | None = None

    def bound(self, samples: range) -> dict[str, Any]:
        assert self.source is not None
        return {
            "cond": {"encoder_hidden_states": self.source.embeddings(self.source.of(samples))},
            "uncond": {"encoder_hidden_states": self.source.embeddings(self.source.of(samples, negative=True))},
        }

    @classmethod
    def default_layers(cls, kind: str, module: torch.nn.Module) -> tuple[str, ...] | None:
        """SD's mid block (PAG: Ahn et al. 2024); SLG: its transformer blocks, skipped whole."""
        return ("mid_block.attentions",) if kind == "attention" else ("mid_block.attentions.0.transformer_blocks",)

    @property
    def prompts(self) -> tuple[str, ...]:
        assert self.source is not None
        return self.source.of(self.samples)


def build_adapter(cls: type[Adapter], samples: range, **fields: Any) -> Adapter:
    """An adapter of family ``cls``, bound to ``samples``."""
    unbound = cls(samples=samples, **fields)
    return dataclasses.replace(unbound, **unbound.bound(samples))


def pixel_adapter(
    module: torch.nn.Module,
    prediction_type: str = "epsilon",
    scheduler_config: Mapping[str, Any] | None = None,
    labels: Sequence[int] | None = None,
    null_class: int | None = None,
    guidance: Guidance | None = None,
) -> Adapter:
    """The adapter of a UNet2DModel-like network or a pixel-space DiT outside a run (training previews,
    notebooks): unconditional, or with one class per sample; the schedule is its scheduler config's (default:
    DDPM's linear betas; a FlowMatch config: the flow's sigma = t / num_train_timesteps)."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    config = dict(scheduler_config or {})
    flow = is_flow(config)
    common: dict[str, Any] = {
        "network": Network(module),
        "prediction_type": prediction_type,
        "schedule": FlowSchedule(int(config.get("num_train_timesteps", 1000)))
        if flow
        else NoiseSchedule(DDPMScheduler.from_config(config).alphas_cumprod),
        "guidance": guidance or no_guidance(),
    }
    if labels is None:
        return build_adapter(Adapter, range(0), **common)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    source = LabelSource(tuple(labels), max(labels, default=0) + 1, null_class, device)
    family = DiTAdapter if isinstance(module, DiTTransformer2DModel) else ClassAdapter
    return build_adapter(family, range(len(labels)), source=source, **common)
