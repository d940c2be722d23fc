"""An experiment: the model, the condition, the scheduler and the initial noise that a run's settings name, ready
to sample. Sample k's noise, label and prompt depend only on k and the seed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from diffexp.errors import DiffexpError
from diffexp.samples import Chunks
from diffexp.sampling.adapters import (
    Adapter,
    ClassAdapter,
    DiTAdapter,
    LabelSource,
    PromptSource,
    TextAdapter,
    build_adapter,
)
from diffexp.sampling.caches import apply_cache, remove_cache
from diffexp.sampling.device import resolve_device, resolve_dtype
from diffexp.sampling.flow import FlowSchedule, is_flow
from diffexp.sampling.flux import FluxAdapter
from diffexp.sampling.graphs import GraphCache
from diffexp.sampling.guiders import check_options, guidance_of, weak_network
from diffexp.sampling.kdiffusion import iter_k_steps
from diffexp.sampling.latent import set_vae_modes
from diffexp.sampling.loop import StepState, initial_noise, iter_steps
from diffexp.sampling.memory import check_memory
from diffexp.sampling.mmdit import FluxLatent, TransformerLatent
from diffexp.sampling.models import LoadedModel, load_model
from diffexp.sampling.network import Network
from diffexp.sampling.noise import NoiseSchedule
from diffexp.sampling.placement import build_for
from diffexp.sampling.schedulers import BuiltScheduler, split_options
from diffexp.sampling.sd3 import SD3Adapter, TextOptions, check_text_options
from diffexp.sampling.sdxl import SDXLAdapter, is_sdxl, sdxl_adapter
from diffexp.sampling.speed import SpeedRecord, accelerate, check_speed_keys
from diffexp.settings import RunSettings, read_settings


@dataclass(frozen=True)
class Experiment:
    """A model, a scheduler and the initial noise of some samples, ready to sample step by step."""

    run: RunSettings
    device: torch.device
    dtype: torch.dtype
    loaded: LoadedModel
    built: BuiltScheduler
    model: Adapter  # the network, its samples' condition and the guidance
    noise: torch.Tensor
    generators: list[torch.Generator]
    speed: SpeedRecord
    graphs: GraphCache = field(default_factory=GraphCache)  # graph=step: the captured steps of the last chunk

    @property
    def samples(self) -> range:
        """The indices of the samples bound here: a chunk of the run (the first, from prepare)."""
        return self.model.samples

    @property
    def labels(self) -> list[int] | None:
        """The class of each sample; None: unconditional."""
        return list(self.model.labels) if isinstance(self.model, ClassAdapter) else None

    @property
    def prompts(self) -> list[str] | None:
        """Text models: the prompt of each sample."""
        return list(self.model.prompts) if isinstance(self.model, (TextAdapter, SD3Adapter)) else None

    @property
    def num_samples(self) -> int:
        return self.run.num_samples

    def chunks(self) -> Chunks:
        return self.run.chunks()

    def for_samples(self, samples: range) -> Experiment:
        """The same model and scheduler bound to other samples: their noise, labels and prompts."""
        noise, generators = initial_noise(
            self.loaded.sample_shape, self.run.seed, len(samples), self.device, samples.start
        )
        return dataclasses.replace(self, model=self.model.with_samples(samples), noise=noise, generators=generators)

    def to_pixels(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x or x0 as an image in [-1, 1]; a latent model's through its VAE, or ``preview=latent``'s linear map
        unless ``exact``."""
        with torch.inference_mode():
            return self.loaded.to_pixels(x, "vae" if exact else self.run.preview.value)

    @property
    def label(self) -> str:
        return self.run.label

    @property
    def total_calls(self) -> int:
        """The model calls this run will make (NFE)."""
        return self.built.total_calls

    def steps(self) -> Iterator[StepState]:
        """The loop, one model call at a time: x, x0, timestep and NFE at each."""
        self.model.counter.reset()
        if self.model.cache is not None:
            self.model.cache.reset()  # the cache's hooks keep state between steps
        with torch.inference_mode():
            if self.run.graph == "step":  # each step replayed as a CUDA graph (diffexp.sampling.graphs)
                yield from self.graphs.states(self.model, self.built, self.noise, self.run.steps, self.run.log_every,
                                              self.speed)  # fmt: skip
                return
            if self.built.sampler is not None:  # k-diffusion's sampler on the adapter's denoise
                yield from iter_k_steps(self.built.sampler, self.model, self.noise, self.generators, self.run.log_every)
                return
            yield from iter_steps(
                self.model,
                self.built.scheduler,
                self.noise,
                self.run.steps,
                self.generators,
                self.built.step_kwargs,
                self.run.log_every,
                self.built.timesteps_kwargs,
            )


