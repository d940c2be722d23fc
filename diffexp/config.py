"""The typed run configuration: a Hydra schema, so a misspelled key or a wrong type fails at startup.

``check_config`` catches what composition lets through; ``diffexp.settings`` reads a composed config into
resolved values, once.
Light to import (no torch), so config errors come fast.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.guidance_settings import NO_GUIDANCE
from diffexp.numbers import non_finite


class Precision(str, Enum):
    fp32 = "fp32"  # true float32 (TF32 off on CUDA)
    tf32 = "tf32"  # float32 weights, TF32 tensor-core matmuls and convolutions (CUDA, Ampere and newer)
    fp16 = "fp16"
    bf16 = "bf16"


# torch.compile modes (torch's names); "false" is no compilation
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class ModelSource(str, Enum):
    hub = "hub"  # a Hugging Face Hub id, through DiffusionPipeline.from_pretrained
    local = "local"  # a folder saved by DDPMPipeline.save_pretrained
    ideal = "ideal"  # the exact denoiser of the scikit-learn digits
    random = "random"  # a tiny random-weight UNet2DModel, for tests
    package = "package"  # a pipeline folder shipped in the package: diffexp/weights/<path>


class Parameterisation(str, Enum):
    vp = "vp"  # a variance-preserving DDPM schedule: epsilon, v or x0 prediction
    flow = "flow"  # the linear flow path x = (1 - sigma) x0 + sigma eps: velocity prediction


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = MISSING
    id: str | None = None
    revision: str | None = None
    path: str | None = None  # local: a folder; package: a folder name under diffexp/weights
    sample_size: int | None = None
    std: float = 0.0  # digits-ideal: std of the Gaussian mixture around each training image
    # class-conditional models: the number of classes and the null class that guidance's unconditional half uses
    # (null: read from the UNet's num_class_embeds; no null class, no guidance)
    num_classes: int | None = None
    null_class: int | None = None
    prediction_type: str | None = None  # digits-ideal and tiny: epsilon | v_prediction | sample (default epsilon)
    parameterisation: Parameterisation = Parameterisation.vp  # digits-ideal: vp (DDPM betas) | flow (velocity)
    ays: str | None = None  # its published Align Your Steps table (sd15 | sdxl | svd); null: none published
    t5: bool = True  # SD3: load its T5 text encoder (false: text_encoder_3=None, as StableDiffusion3Pipeline allows)


class Preview(str, Enum):
    vae = "vae"  # latent models: x and x0 decoded exactly through the VAE at every snapshot
    latent = "latent"  # a fixed linear latent-to-RGB map, no decoder call (final samples are always decoded)


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ScheduleConfig:
    """The ``schedule`` group (diffexp/schedule_config.py checks it): a noise schedule and its parameters
    (those a formula does not read are ignored by it, never set silently:
    each group file sets only its own)."""

    name: str = "default"
    sigma_min: float | None = None  # range formulas: null is the model's smallest training sigma
    sigma_max: float | None = None  # null: the model's largest
    rho: float = 7.0  # karras (Karras et al. 2022: 7); polyexponential (its file: 1)
    alpha: float = 0.6  # beta (ComfyUI's defaults)
    beta: float = 0.6
    threshold_noise: float = 0.025  # linear_quadratic
    linear_steps: int | None = None  # linear_quadratic; null: steps // 2
    table: str | None = None  # ays: sd15 | sdxl | svd; null: the model's own (model.ays)
    sigmas: list[float] | None = None  # custom: decreasing noise levels, > 0, a final 0 allowed
    timesteps: list[float] | None = None  # custom: decreasing training timesteps

    @property
    def is_default(self) -> bool:
        return self.name == "default"

    @property
    def label(self) -> str:
        """A short name for run labels: karras, karras-rho5, beta-a0.5-b0.6, custom ..."""
        extra = {"karras": ("rho", 7.0), "polyexponential": ("rho", 1.0)}.get(self.name)
        if extra and getattr(self, extra[0]) != extra[1]:
            return f"{self.name}-rho{self.rho:g}"
        if self.name == "beta" and (self.alpha, self.beta) != (0.6, 0.6):
            return f"beta-a{self.alpha:g}-b{self.beta:g}"
        return self.name


def schedule_label(node: dict[str, object] | ScheduleConfig | None) -> str:
    """The label of a schedule node (a composed config's, or none: the scheduler's own)."""
    if node is None:
        return "default"
    plan = node if isinstance(node, ScheduleConfig) else ScheduleConfig(**node)  # type: ignore[arg-type]
    return plan.label


@dataclass
class LoggerConfig:
    """W&B run settings (configs/logger/wandb.yaml); ``logger=none`` sets the whole node to null."""

    project: str = "diffexp"
    entity: str | None = None  # W&B's default entity of the API key when unset
    group: str | None = None  # default: the experiment and sweep name
    name: str | None = None  # default: what the run is, e.g. ddim-30
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None  # default: what the script does (sample, train, ...)
    mode: WandbMode | None = None  # unset: WANDB_MODE decides, else offline when no API key is configured
    init_timeout: float = 30.0  # seconds before W&B setup gives up and the run goes on without it
    finish_timeout: float = 120.0  # seconds to wait for uploads at the end; the rest stays for `wandb sync`
    dashboard: bool = False  # a sweep saves its W&B workspace and report when it ends online (scripts/dashboard.py)


class FidFeatures(str, Enum):
    digits = "digits"  # the small digits classifier shipped with diffexp (offline)
    inception = "inception"  # the standard InceptionV3 of torch-fidelity (needs its weights)


@dataclass
class ReferenceConfig:
    """The reference solution from the same noise (diffexp/reference.py)."""

    enabled: bool = False
    # a deterministic diffusers scheduler and its options; clipping and thresholding are always off
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "heun", "timestep_spacing": "linspace"})
    steps: int = 500
    against: str = "ode"  # ode: the solver above; uncached: the run's own sampler and steps without its cache


@dataclass
class FidConfig:
    """FID and KID of the final samples against real images (diffexp/metrics/fid.py)."""

    enabled: bool = False
    features: FidFeatures = FidFeatures.digits
    real: str = "digits"  # digits, a folder of images, or an .npz of mu and sigma (FID only)
    n: int | None = None  # use the first n samples of the batch; null: all of them
    kid_subset_size: int = 100  # capped at the sample count
    kid_subsets: int = 100
    inception_weights: str | None = None  # a local copy of the Inception weights (read with weights_only=True)


@dataclass
class MetricsConfig:
    name: str = "fast"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    landing: bool = False  # digits-ideal: where the samples land among the training images (cheap)
    hit_tol: float = 0.02  # a sample within this RMSE of a training image has landed on it
    residual_noise: bool = True  # high-frequency energy of the samples against the real set's (residual_noise.py)
    label_accuracy: bool = True  # runs with labels on 1-channel samples: the digits classifier reads each sample
    cache_dir: str = "outputs/cache"  # reference solutions and real-data statistics


@dataclass
class SweepConfig:
    """How a sweep (multirun) treats its jobs; not part of what a job is."""

    max_deaths: int = 2  # a resumed sweep skips a job whose process died this many times (e.g. out of memory)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    # name + options of one diffusers scheduler; options are checked against its signature when built
    scheduler: dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the noise levels (default: the scheduler's)
    steps: int = 30  # this default counts as "steps unset" where a sampler or schedule sets its own
    batch_size: int = 4  # samples per model call (a chunk)
    num_samples: int | None = None  # samples per run in chunks of batch_size (null: one); <= 10**8, fitting on disk
    seed: int = 0
    resume: bool = True  # a run started again in its own folder continues from its finished chunks
    overwrite: bool = False  # clear a folder that holds another run before starting this one
    oom_retry: bool = False  # out of device memory: split the chunk in halves (same results) instead of failing
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = Precision.fp32
    channels_last: bool = False  # the network's weights and inputs in channels-last memory format
    compile: str = "false"  # false | default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile's mode
    cudnn_benchmark: bool = False  # cuDNN picks the fastest convolution algorithm per shape (CUDA only)
    graph: str = "none"  # none | step: each step (network + scheduler update) as one CUDA graph (CUDA only)
    # a training-free cache of diffusers' hooks (configs/cache/): name + options; transformer models only
    cache: dict[str, Any] = field(default_factory=dict)
    vae_tiling: bool = False  # latent models: the VAE decodes in tiles (AutoencoderKL.enable_tiling)
    vae_slicing: bool = False  # latent models: the VAE decodes one sample at a time (enable_slicing)
    log_every: int = 10
    progress: bool = True
    # class labels: null (unconditional), all (sample k gets class k mod C) or a list (sample k gets labels[k mod len])
    labels: Any = None
    guidance_scale: float = NO_GUIDANCE  # classifier-free guidance; 1 is none
    guidance_rescale: float = 0.0  # Lin et al. 2023; 0 is none
    guidance_interval: list[float] | None = None  # [sigma_lo, sigma_hi]: guidance only at these noise levels
    # the guidance method: name + options of one diffusers guider (configs/guidance/), checked against its signature
    guidance: dict[str, Any] = field(default_factory=dict)
    # text-to-image models: a string or a list (sample k gets prompt[k mod len]); null is the empty prompt
    prompt: Any = None
    negative_prompt: Any = None  # the unconditional half of guidance (null: the empty prompt), string or list
    max_sequence_length: int | None = None  # SD3, Flux: the T5 prompt length in tokens; null: the pipeline's own
    guidance_embed: float | None = None  # Flux.1-dev: the distilled guidance scale it takes as input; null: 3.5
    height: int | None = None  # latent models: the image size in pixels; null: the model's own
    width: int | None = None
    # SDXL's size conditioning (its added time ids), [height, width] in pixels: null is the image size, and [0, 0]
    original_size: Any = None
    crops_coords_top_left: Any = None
    target_size: Any = None
    preview: Preview = Preview.vae  # latent models: how snapshot grids show x and x0 (vae | latent)
    logger: LoggerConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # what watches the loop: name -> a _target_ node (a diffexp.runner.observers.Observer), built in order
    observers: dict[str, Any] = field(default_factory=dict)
    sweep: SweepConfig = field(default_factory=SweepConfig)


PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"  # trained networks shipped with the package


@functools.cache
def config_dir() -> Path:
    """``configs/`` of this checkout, or the copy installed with the package (``diffexp/configs``)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "configs", package / "configs"):
        if (candidate / "run.yaml").is_file():
            return candidate
    raise DiffexpError(f"diffexp's configs/ folder is missing (looked beside {package}).")


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1] (negative seeds wrap around)


def check_config(cfg: DictConfig) -> None:
    """What composition lets through: keys added with ``+`` that the schema lacks. The values are checked where
    they are read, once (``diffexp.settings.read_settings``)."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise DiffexpError(
            f"Unknown config key(s): {', '.join(unknown)}. The schema (diffexp/config.py) has no such key; "
            "check the spelling, or see configs/ for the keys each group takes."
        )
    if why := non_finite(cfg):  # NaN or inf anywhere, by key (diffexp/numbers.py)
        raise DiffexpError(why)


def compile_mode(value: str) -> str | None:
    """``compile``: None (false) or one of torch.compile's ``COMPILE_MODES``."""
    value = str(value).strip()
    if value.lower() in ("false", "none", "off", "no", "0"):
        return None
    if value not in COMPILE_MODES:
        raise DiffexpError(
            f"compile={value} is not allowed: use false or one of torch.compile's modes: {', '.join(COMPILE_MODES)}."
        )
    return value


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that ``+key=value`` added to a typed node of the schema."""
    found = []
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        if key == "hydra" and not prefix:
            continue
        if known is not None and key not in known:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(child := node._get_node(key)) and not OmegaConf.is_missing(node, key):
            found += unknown_keys(child, f"{prefix}{key}.")
    return found
