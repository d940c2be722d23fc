"""One job of a sweep: a failed job never takes the others down, and a re-run skips finished jobs."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from diffexp.errors import DiffexpError
from diffexp.folders import METRICS_FILE, RunStatus, mark_failed, read_json, read_status

log = logging.getLogger("diffexp")


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """One job of a sweep. Never raises for a failed run: the failure is recorded in its folder and returned,
    so the remaining jobs still run. A job that finished before with the same config is skipped."""
    import torch

    from diffexp.runner.claim import FolderTaken
    from diffexp.runner.run import run

    out_dir = Path(out_dir)
    done = finished_metrics(cfg, out_dir)
    if done is not None:
        log.info("skipped: %s finished before in %s", done.get("label"), out_dir)
        return done
    try:
        return run(cfg, out_dir)
    except Exception as err:  # a bad combination, NaN, out of memory: this job only
        if isinstance(err, DiffexpError):
            log.error("%s", err)
        else:
            log.exception("the run failed")
        if not isinstance(err, FolderTaken) and read_status(out_dir) != RunStatus.failed:  # never another run's
            mark_failed(out_dir, err)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory of a failed (e.g. out-of-memory) run back to the next job
        return {"status": RunStatus.failed.value, "error": str(err), "error_type": type(err).__name__}


def finished_metrics(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run that finished in ``out_dir`` with this very config, else None."""
    metrics = read_json(out_dir / METRICS_FILE) if read_status(out_dir) == RunStatus.finished else None
    if metrics is None:
        return None
    stored = yaml.safe_load((out_dir / "config.yaml").read_text())
    current = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    for c in (stored, current):
        c.pop("progress", None)  # display only
    if stored != current:
        log.warning("%s holds a finished run of another config: running it again", out_dir)
        return None
    return metrics