def prepare(settings: RunSettings | DictConfig, model: LoadedModel | None = None) -> Experiment:
    """Build what the settings (or a composed config) name, bound to the first chunk. ``model`` replaces the
    configured one: any module called like UNet2DModel."""
    run = settings if isinstance(settings, RunSettings) else read_settings(settings)
    if not run.scheduler.is_k:
        split_options(run.scheduler)  # refuse a bad scheduler or option before loading anything
    check_options(run.guidance)  # and a bad guidance method or option
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.precision)
    check_speed_keys(run, device)  # precision, compile, graph and cudnn_benchmark on this device
    identity = ("model", id(model.model)) if model is not None else ("config", repr(run.model))
    loaded = model or load_model(run.model, device, dtype)
    remove_cache(loaded.model)  # an earlier run's cache on a network passed in again
    check_latent(run, loaded)  # first: the image size sets Flux's dynamic shift
    built = build_for(run, loaded)  # the scheduler or k-diffusion sampler, the schedule placed (or refused)
    set_vae_modes(loaded.latent, loaded.name, run.vae_tiling, run.vae_slicing)
    weak = weak_network(run.guidance, loaded, device, dtype)
    check_memory(adapter_for(run, loaded, built, range(1), device, weak), loaded, device, run.batch_size, built)
    first = run.chunks()[0]
    adapter = adapter_for(run, loaded, built, first, device, weak)
    noise, generators = initial_noise(loaded.sample_shape, run.seed, len(first), device, first.start)
    t = built.scheduler.timesteps[:1].cpu()[0]
    key = (identity, tuple(noise.shape), run.guidance)  # the compiled network of an earlier run of the process

    def warm_up(network: Network) -> None:
        adapter.with_network(network).warm_up(noise, t)

    network, speed = accelerate(adapter.network, warm_up, key, run.precision, run.channels_last, run.compile, device)
    adapter = adapter.with_network(network)
    cache = apply_cache(run.cache, loaded.model, loaded.name, run.steps, float(t))
    adapter = dataclasses.replace(adapter, cache=cache)
    speed.graph = run.graph
    return Experiment(run, device, dtype, loaded, built, adapter, noise, generators, speed)


