"""The trainer: the network, its EMA copy, the optimiser and the generator, one step at a time, and checkpoints.

The objective is diffexp.training.objective; the networks (UNet, DiT) are diffexp.training.networks. A
class-conditional network (``num_classes: C``) gets C + 1 class embeddings: ids 0..C-1 are the classes and id C, the
last, is the null class that label dropout trains.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.sampling import models
from diffexp.sampling.adapters import pixel_adapter
from diffexp.sampling.flow import FLOW_PREDICTION, is_flow
from diffexp.sampling.loop import initial_noise, iter_steps, sample
from diffexp.sampling.schedulers import build_scheduler
from diffexp.training.config import check_resumable
from diffexp.training.data import batch_of, load_dataset
from diffexp.training.networks import (
    NoiseScheduler,
    build_network,
    build_noise_scheduler,
    pipeline_of,
    save_quietly,
    without_own_label_dropout,
)
from diffexp.training.objective import (
    drop_labels,
    flow_noised,
    flow_target,
    flow_timesteps,
    is_flow_objective,
    loss_target,
    snr_weights,
)

STATE_FILE = "training_state.pt"


@dataclass
class Trainer:
    """Everything a step needs; ``network`` holds the online weights, ``ema_network`` the averaged ones."""

    cfg: DictConfig
    device: torch.device
    data: torch.utils.data.Dataset
    network: torch.nn.Module
    ema_network: torch.nn.Module
    ema: EMAModel
    noise_scheduler: NoiseScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws batches, timesteps and noise (CPU, so a run repeats on any device)
    step: int = 0

    @property
    def num_classes(self) -> int | None:
        return self.cfg.num_classes

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample; flow_prediction for a FlowMatch noise schedule."""
        config = self.noise_scheduler.config
        return FLOW_PREDICTION if is_flow(config) else str(config.get("prediction_type") or "epsilon")

    def draw_timesteps(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t, sigma) of ``n`` samples: t uniform in 0..T-1 (sigma None), or a flow's (t, sigma) pair."""
        if not is_flow_objective(self.prediction_type):
            steps = self.noise_scheduler.config.num_train_timesteps
            return torch.randint(0, steps, (n,), generator=self.generator), None
        cfg = self.cfg
        sampling, mean, std = cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std
        return flow_timesteps(self.noise_scheduler, n, sampling, self.generator, mean, std)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch, with t, eps and then the label dropout drawn from the trainer's generator."""
        t, sigma = self.draw_timesteps(x0.shape[0])
        eps = torch.randn(x0.shape, generator=self.generator)
        kwargs = {}
        if self.num_classes:
            if labels is None:
                raise DiffexpError("a class-conditional model (num_classes) needs labels with every batch.")
            labels = drop_labels(labels, self.cfg.label_dropout, self.num_classes, self.generator)
            kwargs["class_labels"] = labels.to(self.device)
        x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
        if sigma is not None:  # the flow path
            xt, target = flow_noised(x0, eps, sigma), flow_target(x0, eps)
        else:
            xt = self.noise_scheduler.add_noise(x0, eps, t)
            target = loss_target(self.noise_scheduler, x0, eps, t, self.prediction_type)
        out = self.network(xt, t, **kwargs).sample
        if self.cfg.snr_gamma is None:
            return torch.nn.functional.mse_loss(out, target)
        per_sample = torch.nn.functional.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
        return (snr_weights(self.noise_scheduler, t, self.cfg.snr_gamma, self.prediction_type) * per_sample).mean()

    def train_step(self) -> float:
        """One optimiser step on a random batch; returns its loss."""
        index = torch.randint(0, len(self.data), (self.cfg.batch_size,), generator=self.generator)
        self.network.train()
        loss = self.loss(*batch_of(self.data, index))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.step(self.network.parameters())
        self.step += 1
        return loss.item()

    def ema_model(self) -> torch.nn.Module:
        self.ema.copy_to(self.ema_network.parameters())
        return self.ema_network

    @torch.no_grad()
    def samples(self, n: int, steps: int, scheduler: str = "dpmsolver", seed: int = 0) -> torch.Tensor:
        """``n`` samples of the EMA model, with diffexp's own loop and the fixed noise of seeds seed..seed+n-1;
        a class-conditional model draws sample k with label k mod num_classes, unguided."""
        model = self.ema_model().eval()
        built = build_scheduler(scheduler, dict(self.noise_scheduler.config), {}, seed=seed)
        shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        noise, generators = initial_noise(shape, seed, n, self.device)
        labels = [k % self.num_classes for k in range(n)] if self.num_classes else None
        denoiser = pixel_adapter(model, self.prediction_type, self.noise_scheduler.config, labels)
        final = sample(iter_steps(denoiser, built.scheduler, noise, steps, generators, built.step_kwargs))
        return final.x.clamp(-1, 1).cpu()

    def pipeline(self) -> DiffusionPipeline:
        return pipeline_of(self.ema_model(), self.noise_scheduler)

    def save_pipeline(self, folder: Path) -> None:
        """The EMA pipeline, less the scheduler options left at their defaults (timestep spacing, ...): a sampling
        scheduler built from it then uses its own defaults, as with the google/ddpm-* configs."""
        save_quietly(self.pipeline(), folder)
        defaults = set(self.noise_scheduler.config.get("_use_default_values", []))
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        config = {k: v for k, v in json.loads(path.read_text()).items() if k not in defaults}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def save(self, folder: Path) -> Path:
        """A checkpoint: the EMA pipeline (for sampling and resuming) and the training state, written atomically."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_pipeline(tmp)
        ema_state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}  # = the saved weights
        state = {
            "step": self.step,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": ema_state,
            "generator": self.generator.get_state(),
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder


CLASS_EMBEDDING = "class_embedding."  # UNet2DModel's label embedding (num_class_embeds)


def _optimizer(cfg: DictConfig, network: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        lr_scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
    except ValueError as err:
        raise DiffexpError(f"lr_schedule={cfg.lr_schedule}: {err}") from None
    return optimizer, lr_scheduler


def new_trainer(cfg: DictConfig, device: torch.device) -> Trainer:
    """A trainer at step 0: a fresh network (initialised from ``seed``) and the configured noise schedule."""
    torch.manual_seed(cfg.seed)
    network = build_network(cfg).to(device)
    if cfg.get("init_from"):
        _load_weights(cfg, network)
    ema_network = copy.deepcopy(network).requires_grad_(False)
    scheduler_config = dict(OmegaConf.to_container(cfg.noise_schedule, resolve=True))
    if not is_flow(scheduler_config):  # a FlowMatch config has no prediction type: it is always the velocity
        scheduler_config["prediction_type"] = cfg.prediction_type  # saved with the model
    return _assemble(cfg, device, network, ema_network, scheduler_config)


def _load_weights(cfg: DictConfig, network: torch.nn.Module) -> None:
    """``init_from``'s weights into ``network``: the same network and prediction type, or a DiffexpError. An
    unconditional UNet may start a class-conditional one: the class embedding, which it lacks, keeps its seeded
    initialisation (a zero one would leave every label the same at the start, and labels are learned far slower)."""
    start, scheduler_config = models.load_pretrained(str(cfg.init_from))
    found = models.prediction_type_of(scheduler_config)
    if found != cfg.prediction_type:
        raise DiffexpError(f"init_from={cfg.init_from} predicts {found}, not prediction_type={cfg.prediction_type}.")
    state = start.state_dict()
    extra = {k for k in network.state_dict() if k.startswith(CLASS_EMBEDDING) and k not in state}
    try:
        result = network.load_state_dict(state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != extra:
            keys = sorted(set(result.missing_keys) - extra) + result.unexpected_keys
            raise RuntimeError(f"missing or unexpected keys {', '.join(keys)}")
    except RuntimeError as err:
        reason = str(err).splitlines()[0]
        raise DiffexpError(
            f"init_from={cfg.init_from} is not the network of network={cfg.get('network', 'unet')}, its options and "
            f"num_classes: {reason}"
        ) from None


def resume_trainer(cfg: DictConfig, device: torch.device, checkpoint: Path) -> Trainer:
    """The trainer as ``checkpoint`` saved it. Its pipeline loads through ``load_pretrained``, as sampling does."""
    ema_network, scheduler_config = models.load_pretrained(str(checkpoint))
    ema_network = ema_network.to(device).requires_grad_(False)
    check_resumable(cfg, checkpoint, ema_network, scheduler_config)
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    network = type(ema_network).from_config(ema_network.config).to(device)
    network.load_state_dict(state["network"] if "network" in state else state["unet"])
    trainer = _assemble(cfg, device, network, ema_network, scheduler_config)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.generator.set_state(state["generator"])
    trainer.step = state["step"]
    return trainer


def _assemble(
    cfg: DictConfig,
    device: torch.device,
    network: torch.nn.Module,
    ema_network: torch.nn.Module,
    scheduler_config: dict[str, Any],
) -> Trainer:
    data = load_dataset(cfg.dataset, labels=bool(cfg.num_classes))
    without_own_label_dropout(network)  # a DiT loaded from a folder drops labels itself again
    optimizer, lr_scheduler = _optimizer(cfg, network)
    ema = EMAModel(ema_network.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    schedule = build_noise_scheduler(scheduler_config)
    return Trainer(cfg, device, data, network, ema_network, ema, schedule, optimizer, lr_scheduler, generator)


def checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a ``.tmp`` folder is a save that never finished)."""
    folder = Path(out_dir) / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted((p for p in found if (p / STATE_FILE).exists()), key=lambda p: p.name)
