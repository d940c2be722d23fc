"""An experiment: the model, the condition, the scheduler and the initial noise that a config names, ready to
sample. Sample k's noise, label and prompt depend only on k and the seed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.catalog import run_label
from diffexp.config import check_config, compile_mode
from diffexp.errors import DiffexpError
from diffexp.samples import Chunks
from diffexp.sampling.denoisers import Denoiser, check_guidance, sample_labels
from diffexp.sampling.device import resolve_device, resolve_dtype
from diffexp.sampling.loop import StepState, initial_noise, iter_steps
from diffexp.sampling.models import LoadedModel, load_model
from diffexp.sampling.noise import log_sigmas
from diffexp.sampling.schedulers import BuiltScheduler, build_scheduler, split_options
from diffexp.sampling.speed import SpeedRecord, accelerate, check_compile, check_precision


@dataclass
class Experiment:
    """A model, a scheduler and the initial noise, ready to sample step by step."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    loaded: LoadedModel
    built: BuiltScheduler
    model: Denoiser
    noise: torch.Tensor
    generators: list[torch.Generator]
    labels: list[int] | None = None  # the class of each sample; None: unconditional
    prompts: list[str] | None = None  # text models: the prompt of each sample
    samples: range = range(0)  # the indices of the samples bound here: a chunk of the run (the first, from prepare)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # each distinct prompt's, once
    speed: SpeedRecord | None = None  # precision, channels_last, compile and attention in force; compile time

    @property
    def num_samples(self) -> int:
        """Samples in the whole run: ``num_samples``, else one chunk of ``batch_size``."""
        return int(self.cfg.get("num_samples") or self.cfg.batch_size)

    def chunks(self) -> Chunks:
        """The run's sample indices in chunks of ``batch_size`` (the last may be smaller), computed lazily."""
        return Chunks(self.num_samples, int(self.cfg.batch_size))

    def for_samples(self, samples: range) -> Experiment:
        """The same model and scheduler bound to other samples: their noise, labels and prompts; the network as
        this one runs it (compiled, channels-last)."""
        exp = bind(self.cfg, self.device, self.dtype, self.loaded, self.built, samples, self.embeddings)
        exp.model.use_network(self.model.net)
        exp.model.channels_last, exp.model.cudagraphs = self.model.channels_last, self.model.cudagraphs
        exp.speed = self.speed
        return exp

    def to_pixels(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x or x0 as an image in [-1, 1]; a latent model's through its VAE, or ``preview=latent``'s linear map
        unless ``exact``."""
        with torch.inference_mode():
            return self.loaded.to_pixels(x, "vae" if exact else preview_mode(self.cfg))

    @property
    def label(self) -> str:
        return run_label(self.built.spec, self.cfg.steps, self.cfg.get("guidance_scale", 1.0))

    @property
    def total_calls(self) -> int:
        """The model calls this run will make (NFE)."""
        return len(self.built.scheduler.timesteps)

    def steps(self) -> Iterator[StepState]:
        """The loop, one model call at a time: x, x0, timestep and NFE at each."""
        self.model.reset()
        with torch.inference_mode():
            yield from iter_steps(
                self.model,
                self.built.scheduler,
                self.noise,
                self.cfg.steps,
                self.generators,
                self.built.step_kwargs,
                self.cfg.log_every,
            )


def prepare(cfg: DictConfig, model: LoadedModel | None = None) -> Experiment:
    """Build what ``cfg`` names. ``model`` replaces the configured one: any module called like UNet2DModel."""
    check_config(cfg)
    options = OmegaConf.to_container(cfg.scheduler, resolve=True)
    name = options.pop("name")
    split_options(name, options)  # refuse a bad scheduler or option before loading anything
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision)
    check_precision(cfg.precision, device)
    check_compile(compile_mode(cfg), device)
    identity = ("model", id(model.model)) if model is not None else ("config", OmegaConf.to_yaml(cfg.model))
    loaded = model or load_model(cfg.model, device, dtype)
    built = build_scheduler(name, loaded.scheduler_config, options, seed=cfg.seed)
    try:
        built.scheduler.set_timesteps(cfg.steps, device=device)  # checks the step count before any output
    except (ValueError, IndexError) as err:
        raise DiffexpError(f"Scheduler '{name}' cannot run {cfg.steps} steps: {err}") from None
    check_latent(cfg, loaded)
    embeddings: dict[str, torch.Tensor] = {}
    check_memory(bind(cfg, device, dtype, loaded, built, range(1), embeddings), int(cfg.batch_size))
    first = range(min(int(cfg.batch_size), int(cfg.get("num_samples") or cfg.batch_size)))
    exp = bind(cfg, device, dtype, loaded, built, first, embeddings)
    t = built.scheduler.timesteps[:1].cpu()[0]
    channels_last = bool(cfg.get("channels_last", False))
    exp.speed = accelerate(exp.model, identity, cfg.precision, channels_last, compile_mode(cfg), exp.noise, t)
    loaded.model = exp.model.model  # the compiled network of an earlier run of the process, when reused
    return exp


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a chunk: the GPU's free memory, or the machine's available memory; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_memory(one: Experiment, batch_size: int) -> None:
    """Refuse a chunk that cannot fit, before sampling: a lower bound of what a chunk needs is the largest
    activation of one sample's model call, twice (a layer's input and output), times ``batch_size``."""
    limit = free_memory(one.device)
    if limit is None:
        return
    largest = 0

    def record(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    leaves = [m for m in one.model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves or [one.model]]
    try:
        with torch.inference_mode():
            one.model(one.noise, one.built.scheduler.timesteps[0])
    finally:
        for hook in hooks:
            hook.remove()
    needed = 2 * largest * batch_size
    if needed > limit:
        raise DiffexpError(
            f"batch_size={batch_size} cannot fit on {one.device}: a chunk needs at least {needed / 2**30:.1f} GiB "
            f"(the largest activation of one sample, {largest / 2**20:.1f} MiB, twice, times {batch_size}), and "
            f"{limit / 2**30:.1f} GiB are free. Lower batch_size (num_samples sets how many samples the run makes)."
        )


def bind(
    cfg: DictConfig,
    device: torch.device,
    dtype: torch.dtype,
    loaded: LoadedModel,
    built: BuiltScheduler,
    samples: range,
    embeddings: dict[str, torch.Tensor],
) -> Experiment:
    """An experiment for these sample indices: sample k's noise, label and prompt depend only on k and the seed."""
    noise, generators = initial_noise(loaded.sample_shape, cfg.seed, len(samples), device, samples.start)
    labels = class_labels(cfg, loaded, samples)
    prompts = sample_prompts(cfg.get("prompt"), samples) if loaded.kind == "text" else None
    model = denoiser(cfg, loaded, built, labels, device)
    if prompts is not None:
        negatives = sample_prompts(cfg.get("negative_prompt"), samples)
        model.cond = {"encoder_hidden_states": encode(loaded, prompts, device, embeddings)}
        model.uncond = {"encoder_hidden_states": encode(loaded, negatives, device, embeddings)}
    return Experiment(cfg, device, dtype, loaded, built, model, noise, generators, labels, prompts, samples, embeddings)


