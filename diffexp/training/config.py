"""The training schema (configs/train.yaml): a typed Hydra config, checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from diffexp.config import SEED_MAX, LoggerConfig
from diffexp.errors import DiffexpError
from diffexp.numbers import non_finite
from diffexp.sampling.flow import FLOW_PREDICTION, is_flow
from diffexp.sampling.parameterisation import PREDICTION_TYPES
from diffexp.training.networks import NETWORKS, class_rows, network_name

FLOW_SCHEDULE = "FlowMatchEulerDiscreteScheduler"
TIMESTEP_SAMPLING = ("uniform", "logit_normal")  # how the flow objective draws sigma


@dataclass
class DatasetConfig:
    name: str = MISSING  # digits | folder
    path: str | None = None  # folder: a folder of images (searched recursively)
    sample_size: int = 32
    channels: int = 1  # folder: 1 = greyscale, 3 = RGB


@dataclass
class TrainConfig:
    dataset: DatasetConfig = MISSING
    name: str = "digits-unet"  # names the output folder, outputs/train/<name>
    network: str = "unet"  # unet (UNet2DModel, options in unet) | dit (DiTTransformer2DModel, options in dit)
    # UNet2DModel options (sample_size and channels come from the dataset)
    unet: dict[str, Any] = field(default_factory=dict)
    # DiTTransformer2DModel options (sample_size and channels from the dataset, num_embeds_ada_norm from num_classes)
    dit: dict[str, Any] = field(default_factory=dict)
    # the noise schedule, saved with the model: a DDPMScheduler config, or a FlowMatchEulerDiscreteScheduler config
    # for prediction_type flow_prediction
    noise_schedule: dict[str, Any] = field(default_factory=dict)  # configs/noise_schedule: ddpm | flow
    steps: int = 5000  # optimiser steps
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # any diffusers.optimization schedule: constant, cosine, linear ...
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    snr_gamma: float | None = None  # min-SNR-gamma loss weights (Hang et al. 2023); null: plain MSE
    # what the network predicts: epsilon | v_prediction | sample | flow_prediction (the velocity eps - x0 of the
    # rectified-flow path x = (1 - sigma) x0 + sigma eps; needs a FlowMatchEulerDiscreteScheduler noise_schedule)
    prediction_type: str = "epsilon"
    # flow_prediction: how sigma is drawn, uniform (rectified flow) | logit_normal (SD3: sigmoid(N(mean, std)))
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # class conditioning: null = unconditional; C = labels 0..C-1 plus the null class id C (num_class_embeds = C + 1)
    num_classes: int | None = None
    label_dropout: float = 0.0  # probability that a training label becomes the null class id (for guidance)
    ema_decay: float = 0.999
    # a diffusers pipeline folder whose UNet weights start the training (fine-tuning; same network and prediction
    # type); the optimiser, LR schedule and EMA start afresh. null: initialised from seed
    init_from: str | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads for torch; null: torch's default
    log_every: int = 25  # loss to the loggers every this many steps
    sample_every: int = 250  # an EMA sample grid every this many steps (and at the end); 0: never
    sample_batch: int = 16
    sample_scheduler: str = "dpmsolver"  # a diffexp scheduler name, for the sample grids
    sample_steps: int = 20
    checkpoint_every: int = 250  # and at the end
    keep_checkpoints: int = 2
    logger: LoggerConfig | None = None  # the same W&B settings as sampling (configs/logger); null: none
    resume: bool = True  # resume from the last checkpoint in the output folder
    progress: bool = True


def register() -> None:
    """Store the training schema and the resolvers its files use, ``${safe:...}`` (``scripts/train.py`` and the
    tests call it before composing ``train``)."""
    from diffexp.catalog import register as register_resolvers

    register_resolvers()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


# every numeric key's range: (lowest, highest, whether the lowest itself is allowed); checked before training
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "steps": (1, None, True),
    "batch_size": (1, None, True),
    "lr": (0, None, False),
    "warmup_steps": (0, None, True),
    "weight_decay": (0, None, True),
    "grad_clip": (0, None, True),  # 0: no clipping
    "snr_gamma": (0, None, False),
    "logit_std": (0, None, False),
    "num_classes": (1, None, True),
    "label_dropout": (0, 1, True),  # below 1
    "ema_decay": (0, 1, True),  # below 1
    "seed": (0, SEED_MAX, True),
    "threads": (1, None, True),
    "log_every": (1, None, True),
    "sample_every": (0, None, True),  # 0: never
    "sample_batch": (1, None, True),
    "sample_steps": (1, None, True),
    "checkpoint_every": (1, None, True),
    "keep_checkpoints": (1, None, True),
    "dataset.sample_size": (1, None, True),
    "dataset.channels": (1, 3, True),
}
BELOW_HIGHEST = ("label_dropout", "ema_decay")  # their highest value itself is not allowed


def check_ranges(cfg: TrainConfig | DictConfig) -> None:
    """Refuse a number outside its key's range (``RANGES``), or one that is not finite, naming the key."""
    if why := non_finite(cfg, allowed={}):  # type: ignore[arg-type]
        raise DiffexpError(why)
    for key, (low, high, low_ok) in RANGES.items():
        value = OmegaConf.select(cfg, key)  # type: ignore[arg-type]
        if value is None:
            continue
        too_low = value < low or (value == low and not low_ok)
        too_high = high is not None and (value > high or (value == high and key in BELOW_HIGHEST))
        if too_low or too_high:
            lower = f">= {low}" if low_ok else f"> {low}"
            upper = "" if high is None else f" and {'<' if key in BELOW_HIGHEST else '<='} {high}"
            raise DiffexpError(
                f"{key}={value} is not allowed: {key} must be {lower}{upper}. Nothing was trained or changed "
                "(see diffexp/training/config.py for each key's meaning)."
            )


