"""Train a UNet2DModel as ``configs/train.yaml`` says: ``train(cfg, out_dir)``.

The output folder holds ``checkpoints/step-NNNNNN/`` (a DDPMPipeline folder with the EMA weights, which
``model=local`` samples, plus ``training_state.pt``), ``model/`` (the final EMA pipeline), ``train.jsonl``,
``samples/`` and ``status.json`` (whose ``step`` follows every log step and checkpoint). A run started again in
the same folder resumes from its last readable checkpoint, and its W&B run with it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffexp.errors import DiffexpError
from diffexp.folders import (
    RunStatus,
    end_status,
    heartbeat,
    mark_failed,
    now,
    read_status_record,
    write_json,
    write_status,
)
from diffexp.sampling.device import device_name, resolve_device
from diffexp.sampling.flow import is_flow
from diffexp.sampling.schedulers import build_scheduler
from diffexp.startup import end_startup
from diffexp.training.config import check_config
from diffexp.training.loggers import JsonlLogger, TrainLogger, TrainRun
from diffexp.training.trainer import Trainer, checkpoints, new_trainer, resume_trainer

log = logging.getLogger("diffexp")


def train(cfg: DictConfig, out_dir: Path, loggers: Sequence[TrainLogger] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says into ``out_dir`` (resuming from its last checkpoint); returns the summary."""
    out_dir = Path(out_dir)
    try:
        check_config(cfg)
        check_sample_scheduler(cfg)
    except DiffexpError as err:  # before training: recorded, unless the folder holds an earlier training's status
        if read_status_record(out_dir) is None:
            mark_failed(out_dir, err)
        raise
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = (resume(cfg, device, out_dir) if cfg.resume else None) or new_trainer(cfg, device)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    progress = Progress.start(cfg, out_dir, trainer, loggers)
    end_startup()  # a command's start-up ends before the first step (diffexp/startup.py)
    error: BaseException | None = None
    try:
        while trainer.step < cfg.steps:
            # 1. one optimisation step of the denoising objective
            loss = trainer.train_step()
            # 2. the loss, sample grids and checkpoints, each on its own schedule
            progress.after_step(loss)
        return progress.finish(device)
    except BaseException as err:
        error = err
        end_status(out_dir, progress.status, err, step=trainer.step)
        raise
    finally:
        progress.close(error)


