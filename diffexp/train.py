"""Train a UNet2DModel with the DDPM noise-prediction objective (Ho et al. 2020, eq. 14):
    L = E_{x0, t, eps} |eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2,  t ~ U{0..T-1}.

The output folder holds ``checkpoints/step-NNNNNN/`` (a DDPMPipeline folder with the EMA weights, which
``model=local`` samples, plus ``training_state.pt``), ``model/`` (the final EMA pipeline), ``train.jsonl``,
``samples/`` and ``status.json``. A run started again in the same folder resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffexp import models
from diffexp.config import LoggerConfig
from diffexp.device import device_name, resolve_device
from diffexp.errors import DiffexpError
from diffexp.files import write_json
from diffexp.ideal import DDPM_SCHEDULER_CONFIG, digits_images
from diffexp.images import save_grid
from diffexp.sampler import initial_noise, iter_steps, sample
from diffexp.schedulers import build_scheduler

log = logging.getLogger("diffexp")
STATE_FILE = "training_state.pt"


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


class TrainLogger(Protocol):
    """Where loss and sample grids go: ``log(metrics, step, images)``; images are [-1, 1] NCHW batches."""

    def log(self, metrics: dict[str, float], step: int, images: dict[str, torch.Tensor] | None = None) -> None: ...

    def close(self, error: BaseException | None = None) -> None: ...


class JsonlLogger:
    """``train.jsonl`` (one line per log call) and ``samples/<name>-stepNNNNNN.png``."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "train.jsonl"
        self.samples = Path(out_dir) / "samples"
        self.samples.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int, images: dict[str, torch.Tensor] | None = None) -> None:
        record: dict[str, Any] = {"step": step, **metrics}
        for name, x in (images or {}).items():
            record[name] = str(save_grid(x, self.samples / f"{name}-step{step:06d}.png"))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, error: BaseException | None = None) -> None:
        pass


# ---------------------------------------------------------------------------------------------- data