def check_config(cfg: TrainConfig | DictConfig) -> None:
    check_ranges(cfg)
    if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise DiffexpError(f"prediction_type={cfg.prediction_type}: use one of {', '.join(PREDICTION_TYPES)}.")
    num_classes, dropout = cfg.get("num_classes"), cfg.get("label_dropout", 0.0)
    if dropout > 0 and num_classes is None:
        raise DiffexpError(f"label_dropout={dropout} needs class-conditional training: set num_classes.")
    if cfg.get("network", "unet") not in NETWORKS:
        raise DiffexpError(f"network={cfg.network}: use one of {', '.join(NETWORKS)}.")
    if cfg.get("network") == "dit" and not num_classes:
        raise DiffexpError("network=dit is class-conditional (adaLN-Zero takes a class label): set num_classes.")
    check_noise_path(cfg)


def check_noise_path(cfg: TrainConfig | DictConfig) -> None:
    """flow_prediction trains on a FlowMatchEulerDiscreteScheduler path (shift fixed, no dynamic shifting), and only
    it does; min-SNR weights and the sigma sampling belong to one objective each."""
    schedule = cfg.get("noise_schedule") or {}
    name = str(schedule.get("_class_name") or "DDPMScheduler")
    flow, flow_schedule = cfg.get("prediction_type") == FLOW_PREDICTION, name == FLOW_SCHEDULE
    if name not in ("DDPMScheduler", FLOW_SCHEDULE):
        raise DiffexpError(f"noise_schedule._class_name={name}: use DDPMScheduler or {FLOW_SCHEDULE}.")
    if flow != flow_schedule:
        raise DiffexpError(
            f"prediction_type={cfg.prediction_type} does not fit noise_schedule._class_name={name}: the rectified-flow "
            f"objective (prediction_type=flow_prediction) trains on a {FLOW_SCHEDULE} noise schedule, and the "
            "epsilon, v_prediction and sample objectives on a DDPMScheduler one."
        )
    if flow and schedule.get("use_dynamic_shifting"):
        raise DiffexpError(
            "noise_schedule.use_dynamic_shifting=true is not allowed for training: its shift depends on the image's "
            "token count at sampling time; set a fixed noise_schedule.shift instead."
        )
    if flow and cfg.get("snr_gamma") is not None:
        raise DiffexpError(f"snr_gamma={cfg.snr_gamma} weights the DDPM objectives; set snr_gamma=null with flow.")
    if cfg.get("timestep_sampling", "uniform") not in TIMESTEP_SAMPLING:
        raise DiffexpError(
            f"timestep_sampling={cfg.timestep_sampling}: use one of {', '.join(TIMESTEP_SAMPLING)} (flow_prediction)."
        )


def check_resumable(
    cfg: TrainConfig | DictConfig, checkpoint: Path, network: torch.nn.Module, scheduler_config: dict[str, Any]
) -> None:
    """A checkpoint resumes only the same kind of model: its network, classes and prediction type."""
    found = network_name(network)
    if found != cfg.get("network", "unet"):
        raise DiffexpError(
            f"{checkpoint} holds network={found}, not network={cfg.get('network', 'unet')}: train into a new output "
            "folder (name=...) or resume=false."
        )
    num_class_embeds = class_rows(network)
    want_embeds = cfg.num_classes + 1 if cfg.get("num_classes") else None
    if num_class_embeds != want_embeds:
        raise DiffexpError(
            f"{checkpoint} has num_class_embeds={num_class_embeds}, but num_classes={cfg.get('num_classes')} needs "
            f"{want_embeds}: train into a new output folder (name=...) or resume=false."
        )
    saved = FLOW_PREDICTION if is_flow(scheduler_config) else scheduler_config.get("prediction_type", "epsilon")
    if saved != cfg.get("prediction_type", "epsilon"):
        raise DiffexpError(
            f"{checkpoint} was trained with prediction_type={saved}, not {cfg.prediction_type}: "
            "train into a new output folder (name=...) or resume=false."
        )
