"""The training schema (configs/train.yaml): a typed Hydra config, checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from diffexp.config import LoggerConfig
from diffexp.errors import DiffexpError
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG


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
    # UNet2DModel options (sample_size and channels come from the dataset)
    unet: dict[str, Any] = field(default_factory=dict)
    # the DDPMScheduler config of the noise schedule; saved with the model
    noise_schedule: dict[str, Any] = field(default_factory=lambda: dict(DDPM_SCHEDULER_CONFIG))
    steps: int = 5000  # optimiser steps
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # any diffusers.optimization schedule: constant, cosine, linear ...
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    snr_gamma: float | None = None  # min-SNR-gamma loss weights (Hang et al. 2023); null: plain MSE
    ema_decay: float = 0.999
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
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register()


def check_config(cfg: TrainConfig | DictConfig) -> None:
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "sample_batch", "sample_steps"):
        if cfg[key] <= 0:
            raise DiffexpError(f"{key}={cfg[key]} is not allowed: {key} must be a positive integer.")
    if cfg.sample_every < 0 or cfg.keep_checkpoints < 1 or cfg.warmup_steps < 0:
        raise DiffexpError("sample_every and warmup_steps must be >= 0, and keep_checkpoints >= 1.")
    if not 0 <= cfg.ema_decay < 1:
        raise DiffexpError(f"ema_decay={cfg.ema_decay} must be in [0, 1).")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise DiffexpError(f"snr_gamma={cfg.snr_gamma} must be positive (or null for plain MSE).")