class ImageFolderData(torch.utils.data.Dataset):
    """Every image under a folder (recursively), resized and centre-cropped, in [-1, 1]."""

    def __init__(self, root: Path, sample_size: int, channels: int) -> None:
        from torchvision import transforms
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise DiffexpError(f"dataset.path={root} holds no images ({', '.join(IMG_EXTENSIONS)}).")
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose(
            [
                transforms.Resize(sample_size),
                transforms.CenterCrop(sample_size),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert(self.mode))


def load_dataset(cfg: DatasetConfig | DictConfig) -> torch.utils.data.Dataset:
    if cfg.name == "digits":
        if cfg.channels != 1:
            raise DiffexpError("dataset=digits has one channel; leave dataset.channels at 1.")
        return torch.utils.data.TensorDataset(digits_images(cfg.sample_size))
    if cfg.name == "folder":
        if not cfg.path:
            raise DiffexpError("dataset=folder needs dataset.path=DIR, a folder of images.")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise DiffexpError(f"dataset.path={cfg.path} is not a folder.")
        if cfg.channels not in (1, 3):
            raise DiffexpError(f"dataset.channels={cfg.channels}: use 1 (greyscale) or 3 (RGB).")
        return ImageFolderData(root, cfg.sample_size, cfg.channels)
    raise DiffexpError(f"Unknown dataset '{cfg.name}'. Use dataset=digits or dataset=folder dataset.path=DIR.")


def batch_of(data: torch.utils.data.Dataset, index: torch.Tensor) -> torch.Tensor:
    items = [data[i] for i in index.tolist()]
    return torch.stack([x[0] if isinstance(x, tuple) else x for x in items])


# ---------------------------------------------------------------------------------------------- model


def build_unet(cfg: TrainConfig | DictConfig) -> UNet2DModel:
    options = OmegaConf.to_container(cfg.unet, resolve=True) if isinstance(cfg.unet, DictConfig) else dict(cfg.unet)
    allowed = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self", "sample_size"}
    allowed -= {"in_channels", "out_channels"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DiffexpError(
            f"unet.{unknown[0]} is not a UNet2DModel option (sample_size and channels come from the dataset). "
            f"Options: {', '.join(sorted(allowed))}."
        )
    ds = cfg.dataset
    try:
        return UNet2DModel(sample_size=ds.sample_size, in_channels=ds.channels, out_channels=ds.channels, **options)
    except (ValueError, TypeError, AssertionError) as err:
        raise DiffexpError(f"UNet2DModel refused the options {options}: {err}") from None


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


def snr_weights(noise_scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for noise prediction (Hang et al. 2023, eq. 9 with eps = x0-loss / SNR):
    w_t = min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t)."""
    snr = compute_snr(noise_scheduler, t)
    return snr.clamp(max=gamma) / snr


# ---------------------------------------------------------------------------------------------- state


@dataclass
class Trainer:
    """Everything a step needs; ``unet`` holds the online weights, ``ema_unet`` the averaged ones."""

    cfg: DictConfig
    device: torch.device
    data: torch.utils.data.Dataset
    unet: UNet2DModel
    ema_unet: UNet2DModel
    ema: EMAModel
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws batches, timesteps and noise (CPU, so a run repeats on any device)
    step: int = 0

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """The noise-prediction loss of one batch, with t and eps drawn from the trainer's generator."""
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator)
        x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
        xt = self.noise_scheduler.add_noise(x0, eps, t)
        if self.cfg.snr_gamma is None:
            return torch.nn.functional.mse_loss(self.unet(xt, t).sample, eps)
        per_sample = torch.nn.functional.mse_loss(self.unet(xt, t).sample, eps, reduction="none").mean(dim=(1, 2, 3))
        return (snr_weights(self.noise_scheduler, t, self.cfg.snr_gamma) * per_sample).mean()

    def train_step(self) -> float:
        """One optimiser step on a random batch; returns its loss."""
        index = torch.randint(0, len(self.data), (self.cfg.batch_size,), generator=self.generator)
        self.unet.train()
        loss = self.loss(batch_of(self.data, index))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.step(self.unet.parameters())
        self.step += 1
        return loss.item()

    def ema_model(self) -> UNet2DModel:
        self.ema.copy_to(self.ema_unet.parameters())
        return self.ema_unet

    @torch.no_grad()
    def samples(self, n: int, steps: int, scheduler: str = "dpmsolver", seed: int = 0) -> torch.Tensor:
        """``n`` samples of the EMA model, with diffexp's own loop and the fixed noise of seeds seed..seed+n-1."""
        model = self.ema_model().eval()
        built = build_scheduler(scheduler, dict(self.noise_scheduler.config), {}, seed=seed)
        shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        noise, generators = initial_noise(shape, seed, n, self.device)
        final = sample(
            iter_steps(lambda x, t: model(x, t).sample, built.scheduler, noise, steps, generators, built.step_kwargs)
        )
        return final.x.clamp(-1, 1).cpu()

    def pipeline(self) -> DDPMPipeline:
        return DDPMPipeline(unet=self.ema_model(), scheduler=self.noise_scheduler)

    def save(self, folder: Path) -> Path:
        """A checkpoint: the EMA pipeline (for sampling and resuming) and the training state, written atomically."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.pipeline().save_pretrained(tmp)
        ema_state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}  # = unet/ weights
        state = {
            "step": self.step,
            "unet": self.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": ema_state,
            "generator": self.generator.get_state(),
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder


def _optimizer(cfg: DictConfig, unet: UNet2DModel) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        lr_scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
    except ValueError as err:
        raise DiffexpError(f"lr_schedule={cfg.lr_schedule}: {err}") from None
    return optimizer, lr_scheduler


def new_trainer(cfg: DictConfig, device: torch.device) -> Trainer:
    """A trainer at step 0: a fresh UNet (initialised from ``seed``) and the configured noise schedule."""
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    return _assemble(cfg, device, unet, ema_unet, dict(OmegaConf.to_container(cfg.noise_schedule, resolve=True)))


def resume_trainer(cfg: DictConfig, device: torch.device, checkpoint: Path) -> Trainer:
    """The trainer as ``checkpoint`` saved it. Its pipeline loads through ``load_pretrained``, as sampling does."""
    ema_unet, scheduler_config = models.load_pretrained(str(checkpoint))
    ema_unet = ema_unet.to(device).requires_grad_(False)
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    unet = UNet2DModel.from_config(ema_unet.config).to(device)
    unet.load_state_dict(state["unet"])
    trainer = _assemble(cfg, device, unet, ema_unet, scheduler_config)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.generator.set_state(state["generator"])
    trainer.step = state["step"]
    return trainer


def _assemble(
    cfg: DictConfig, device: torch.device, unet: UNet2DModel, ema_unet: UNet2DModel, scheduler_config: dict[str, Any]
) -> Trainer:
    data = load_dataset(cfg.dataset)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    optimizer, lr_scheduler = _optimizer(cfg, unet)
    ema = EMAModel(ema_unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    return Trainer(cfg, device, data, unet, ema_unet, ema, noise_scheduler, optimizer, lr_scheduler, generator)


def checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a ``.tmp`` folder is a save that never finished)."""
    folder = Path(out_dir) / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted((p for p in found if (p / STATE_FILE).exists()), key=lambda p: p.name)


# ---------------------------------------------------------------------------------------------- loop


def train(cfg: DictConfig, out_dir: Path, loggers: Sequence[TrainLogger] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says into ``out_dir`` (resuming from its last checkpoint); returns the summary."""
    out_dir = Path(out_dir)
    check_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoints(out_dir)[-1:] if cfg.resume else []
    trainer = resume_trainer(cfg, device, last[0]) if last else new_trainer(cfg, device)
    if last:
        log.info("resuming from %s (step %d)", last[0], trainer.step)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    status: dict[str, Any] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": trainer.step}
    write_json(out_dir / "status.json", status)
    everyone: list[TrainLogger] = [JsonlLogger(out_dir), *loggers]
    if cfg.get("logger") is not None:
        from diffexp.tracking import TrainRun

        resolved = OmegaConf.to_container(cfg, resolve=True)
        everyone.append(TrainRun(cfg.logger, out_dir, cfg.name, resolved | {"resumed_at_step": trainer.step}))
    start_step, start = trainer.step, time.perf_counter()
    error: BaseException | None = None
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc=cfg.name, unit="step", disable=not cfg.progress)
    try:
        running = []
        while trainer.step < cfg.steps:
            loss = trainer.train_step()
            if not math.isfinite(loss):
                raise DiffexpError(f"The loss became {loss} at step {trainer.step}; try a lower lr.")
            running.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            step, done = trainer.step, trainer.step == cfg.steps
            images = None
            if cfg.sample_every and (step % cfg.sample_every == 0 or done):
                images = {"samples": trainer.samples(cfg.sample_batch, cfg.sample_steps, cfg.sample_scheduler)}
            if step % cfg.log_every == 0 or done or images:
                metrics = {
                    "loss": sum(running) / len(running),
                    "lr": trainer.lr_scheduler.get_last_lr()[0],
                    "ema_decay": trainer.ema.cur_decay_value or 0.0,
                    "elapsed_s": time.perf_counter() - start,
                }
                running = []
                for lg in everyone:
                    lg.log(metrics, step, images)
            if step % cfg.checkpoint_every == 0 or done:
                trainer.save(out_dir / "checkpoints" / f"step-{step:06d}")
                for old in checkpoints(out_dir)[: -cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        bar.close()
        model_dir = out_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        trainer.pipeline().save_pretrained(model_dir)
        elapsed = time.perf_counter() - start
        summary = {
            "status": "finished",
            "steps": trainer.step,
            "steps_this_session": trainer.step - start_step,
            "wall_s": elapsed,
            "step_s": elapsed / max(trainer.step - start_step, 1),
            "parameters": sum(p.numel() for p in trainer.unet.parameters()),
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "model": str(model_dir),
        }
        write_json(out_dir / "summary.json", summary)
        status.update(status="finished", step=trainer.step, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json(out_dir / "status.json", status)
        return summary
    except BaseException as err:
        error = err
        kind = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        status.update(status=kind, step=trainer.step, error=str(err) or type(err).__name__)
        write_json(out_dir / "status.json", status)
        raise
    finally:
        bar.close()
        for lg in everyone:
            try:
                lg.close(error)
            except Exception as close_err:
                log.warning("logger %s failed to close: %s (%s)", type(lg).__name__, close_err, error)
