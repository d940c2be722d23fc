"""The model adapter: every model reaches the loop as one callable, ``(x, t) -> output in its prediction_type``.

The condition (class labels) and classifier-free guidance are bound when the adapter is built, as the diffusers
pipelines and k-diffusion's model wrappers do. Counting model calls (NFE) and network evaluations belongs here.

Classifier-free guidance (Ho & Salimans 2022) runs the conditional and unconditional halves as one call on a
doubled batch: out = out_uncond + s (out_cond - out_uncond), in the model's own parameterisation; with
``rescale`` > 0 the result is rescaled towards the conditional output's std (Lin et al. 2023, eq. 15-16, diffusers'
``rescale_noise_cfg``). Within ``interval`` only (Kynkäänniemi et al. 2024): outside it, one unguided call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from diffexp.errors import DiffexpError
from diffexp.sampling.noise import sigma_at

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings; ``scale`` 1 is no guidance."""

    scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None  # noise levels sigma where guidance applies

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def applies_at(self, sigma: float) -> bool:
        if not self.enabled:
            return False
        return self.interval is None or self.interval[0] <= sigma <= self.interval[1]


def check_guidance(scale: float, rescale: float, interval: Sequence[float] | None) -> Guidance:
    """The guidance settings, or a clear refusal."""
    if scale < 0:
        raise DiffexpError(f"guidance_scale={scale} is not allowed: it must be >= 0 (1 is no guidance).")
    if not 0 <= rescale <= 1:
        raise DiffexpError(f"guidance_rescale={rescale} is not allowed: it must be in [0, 1] (0 is no rescaling).")
    if interval is None:
        return Guidance(float(scale), float(rescale))
    values = list(interval)
    if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not 0 <= values[0] < values[1]:
        raise DiffexpError(
            f"guidance_interval={values} is not allowed: it must be two increasing noise levels "
            "[sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (sigma = sqrt((1 - abar) / abar))."
        )
    return Guidance(float(scale), float(rescale), (float(values[0]), float(values[1])))


def sample_labels(labels: Any, num_classes: int, first: int, count: int) -> list[int]:
    """The labels of samples ``first .. first + count - 1``: sample k gets ``labels[k mod len]``, or with ``all``
    class ``k mod num_classes``; a label depends only on k, never on the batch."""
    if labels == "all":
        return [k % num_classes for k in range(first, first + count)]
    values = [labels] if isinstance(labels, int) else list(labels)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DiffexpError(f"labels={labels} is not allowed: use null, all, or a list of class ids.")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise DiffexpError(f"labels {bad} are outside [0, {num_classes}): this model has {num_classes} classes.")
    return [values[k % len(values)] for k in range(first, first + count)]