def check_latent(cfg: DictConfig, loaded: LoadedModel) -> None:
    """Size, preview, prompts: what only some models take."""
    if loaded.latent is None:
        if cfg.get("height") is not None or cfg.get("width") is not None:
            raise DiffexpError(
                f"height / width apply to latent models (Stable Diffusion); {loaded.name} samples at its own size."
            )
    else:
        loaded.latent.set_size(cfg.get("height"), cfg.get("width"))
        if preview_mode(cfg) == "latent":
            loaded.latent.preview_map()  # refuses a VAE without a known map before sampling
    if loaded.kind != "text" and (cfg.get("prompt") is not None or cfg.get("negative_prompt") is not None):
        what = "class-conditional (use labels=...)" if loaded.num_classes is not None else "unconditional"
        raise DiffexpError(
            f"prompt / negative_prompt was given, but {loaded.name} is {what}: only text-to-image models "
            "(the StableDiffusionPipeline family) take prompts."
        )


def preview_mode(cfg: DictConfig) -> str:
    """``preview``: vae (the exact decode) or latent (the linear map)."""
    value = cfg.get("preview", "vae")
    return str(getattr(value, "value", value))


def sample_prompts(prompt: object, samples: range) -> list[str]:
    """Sample k's prompt: ``prompt[k mod len]`` (a string is a list of one; null is the empty prompt)."""
    values = OmegaConf.to_container(prompt) if OmegaConf.is_config(prompt) else prompt
    values = [""] if values is None else [values] if isinstance(values, str) else values
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise DiffexpError(f"prompt={prompt} is not allowed: use a string or a list of strings.")
    return [values[k % len(values)] for k in samples]


