"""What evaluates a network for an adapter, and what it counts."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Condition = Mapping[str, torch.Tensor]  # keyword arguments of the network, one row per sample


@dataclass
class Counter:
    """Model calls (NFE) and network evaluations per sample (a guided call makes two) since the last reset;
    ``passes`` counts the network passes of the current call (a cache keeps each apart)."""

    calls: int = 0
    net_evals: int = 0
    passes: int = 0

    def reset(self) -> None:
        self.calls = self.net_evals = self.passes = 0


@dataclass(frozen=True)
class Network:
    """What evaluates the network: the module, or its torch.compile'd form (``diffexp.sampling.speed``).

    Casts the input to the module's precision and returns float32, so the loop stays in float32."""

    module: torch.nn.Module
    compiled: Callable[..., Any] | None = None
    channels_last: bool = False  # inputs in channels-last memory format, like the weights
    cudagraphs: bool = False  # outputs live in a CUDA graph's memory until copied

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The module's precision, read once (``ModelMixin.dtype`` walks the parameters: not at every call)."""
        return getattr(self.module, "dtype", None) or next((p.dtype for p in self.module.parameters()), torch.float32)

    @functools.cached_property
    def timestep_by_name(self) -> bool:
        """Whether the module takes ``timestep`` by name: diffusers' models do, and SD3's and Flux's transformers
        take it only so (their second parameter is the text embeddings)."""
        return "timestep" in inspect.signature(self.module.forward).parameters

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: Condition, channels: int | None) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step of the recorded graph
        x = x.to(self.dtype, memory_format=memory_format)
        fn = self.compiled or self.module
        out = fn(x, timestep=t, **condition) if self.timestep_by_name else fn(x, t, **condition)
        out = out.sample if hasattr(out, "sample") else out
        out = (out if channels is None else out[:, :channels]).float()
        # a CUDA graph overwrites its outputs at the next replay; schedulers keep past outputs
        return out.clone(memory_format=torch.contiguous_format) if self.cudagraphs else out