def adapter_for(
    run: RunSettings,
    loaded: LoadedModel,
    built: BuiltScheduler,
    samples: range,
    device: torch.device,
    weak: Network | None = None,
) -> Adapter:
    """The adapter of the model's family, bound to ``samples``, or a clear refusal of a condition or guidance it
    cannot take (``weak``: autoguidance's weaker network)."""
    flow = is_flow(loaded.scheduler_config)
    steps = int(loaded.scheduler_config.get("num_train_timesteps", 1000))
    schedule = FlowSchedule(steps) if flow else NoiseSchedule(built.scheduler.alphas_cumprod.cpu())
    timesteps = tuple(built.scheduler.timesteps.cpu().tolist())
    family = TextAdapter if loaded.kind == "text" else Adapter if loaded.num_classes is None else ClassAdapter
    family = DiTAdapter if loaded.kind == "class" else SDXLAdapter if is_sdxl(loaded.latent) else family
    transformer = loaded.latent if isinstance(loaded.latent, TransformerLatent) else None  # SD3, Flux
    family = (FluxAdapter if isinstance(transformer, FluxLatent) else SD3Adapter) if transformer else family
    common = {
        "network": Network(loaded.model),
        "prediction_type": loaded.prediction_type,
        "schedule": schedule,
        "guidance": guidance_of(run.guidance, loaded, family, schedule, timesteps, weak),
    }
    if loaded.kind == "text":
        if run.labels is not None:
            raise DiffexpError(
                f"labels={run.labels} was given, but {loaded.name} is a text-to-image model: give prompt=... instead."
            )
        assert loaded.latent is not None
        if transformer:
            return family.build(text_options(run), transformer, samples, device, common)
        latent = loaded.latent
        if is_sdxl(latent):
            return sdxl_adapter(run, latent, samples, device, **common)
        source = PromptSource(lambda prompts: latent.encode(prompts, device), run.prompts, run.negative_prompts)
        return build_adapter(TextAdapter, samples, source=source, **common)
    if loaded.num_classes is None:
        if run.labels is not None:
            raise DiffexpError(
                f"labels={run.labels} was given, but {loaded.name} is unconditional: it takes no class labels."
            )
        refuse_guidance(run, loaded)
        return build_adapter(Adapter, samples, **common)
    labels = check_labels(run, loaded)
    if run.guidance.needs_uncond and (labels is None or loaded.null_class is None):
        refuse_guidance(run, loaded)
    source = LabelSource(labels, loaded.num_classes, loaded.null_class, device)
    if loaded.kind == "class":  # DiT: a transformer that learns sigma has twice the input's channels out
        config = loaded.model.config
        learned = config.in_channels if config.out_channels // 2 == config.in_channels else None
        return build_adapter(DiTAdapter, samples, source=source, learned_channels=learned, **common)
    return build_adapter(ClassAdapter, samples, source=source, **common)


def refuse_guidance(run: RunSettings, loaded: LoadedModel) -> None:
    if run.guidance.needs_uncond:
        raise DiffexpError(
            f"guidance={run.guidance.method} at guidance_scale={run.guidance.scale} needs a conditional model with a "
            f"null class (or unconditional input) for the unconditional half; {loaded.name} has "
            + ("no class labels." if loaded.num_classes is None else "no known null class (set model.null_class).")
        )


def check_labels(run: RunSettings, loaded: LoadedModel) -> str | tuple[int, ...] | None:
    """The labels of a class-conditional model, in its range; without labels, its null class (unconditional)."""
    assert loaded.num_classes is not None
    if run.labels is None and loaded.null_class is None:
        raise DiffexpError(
            f"{loaded.name} is class-conditional without a known null class: set labels=all or labels=[...] "
            "(or model.null_class=<id> to sample it unconditionally)."
        )
    if isinstance(run.labels, tuple):
        bad = [v for v in run.labels if not 0 <= v < loaded.num_classes]
        if bad:
            raise DiffexpError(
                f"labels {bad} are outside [0, {loaded.num_classes}): this model has {loaded.num_classes} classes."
            )
    return run.labels


def check_latent(run: RunSettings, loaded: LoadedModel) -> None:
    """Size, preview, prompts, T5 length, guidance embedding, size conditioning: what only some models take."""
    check_text_options(text_options(run), loaded.name, loaded.latent)
    if loaded.latent is None:
        if run.height is not None or run.width is not None:
            raise DiffexpError(
                f"height / width apply to latent models (Stable Diffusion); {loaded.name} samples at its own size."
            )
    else:
        loaded.latent.set_size(run.height, run.width)
        if run.preview.value == "latent":
            loaded.latent.preview_map()  # refuses a VAE without a known map before sampling
    given = [k for k in ("original_size", "crops_coords_top_left", "target_size") if getattr(run, k) is not None]
    if given and not is_sdxl(loaded.latent):
        raise DiffexpError(
            f"{' / '.join(given)} apply to SDXL only (its size conditioning); {loaded.name} is not SDXL."
        )
    if loaded.kind != "text" and (run.prompts is not None or run.negative_prompts is not None):
        what = "class-conditional (use labels=...)" if loaded.num_classes is not None else "unconditional"
        raise DiffexpError(
            f"prompt / negative_prompt was given, but {loaded.name} is {what}: only text-to-image models "
            "(Stable Diffusion, SDXL, SD3, Flux) take prompts."
        )


def text_options(run: RunSettings) -> TextOptions:
    return TextOptions(run.prompts, run.negative_prompts, run.max_sequence_length, run.guidance_embed)
