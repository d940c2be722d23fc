"""Training-free caches on a transformer: diffusers' hooks (``diffusers.hooks``), applied, reset and counted.

A cache is applied to the network once per run with diffusers' ``apply_*`` function of its config class and
removed before another is applied. Its hooks keep state between steps, so the loop resets them
(``HookRegistry.reset_stateful_hooks``) before every chunk, and every network pass runs inside a cache context
(``CacheMixin.cache_context``), one per pass of a model call (guidance's passes are cached apart).

What is counted, per pass:
- ``ran``: whether the last transformer block ran. First-block cache and MagCache skip a whole pass after its
  first block when their hook decides so (the first block still runs: the skipped pass is counted as diffusers'
  hook reports it, not run); TaylorSeer, FasterCache and PAB never skip a pass, they reuse parts of it.
- ``share``: the weighted share of the blocks' linear layers that ran (in x out features per call, against a full
  pass), which shows what the partial caches reuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffexp.errors import DiffexpError


class CacheSettings(Protocol):
    """What a cache is (``diffexp.cache_settings.CacheSettings``, a frozen dataclass)."""

    name: str
    diffusers_class: str | None
    options: tuple[tuple[str, Any], ...]

    @property
    def enabled(self) -> bool: ...

    @property
    def record(self) -> dict[str, Any]: ...


APPLY = {
    "FirstBlockCacheConfig": "apply_first_block_cache",
    "TaylorSeerCacheConfig": "apply_taylorseer_cache",
    "FasterCacheConfig": "apply_faster_cache",
    "MagCacheConfig": "apply_mag_cache",
    "PyramidAttentionBroadcastConfig": "apply_pyramid_attention_broadcast",
}
COUNTERS = "_diffexp_cache_counters"  # the module attribute that holds the counting hooks' handles
TIMESTEP_CALLBACK = ("FasterCacheConfig", "PyramidAttentionBroadcastConfig")  # read the current timestep


def hook_names() -> list[str]:
    """The registry names of every cache hook diffusers registers (to remove them all)."""
    from diffusers.hooks import (
        faster_cache,
        first_block_cache,
        mag_cache,
        pyramid_attention_broadcast,
        taylorseer_cache,
    )

    modules = (faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache)
    return [v for m in modules for k, v in vars(m).items() if k.endswith("_HOOK") and isinstance(v, str)]


def block_stacks(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The top-level stacks of transformer blocks that diffusers' cache hooks act on."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [
        child
        for name, child in module.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList) and len(child)
    ]


@dataclass
class PassCount:
    """Passes that ran, nominal passes, and linear work ran against a full pass's, since the last reset."""

    ran: int = 0
    nominal: int = 0
    work: float = 0.0
    full_work: float = 0.0  # the first pass's work: every cache computes its first pass in full
    nominal_work: float = 0.0

    @property
    def share(self) -> float:
        return self.work / self.nominal_work if self.nominal_work else 1.0


@dataclass(eq=False)
class AppliedCache:
    """A cache applied to ``module``: its context per pass, its reset and its counts."""

    settings: CacheSettings
    module: torch.nn.Module
    num_steps: int
    count: PassCount = field(default_factory=PassCount)
    timestep: list[float] = field(default_factory=lambda: [1000.0])  # the current pass's, for timestep callbacks
    _tail_ran: list[bool] = field(default_factory=lambda: [False])
    _work: list[float] = field(default_factory=lambda: [0.0])

    def __post_init__(self) -> None:
        self.apply()
        stacks = block_stacks(self.module)
        tail = set(map(id, stacks[-1][-1].modules()))
        for handle in getattr(self.module, COUNTERS, []):  # an earlier run's counters on the same network
            handle.remove()
        handles = []
        for stack in stacks:
            for linear in (m for m in stack.modules() if isinstance(m, torch.nn.Linear)):
                weight = float(linear.in_features * linear.out_features)
                handles.append(linear.register_forward_hook(self._counter(weight, id(linear) in tail)))
        setattr(self.module, COUNTERS, handles)

    def _counter(self, weight: float, in_tail: bool) -> Any:
        def count(_module: torch.nn.Module, _inputs: object, _output: object) -> None:
            self._work[0] += weight
            self._tail_ran[0] = self._tail_ran[0] or in_tail

        return count

    def config(self) -> Any:
        import diffusers.hooks

        options = dict(self.settings.options)
        cls = getattr(diffusers.hooks, str(self.settings.diffusers_class))
        if self.settings.diffusers_class in TIMESTEP_CALLBACK:
            options["current_timestep_callback"] = lambda: self.timestep[0]
        if self.settings.diffusers_class == "FasterCacheConfig":
            options["is_guidance_distilled"] = True
        if self.settings.diffusers_class == "MagCacheConfig":
            options["num_inference_steps"] = self.num_steps
        if options.get("mag_ratios") is not None:
            options["mag_ratios"] = list(options["mag_ratios"])
        known = inspect.signature(cls).parameters
        if unknown := sorted(set(options) - set(known)):
            raise DiffexpError(
                f"cache.{unknown[0]} is not an option of {cls.__name__}; it takes: "
                f"{', '.join(k for k in known if not k.startswith('_'))}."
            )
        return cls(**options)

    def apply(self) -> None:
        import diffusers.hooks

        remove_cache(self.module)
        getattr(diffusers.hooks, APPLY[str(self.settings.diffusers_class)])(self.module, self.config())
        if not hooked(self.module):
            remove_cache(self.module)
            raise DiffexpError(
                f"cache={self.settings.name} found no module of {type(self.module).__name__} to act on (its module "
                "patterns match none of the network's names), so it would change nothing."
            )

    def reset(self) -> None:
        """Fresh hook state and counts: before every chunk's loop."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.module).reset_stateful_hooks(recurse=True)
        self.count = PassCount()

    @contextlib.contextmanager
    def context(self, name: str, step: int, timestep: float, passes: int) -> Iterator[None]:
        """One network pass (of ``passes`` per sample) at ``step``: inside diffusers' cache context, counted."""
        from diffusers import CacheMixin

        self.timestep[0], self._tail_ran[0], self._work[0] = timestep, False, 0.0
        with CacheMixin.cache_context(self.module, name, step_index=step, num_inference_steps=self.num_steps):
            yield
        count = self.count
        count.full_work = count.full_work or self._work[0]
        count.nominal += passes
        count.ran += passes if self._tail_ran[0] else 0
        count.work += self._work[0] * passes
        count.nominal_work += count.full_work * passes

    @contextlib.contextmanager
    def removed(self) -> Iterator[None]:
        """The network without the cache (the uncached reference), applied again after."""
        remove_cache(self.module)
        try:
            yield
        finally:
            self.apply()

    @property
    def record(self) -> dict[str, Any]:
        return {**self.settings.record, "passes_ran": self.count.ran, "passes_nominal": self.count.nominal,
                "compute_share": round(self.count.share, 4)}  # fmt: skip