@dataclass
class Progress:
    """A training's bookkeeping, kept out of its loop: the bar, the loggers, the status file, checkpoints."""

    cfg: DictConfig
    out_dir: Path
    trainer: Trainer
    loggers: list[TrainLogger]
    status: dict[str, Any]
    bar: Any
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    running: list[float] = field(default_factory=list)  # losses since the last log

    @classmethod
    def start(cls, cfg: DictConfig, out_dir: Path, trainer: Trainer, loggers: Sequence[TrainLogger]) -> Progress:
        """The status file (running), the JSONL log, the W&B run (a resumed training resumes its W&B run)."""
        wandb_id = (read_status_record(out_dir) or {}).get("wandb_id") if trainer.step else None
        status = write_status(out_dir, RunStatus.running, started=now(), step=trainer.step)
        everyone: list[TrainLogger] = [JsonlLogger(out_dir), *loggers]
        if cfg.logger is not None:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            train_run = TrainRun(cfg.logger, out_dir, cfg.name, resolved | {"resumed_at_step": trainer.step}, wandb_id)
            everyone.append(train_run)
            if train_run.run is not None:  # one curve across resumes
                status = heartbeat(out_dir, status, wandb_id=train_run.run.id)
        bar = tqdm(total=cfg.steps, initial=trainer.step, desc=cfg.name, unit="step", disable=not cfg.progress)
        return cls(cfg, out_dir, trainer, everyone, status, bar, trainer.step)

    def after_step(self, loss: float) -> None:
        cfg, trainer = self.cfg, self.trainer
        if not math.isfinite(loss):
            raise DiffexpError(f"The loss became {loss} at step {trainer.step}; try a lower lr.")
        self.running.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        step, done = trainer.step, trainer.step == cfg.steps
        images = None
        if cfg.sample_every and (step % cfg.sample_every == 0 or done):
            images = {"samples": trainer.samples(cfg.sample_batch, cfg.sample_steps, cfg.sample_scheduler)}
        if step % cfg.log_every == 0 or done or images:
            metrics = {
                "loss": sum(self.running) / len(self.running),
                "lr": trainer.lr_scheduler.get_last_lr()[0],
                "ema_decay": trainer.ema.cur_decay_value or 0.0,
                "elapsed_s": time.perf_counter() - self.started,
            }
            self.running = []
            for lg in self.loggers:
                lg.log(metrics, step, images)
            self.status = heartbeat(self.out_dir, self.status, step=step)
        if step % cfg.checkpoint_every == 0 or done:
            trainer.save(self.out_dir / "checkpoints" / f"step-{step:06d}")
            for old in checkpoints(self.out_dir)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old)
            self.status = heartbeat(self.out_dir, self.status, step=step, checkpoint=step)

    def finish(self, device: torch.device) -> dict[str, Any]:
        """The EMA pipeline in ``model/``, the summary, the status finished."""
        self.bar.close()
        trainer, model_dir = self.trainer, self.out_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        trainer.save_pipeline(model_dir)
        elapsed = time.perf_counter() - self.started
        summary = {
            "status": RunStatus.finished.value,
            "steps": trainer.step,
            "steps_this_session": trainer.step - self.start_step,
            "wall_s": elapsed,
            "step_s": elapsed / max(trainer.step - self.start_step, 1),
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "model": str(model_dir),
        }
        write_json(self.out_dir / "summary.json", summary)
        end_status(self.out_dir, self.status, None, step=trainer.step)
        return summary

    def close(self, error: BaseException | None) -> None:
        self.bar.close()
        for lg in self.loggers:
            try:
                lg.close(error)
            except Exception as close_err:
                log.warning("logger %s failed to close: %s (%s)", type(lg).__name__, close_err, error)


def check_sample_scheduler(cfg: DictConfig) -> None:
    """The sample grids' scheduler and step count, built at start-up rather than at the first grid."""
    if not cfg.sample_every:
        return
    schedule = dict(OmegaConf.to_container(cfg.noise_schedule, resolve=True))
    if not is_flow(schedule):  # a FlowMatch config's prediction is always the velocity
        schedule["prediction_type"] = cfg.prediction_type
    built = build_scheduler(str(cfg.sample_scheduler), schedule)
    try:
        built.scheduler.set_timesteps(cfg.sample_steps)
    except (ValueError, IndexError) as err:
        raise DiffexpError(
            f"sample_scheduler={cfg.sample_scheduler} cannot run sample_steps={cfg.sample_steps}: {err}"
        ) from None


def resume(cfg: DictConfig, device: torch.device, out_dir: Path) -> Trainer | None:
    """The trainer of the newest checkpoint that loads, going back past unreadable ones (a save cut short, a
    corrupt training_state.pt); None without checkpoints; a clear refusal when none of them loads."""
    found = checkpoints(out_dir)
    for checkpoint in reversed(found):
        try:
            trainer = resume_trainer(cfg, device, checkpoint)
        except DiffexpError:
            raise  # another kind of model: not a damaged file
        except Exception as err:  # torch.load's and safetensors' errors for a damaged file
            log.warning("checkpoint %s cannot be read (%s); trying the one before", checkpoint, str(err)[:200])
            continue
        log.info("resuming from %s (step %d)", checkpoint, trainer.step)
        return trainer
    if found:
        raise DiffexpError(
            f"None of the checkpoints in {out_dir / 'checkpoints'} can be read ({', '.join(p.name for p in found)}). "
            "Move them away to train from scratch in this folder, or set resume=false or another name=..."
        )
    return None
