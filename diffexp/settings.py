"""The typed run: a composed config read once into resolved values.

``read_settings`` checks a composed config and turns it into a ``RunSettings`` whose fields are what a run uses:
the number of samples, the guidance, the compile mode, the preview, the scheduler spec. Everything below the
config layer reads those fields. ``compose`` builds the config the CLI would build (it calls
``diffexp.catalog.register``, as ``scripts/run.py`` does). Light to import (no torch), so config errors come fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffexp.cache_settings import CacheSettings, read_cache
from diffexp.catalog import SchedulerSpec, register, run_label, scheduler_spec
from diffexp.config import (
    SEED_MAX,
    LoggerConfig,
    MetricsConfig,
    ModelConfig,
    Precision,
    Preview,
    RunConfig,
    ScheduleConfig,
    SweepConfig,
    check_config,
    compile_mode,
    config_dir,
)
from diffexp.errors import DiffexpError
from diffexp.graph_settings import read_graph
from diffexp.guidance_settings import GuidanceSettings
from diffexp.methods import read_guidance
from diffexp.samples import Chunks
from diffexp.schedule_config import read_schedule


def compose(overrides: Sequence[str] = (), config_name: str = "run") -> DictConfig:
    """The config the CLI would build from these overrides (Hydra's compose API), for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@dataclass(frozen=True)
class RunSettings:
    """A run's config as resolved values, read once by ``read_settings``; nothing below it reads the DictConfig."""

    model: ModelConfig
    scheduler: SchedulerSpec
    schedule: ScheduleConfig  # the noise levels, independently of the sampler ("default": the scheduler's own)
    steps: int
    batch_size: int  # samples per model call: a chunk
    num_samples: int  # samples of the run (``num_samples``, else one chunk of ``batch_size``)
    seed: int
    device: str
    precision: Precision
    channels_last: bool
    compile: str | None  # torch.compile's mode; None: not compiled
    cudnn_benchmark: bool
    graph: str  # none | step: each step captured as a CUDA graph (diffexp.graph_settings)
    cache: CacheSettings
    vae_tiling: bool
    vae_slicing: bool
    log_every: int
    progress: bool
    labels: str | tuple[int, ...] | None  # "all", class ids, or None (unconditional)
    guidance: GuidanceSettings
    prompts: tuple[str, ...] | None  # None: no prompt given
    negative_prompts: tuple[str, ...] | None
    max_sequence_length: int | None  # SD3, Flux: the T5 prompt length; None: the pipeline's own
    guidance_embed: float | None  # Flux.1-dev's distilled guidance scale; None: the pipeline's default
    height: int | None
    width: int | None
    original_size: tuple[int, int] | None  # SDXL's size conditioning; None: the pipeline's default
    crops_coords_top_left: tuple[int, int] | None
    target_size: tuple[int, int] | None
    preview: Preview
    resume: bool
    overwrite: bool
    oom_retry: bool
    logger: LoggerConfig | None
    metrics: MetricsConfig
    observers: dict[str, Any]  # name -> its ``_target_`` node, in order (None removes one)
    sweep: SweepConfig
    config: dict[str, Any] = field(repr=False)  # the composed config, resolved: what the run folder records

    @property
    def label(self) -> str:
        """What the run is, e.g. ``dpmsolver-karras-20-cfg3``."""
        g = self.guidance
        return run_label(self.scheduler, self.steps, g.scale, self.schedule.label, g.method, self.cache.label)

    def chunks(self) -> Chunks:
        """The run's sample indices in chunks of ``batch_size`` (the last may be smaller), computed lazily."""
        return Chunks(self.num_samples, self.batch_size)


def read_settings(cfg: DictConfig) -> RunSettings:
    """Check a composed run config and read it into resolved values, or refuse it with a clear message."""
    check_config(cfg)
    node = OmegaConf.to_object(cfg)
    assert isinstance(node, RunConfig)
    for key in ("steps", "batch_size", "log_every", "num_samples", "height", "width", "max_sequence_length"):
        value = getattr(node, key)
        if value is not None and value <= 0:
            raise DiffexpError(f"{key}={value} is not allowed: {key} must be a positive integer.")
    total = node.num_samples or node.batch_size
    if not 0 <= node.seed <= SEED_MAX - (total - 1):
        raise DiffexpError(
            f"seed={node.seed} is not allowed: sample k uses the generator seed + k, and torch's generators take "
            f"seeds in [0, 2**64 - 1], so seed must be in [0, {SEED_MAX - (total - 1)}] for {total} samples."
        )
    std = node.model.std
    if not (std >= 0 and math.isfinite(std * std)):  # also refuses NaN
        raise DiffexpError(
            f"model.std={std} is not allowed: a standard deviation is a number >= 0 whose square is finite."
        )
    if node.metrics.reference.against not in ("ode", "uncached"):
        raise DiffexpError(
            f"metrics.reference.against={node.metrics.reference.against} is not allowed: use ode (the model's "
            "probability-flow ODE solved accurately) or uncached (the same run without its cache)."
        )
    schedule, steps = read_schedule(node.schedule, node.steps, node.steps != RunConfig.steps)
    scheduler, cache, mode = scheduler_spec(node.scheduler), read_cache(node.cache), compile_mode(node.compile)
    guidance = read_guidance(node.guidance_scale, node.guidance_rescale, node.guidance_interval, node.guidance)
    return RunSettings(
        model=node.model,
        scheduler=scheduler,
        schedule=schedule,
        steps=steps,
        batch_size=node.batch_size,
        num_samples=total,
        seed=node.seed,
        device=node.device,
        precision=Precision(node.precision),
        channels_last=node.channels_last,
        compile=mode,
        cudnn_benchmark=node.cudnn_benchmark,
        graph=read_graph(node.graph, scheduler, cache.name, guidance.enabled, mode),
        cache=cache,
        vae_tiling=node.vae_tiling,
        vae_slicing=node.vae_slicing,
        log_every=node.log_every,
        progress=node.progress,
        labels=read_labels(node.labels),
        guidance=guidance,
        prompts=read_prompts("prompt", node.prompt),
        negative_prompts=read_prompts("negative_prompt", node.negative_prompt),
        max_sequence_length=node.max_sequence_length,
        guidance_embed=node.guidance_embed,
        height=node.height,
        width=node.width,
        original_size=read_size("original_size", node.original_size),
        crops_coords_top_left=read_size("crops_coords_top_left", node.crops_coords_top_left, least=0),
        target_size=read_size("target_size", node.target_size),
        preview=Preview(node.preview),
        resume=node.resume,
        overwrite=node.overwrite,
        oom_retry=node.oom_retry,
        logger=node.logger,
        metrics=node.metrics,
        observers=dict(node.observers),
        sweep=node.sweep,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )


def read_labels(labels: Any) -> str | tuple[int, ...] | None:
    """``labels``: null, all, one class id or a list of them (their range is checked against the model)."""
    if labels is None or labels == "all":
        return labels
    values = [labels] if isinstance(labels, int) and not isinstance(labels, bool) else labels
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise DiffexpError(f"labels={labels} is not allowed: use null, all, or a list of class ids.")
    return tuple(values)


def read_prompts(key: str, prompt: Any) -> tuple[str, ...] | None:
    """``prompt`` / ``negative_prompt``: a string is a list of one; null is none given."""
    if prompt is None:
        return None
    values = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise DiffexpError(f"{key}={prompt} is not allowed: use a string or a list of strings.")
    return tuple(values)


def read_size(key: str, value: Any, least: int = 1) -> tuple[int, int] | None:
    """SDXL's size conditioning: two integers [height, width] of at least ``least`` (sizes 1, crop corners 0)."""
    if value is None:
        return None
    pair = value if isinstance(value, list) else [value]
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in pair):
        what = "positive integers, [height, width]" if least > 0 else "integers >= 0, [top, left]"
        raise DiffexpError(
            f"{key}={value} is not allowed: SDXL's size conditioning takes two {what} in pixels (e.g. "
            f"{key}={'[1024,1024]' if least else '[0,0]'}); leave it null for the pipeline's default (the image size, "
            "crops [0, 0])."
        )
    return (pair[0], pair[1])


def model_config(name: str) -> ModelConfig:
    """The model config ``configs/model/<name>.yaml`` (autoguidance's weak model), or a refusal."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise DiffexpError(f"guidance.weak_model={name} names no model config; known: {known}.")
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(node)  # type: ignore[return-value]
