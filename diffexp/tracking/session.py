"""The W&B session policy: every run is a W&B run, offline by itself, and never blocks or spoils local results.

``start_run`` and ``finish_run`` serve sampling, sweeps and training alike through the ``logger`` config. The
run folder stays the source of truth: a W&B failure is reported and the run goes on without W&B. Each run is
finished in a ``finally``, with exit code 1 after a failure, and ``reinit="finish_previous"`` closes any run a
crashed job left open, so nothing leaks into the next job of a multirun. (``start_method="thread"`` is gone
since wandb 0.29: every process talks to its own wandb-core service.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffexp.config import LoggerConfig, WandbMode
from diffexp.images import MIN_TILE, grid

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger("diffexp")


def has_credentials() -> bool:
    """Whether W&B would find credentials (WANDB_API_KEY, netrc, identity token), without prompting or network.

    ``wandb.login(prompt=False)`` would also look up the user on the server, which blocks while it is unreachable.
    """
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    try:
        host = wandb_setup.singleton().settings.base_url
        found = wbauth.authenticate_session(host=host, source="diffexp", prompt=False, update_session=False)
    except Exception:  # a malformed key is still a key: wandb.init reports what is wrong with it
        return True
    return found is not None


def resolve_mode(mode: WandbMode | str | None) -> tuple[str | None, str | None]:
    """The mode for ``wandb.init`` and, for offline runs, why: the config, then WANDB_MODE, then the credentials.

    Without ``mode``, WANDB_MODE or an API key, the run is offline rather than waiting at a login prompt.
    """
    if mode is not None:
        mode = getattr(mode, "value", mode)
        return mode, f"logger.mode={mode}" if mode == "offline" else None
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if not has_credentials():
        return "offline", "no W&B API key is configured"
    return None, None


def sweep_group(experiment: str | None, sweep_dir: Path | None) -> str | None:
    """``<experiment>-<sweep folder>``, so that a sweep's runs (and its comparison) are grouped."""
    return "-".join(p for p in (experiment, sweep_dir.name if sweep_dir else None) if p) or None


def default_group() -> str | None:
    """The experiment and sweep name of the Hydra job this process runs, if any."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    multirun = hydra.mode == RunMode.MULTIRUN
    return sweep_group(hydra.runtime.choices.get("experiment"), Path(hydra.sweep.dir) if multirun else None)


def reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def start_run(
    logger_cfg: LoggerConfig | Any | None,
    run_dir: Path,
    name: str,
    job_type: str,
    config: dict[str, Any],
    group: str | None = None,
    run_id: str | None = None,
) -> Run | None:
    """A W&B run whose files go in ``run_dir/wandb``; None when logging is off or W&B cannot start.

    ``name``, ``job_type`` and ``group`` are the defaults for ``logger.name``, ``logger.job_type`` and
    ``logger.group`` (whose own default is the Hydra job's sweep). Setup gives up after
    ``logger.init_timeout`` seconds; the caller goes on without W&B, and this says so once on the terminal.
    ``run_id`` resumes that W&B run (a resumed training), so its curves stay one run.
    """
    if logger_cfg is None:
        return None
    run_dir = Path(run_dir)
    try:
        import wandb

        mode, offline_reason = resolve_mode(logger_cfg.mode)
        run_dir.mkdir(parents=True, exist_ok=True)
        options = init_options(logger_cfg, run_dir, name, job_type, config, group, run_id)
        run = wandb.init(mode=mode, **options)
        announce(run, offline_reason)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) while W&B waits for its server: stop now, not at its timeout
        stop_service()
        raise
    except Exception as err:
        log.warning(
            "W&B could not start (%s). This run goes on without W&B; its folder %s has every result "
            "(logger.mode=offline logs offline, for `wandb sync` later).",
            reason(err),
            run_dir,
        )
        return None
    return run


def init_options(
    logger_cfg: LoggerConfig | Any,
    run_dir: Path,
    name: str,
    job_type: str,
    config: dict[str, Any],
    group: str | None,
    run_id: str | None,
) -> dict[str, Any]:
    """``wandb.init``'s arguments: the logger's settings, else the caller's defaults; a run id resumes that run."""
    import wandb

    return {
        "project": logger_cfg.project,
        "entity": logger_cfg.entity,
        "group": logger_cfg.group or group or default_group(),
        "name": logger_cfg.name or name,
        "tags": list(logger_cfg.tags),
        "job_type": logger_cfg.job_type or job_type,
        "config": config,
        "dir": run_dir,
        "reinit": "finish_previous",  # a run a crashed job left open never takes this job's data
        "id": run_id,
        "resume": "allow" if run_id else None,
        "settings": wandb.Settings(
            init_timeout=float(logger_cfg.init_timeout),
            finish_timeout=float(logger_cfg.finish_timeout),
            silent=True,  # diffexp says what matters below; W&B's banner would look up the user, unbounded
        ),
    }


def announce(run: Run, offline_reason: str | None) -> None:
    """Say once where the run's data goes: the offline folder and how to upload it, or the run's page."""
    if run.offline:
        log.info(
            "W&B: %s, so this run is logged offline in %s. Upload it later with: wandb sync %s",
            offline_reason or "offline mode",
            run.settings.sync_dir,
            run.settings.sync_dir,
        )
    elif run.url:
        log.info("W&B: %s", run.url)


def stop_service() -> None:
    """End this process's wandb-core service at once. Without this, an interrupted ``wandb.init`` leaves the
    service waiting for the server, and the process's exit waits for the service: up to ``init_timeout``."""
    try:
        from wandb.sdk import wandb_setup

        connection = wandb_setup.singleton()._connection  # wandb 0.31's own handles; the service is our child
        if connection is not None and connection._proc is not None:
            connection._proc._process.kill()  # after Ctrl-C it may ignore SIGTERM while it waits
            if connection._cleanup is not None:
                connection._cleanup()  # no teardown at exit: it would wait for the service
    except Exception as err:  # another wandb version: the exit only takes longer
        log.debug("could not stop the W&B service: %s", err)


def finish_run(run: Run | None, error: BaseException | None = None) -> None:
    """Finish ``run`` with exit code 0, or 1 after ``error`` so that W&B marks it failed. Never raises."""
    if run is None:
        return
    try:
        if error is not None:
            kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            run.summary.update({"status": kind, "error": reason(error)})
        run.finish(exit_code=0 if error is None else 1)
    except Exception as err:
        log.warning("W&B could not finish the run cleanly (%s); the run folder is complete.", reason(err))


def image(x: torch.Tensor) -> Any:
    """A batch as one ``wandb.Image`` grid, with the pipelines' value range and tile size like the PNGs in the run
    folder."""
    import wandb

    return wandb.Image(grid(x, min_tile=MIN_TILE))