def hooked(module: torch.nn.Module) -> bool:
    """Whether any module under ``module`` carries one of diffusers' cache hooks."""
    names = set(hook_names())
    return any(names & set(m._diffusers_hook.hooks) for m in module.modules() if hasattr(m, "_diffusers_hook"))


def remove_cache(module: torch.nn.Module) -> None:
    """Every cache hook of diffusers off ``module`` (none there: nothing happens)."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in hook_names():
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


# (hook config, network): why diffusers' hook fails there (diffusers 0.42.1)
UNSUPPORTED = {
    ("FirstBlockCacheConfig", "SD3Transformer2DModel"): (
        "the last JointTransformerBlock returns no text stream (context_pre_only), and diffusers' first-block "
        "cache subtracts it from the cached one (a TypeError inside the first step). Use taylorseer, pab or mag."
    ),
}
BLOCK_REGISTRY_CACHES = ("FirstBlockCacheConfig", "MagCacheConfig")  # their hooks need each block class registered


def unregistered_blocks(module: torch.nn.Module) -> list[str]:
    """The block classes of ``module``'s stacks that diffusers' TransformerBlockRegistry does not describe."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    known = TransformerBlockRegistry._registry
    return sorted(
        {type(block).__name__ for stack in block_stacks(module) for block in stack if type(block) not in known}
    )


def apply_cache(
    settings: CacheSettings, module: torch.nn.Module, model: str, steps: int, first_timestep: float
) -> AppliedCache | None:
    """The cache applied to ``module``, None for ``cache=none``; refused, with the reason, where diffusers' hooks
    cannot act (no transformer block stack: a UNet) or would fail."""
    if not settings.enabled:
        if module is not None:
            remove_cache(module)
        return None
    if not block_stacks(module):
        raise DiffexpError(
            f"cache={settings.name} cannot apply to {model} ({type(module).__name__}): diffusers' cache hooks act "
            "on a transformer's top-level stack of blocks (transformer_blocks, single_transformer_blocks, ...), "
            "which a UNet does not have. Use cache=none, or a transformer model (DiT, SD3, Flux)."
        )
    if settings.diffusers_class in BLOCK_REGISTRY_CACHES and (unknown := unregistered_blocks(module)):
        raise DiffexpError(
            f"cache={settings.name} cannot apply to {model} ({type(module).__name__}): diffusers' "
            f"{settings.diffusers_class} reads each block's outputs through its TransformerBlockRegistry, which has "
            f"no entry for {', '.join(unknown)}, so its hooks fail inside the first step. Use another cache "
            "(taylorseer, pab) on this model."
        )
    if reason := UNSUPPORTED.get((str(settings.diffusers_class), type(module).__name__)):
        raise DiffexpError(f"cache={settings.name} cannot apply to {model} ({type(module).__name__}): {reason}")
    options = dict(settings.options)
    if settings.diffusers_class == "FasterCacheConfig":
        high = options.get("spatial_attention_timestep_skip_range", (-1, 681))[1]
        if first_timestep < high:
            raise DiffexpError(
                f"cache=faster with spatial_attention_timestep_skip_range up to {high} would skip the attention at "
                f"the first step (timestep {first_timestep:g}), when diffusers' FasterCache has nothing cached yet "
                "and fails; lower its high end below the first timestep."
            )
    if settings.diffusers_class == "MagCacheConfig" and options.get("mag_ratios") is None:
        if type(module).__name__ != "FluxTransformer2DModel":
            raise DiffexpError(
                f"cache=mag needs the magnitude ratios of {model}'s checkpoint (cache.mag_ratios=[...]); diffusers "
                "publishes only Flux's. Calibrate them with diffusers' MagCacheConfig(calibrate=True)."
            )
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        options["mag_ratios"] = tuple(FLUX_MAG_RATIOS.tolist())
        settings = dataclasses.replace(settings, options=tuple(sorted(options.items())))  # type: ignore[type-var]
    return AppliedCache(settings, module, steps)