class Denoiser(torch.nn.Module):
    """A network, ``model(x, t, **condition)``, with its condition and guidance bound.

    The condition is keyword arguments per sample: ``class_labels`` (a class-conditional UNet or DiT) or
    ``encoder_hidden_states`` (text embeddings of a UNet2DConditionModel); ``uncond`` holds those of guidance's
    unconditional half (the null class, the negative prompt's embeddings). ``uncond_first``: the order of the
    halves in the doubled batch, the pipeline's (SD: [negative, positive]; DiT: [class, null]). ``channels``: keep
    the first channels of the output (a DiT that learns sigma: the eps half; its variance is dropped, as in
    DiTPipeline). ``expand_t``: the timestep as one per sample (DiT's timestep embedding needs it).

    Casts the input to the model's precision and returns float32, so the loop stays in float32. ``calls``
    counts model calls (NFE); ``net_evals`` counts network evaluations per sample: 2 for a guided call.
    ``net`` is what evaluates the network: the model itself, or its torch.compile'd form (diffexp.sampling.speed).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prediction_type: str = "epsilon",
        labels: torch.Tensor | None = None,
        null_label: int | None = None,
        guidance: Guidance = Guidance(),
        log_sigma: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
        uncond: dict[str, torch.Tensor] | None = None,
        uncond_first: bool = True,
        channels: int | None = None,
        expand_t: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type
        self.labels = labels
        self.null_label = null_label
        self.guidance = guidance
        self.log_sigma = log_sigma  # the model's schedule, to place a timestep in the guidance interval
        self.cond = dict(cond or ({} if labels is None else {"class_labels": labels}))
        self.uncond = uncond
        if uncond is None and labels is not None and null_label is not None:
            self.uncond = {"class_labels": torch.full_like(labels, null_label)}
        self.uncond_first, self.channels, self.expand_t = uncond_first, channels, expand_t
        self.calls = 0
        self.net_evals = 0
        self.dtype = getattr(model, "dtype", None) or next((p.dtype for p in model.parameters()), torch.float32)
        self.use_network(model)
        self.channels_last = False  # inputs in channels-last memory format, like the weights
        self.cudagraphs = False  # outputs live in a CUDA graph's memory until copied

    def use_network(self, net: Any) -> None:
        """What evaluates the network from now on (its compiled form); a plain attribute, not a submodule."""
        object.__setattr__(self, "net", net)

    def reset(self) -> None:
        self.calls = self.net_evals = 0

    def network(self, x: torch.Tensor, t: torch.Tensor, condition: dict[str, torch.Tensor]) -> torch.Tensor:
        """One network evaluation of a batch, float32 out."""
        t = t.to(x.device, non_blocking=True)  # the loop's timesteps are on the host: a copy without waiting
        if self.expand_t:
            t = t.reshape(-1).expand(x.shape[0])
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step of the recorded graph
        out = self.net(x.to(self.dtype, memory_format=memory_format), t, **condition)
        out = out.sample if hasattr(out, "sample") else out
        out = (out if self.channels is None else out[:, : self.channels]).float()
        # a CUDA graph overwrites its outputs at the next replay; schedulers keep past outputs
        return out.clone(memory_format=torch.contiguous_format) if self.cudagraphs else out

    def guided(self, t: torch.Tensor) -> bool:
        """Whether this call guides: the timestep's noise level on the model's own schedule, on the host."""
        if not self.guidance.enabled:
            return False
        if self.guidance.interval is None or self.log_sigma is None:
            return True
        return self.guidance.applies_at(float(sigma_at(self.log_sigma, t)))

    def doubled(self) -> dict[str, torch.Tensor]:
        """The condition of guidance's doubled batch, its halves in the pipeline's order."""
        assert self.uncond is not None
        first, second = (self.uncond, self.cond) if self.uncond_first else (self.cond, self.uncond)
        return {k: torch.cat([first[k], second[k]]) for k in self.cond}

    def warm_up(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """The network on every batch shape this denoiser can call it with (compiles them), uncounted."""
        if not self.guidance.enabled or self.guidance.interval is not None:
            self.network(x, t, self.cond)
        if self.guidance.enabled:
            self.network(torch.cat([x, x]), t, self.doubled())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.guided(t):
            self.net_evals += 1
            return self.network(x, t, self.cond)
        self.net_evals += 2
        # 1. the unconditional and conditional halves in one call, as the diffusers pipelines do
        halves = self.network(torch.cat([x, x]), t, self.doubled()).chunk(2)
        uncond, cond = halves if self.uncond_first else halves[::-1]
        # 2. classifier-free guidance: out_uncond + s (out_cond - out_uncond)
        out = uncond + self.guidance.scale * (cond - uncond)
        # 3. optional rescale towards the std of the conditional output (Lin et al. 2023)
        if self.guidance.rescale > 0:
            out = rescale_noise_cfg(out, cond, guidance_rescale=self.guidance.rescale)
        return out


def x0_from_output(
    output: torch.Tensor, x: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean image a model output implies, for x = alpha_t x0 + sigma_t eps (variance preserving)."""
    if prediction_type == "epsilon":
        return (x - sigma_t * output) / alpha_t
    if prediction_type == "v_prediction":  # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)
        return alpha_t * x - sigma_t * output
    if prediction_type == "sample":
        return output
    raise DiffexpError(f"Unknown prediction_type '{prediction_type}'; diffexp knows {', '.join(PREDICTION_TYPES)}.")