def encode(
    loaded: LoadedModel, prompts: list[str], device: torch.device, known: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Each sample's text embeddings; every distinct prompt is encoded once per run (``known`` keeps them)."""
    assert loaded.latent is not None
    new = [p for p in dict.fromkeys(prompts) if p not in known]
    if new:
        with torch.inference_mode():
            known |= dict(zip(new, loaded.latent.encode(new, device), strict=True))
    return torch.stack([known[p] for p in prompts])


def class_labels(cfg: DictConfig, loaded: LoadedModel, samples: range) -> list[int] | None:
    """Sample k's class; for a class-conditional model without ``labels``, the null class (unconditional)."""
    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.get("labels")) else cfg.get("labels")
    if loaded.kind == "text" and labels is not None:
        raise DiffexpError(
            f"labels={labels} was given, but {loaded.name} is a text-to-image model: give prompt=... instead."
        )
    if loaded.num_classes is None:
        if labels is not None:
            raise DiffexpError(
                f"labels={labels} was given, but {loaded.name} is unconditional: it takes no class labels."
            )
        return None
    if labels is None:
        if loaded.null_class is None:
            raise DiffexpError(
                f"{loaded.name} is class-conditional without a known null class: set labels=all or labels=[...] "
                "(or model.null_class=<id> to sample it unconditionally)."
            )
        return [loaded.null_class] * len(samples)
    return sample_labels(labels, loaded.num_classes, samples.start, len(samples))


def denoiser(
    cfg: DictConfig, loaded: LoadedModel, built: BuiltScheduler, labels: list[int] | None, device: torch.device
) -> Denoiser:
    """The model with its labels and guidance bound, or a clear refusal of guidance it cannot do."""
    interval = cfg.get("guidance_interval")
    guidance = check_guidance(
        float(cfg.get("guidance_scale", 1.0)),
        float(cfg.get("guidance_rescale", 0.0)),
        None if interval is None else list(interval),
    )
    if guidance.enabled and loaded.kind != "text" and (labels is None or loaded.null_class is None):
        raise DiffexpError(
            f"guidance_scale={guidance.scale} needs a conditional model with a null class (or unconditional input) "
            f"for the unconditional half; {loaded.name} has "
            + ("no class labels." if loaded.num_classes is None else "no known null class (set model.null_class).")
        )
    return Denoiser(
        loaded.model,
        loaded.prediction_type,
        None if labels is None else torch.tensor(labels, device=device),
        loaded.null_class,
        guidance,
        log_sigmas(built.scheduler.alphas_cumprod),
        **(dit_conventions(loaded.model) if loaded.kind == "class" else {}),
    )


def dit_conventions(transformer: torch.nn.Module) -> dict[str, object]:
    """DiTPipeline's: the halves as [class, null]; guidance and the loop on the eps half of a transformer that
    learns sigma (its variance channels are dropped); one timestep per sample."""
    cfg = transformer.config
    learns_sigma = cfg.out_channels // 2 == cfg.in_channels
    return {"uncond_first": False, "channels": cfg.in_channels if learns_sigma else None, "expand_t": True}
