"""Sample with one model and one scheduler: python scripts/run.py scheduler=ddim steps=30

A sweep: python scripts/run.py -m scheduler=ddim,dpmsolver steps=10,20 (see diffexp/sweep/). A command that can
sweep runs under a small supervisor process (diffexp/sweep/supervisor.py), so that a sweep outlives a job the
kernel kills.
Many samples over several processes: torchrun --nproc_per_node=K scripts/run.py num_samples=... (diffexp/runner/).
"""

import sys

from diffexp.startup import defer_collection
from diffexp.sweep.supervisor import may_sweep, supervise, supervised  # light: no torch, no Hydra

if __name__ == "__main__":
    if may_sweep(sys.argv[1:]) and not supervised():
        sys.exit(supervise(__file__, sys.argv[1:]))
    defer_collection()  # until the first model call (diffexp/startup.py)

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from diffexp.catalog import register
from diffexp.errors import DiffexpError, exit_on_error
from diffexp.folders import mark_failed, read_status_record
from diffexp.settings import read_settings
from diffexp.signals import stop_on_signals
from diffexp.targets import guard_hydra

log = logging.getLogger("diffexp")
guard_hydra()  # Hydra builds hydra.callbacks and its logging config itself: each is checked first


def unwritten(folder: Path) -> bool:
    """A folder with no run's status yet: a config error may be recorded there (never over another run)."""
    try:
        return read_status_record(folder) is None
    except Exception:  # a damaged status.json is some run's
        return False


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
def main(cfg: DictConfig) -> dict | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from diffexp.sweep.jobs import run_job

        return run_job(cfg, out_dir)  # a failed job is recorded in its folder; the others still run
    with exit_on_error(out_dir):
        try:
            settings = read_settings(cfg)  # before torch loads, so that a bad value fails in about a second
        except DiffexpError as err:
            if unwritten(out_dir):
                mark_failed(out_dir, err)
            raise
        from diffexp.runner.run import run  # torch and diffusers load only once the config is valid

        m = run(settings, out_dir)
    log.info(
        "finished %s: %d steps, %d model calls, %.2f s -> %s", m["label"], m["steps"], m["nfe"], m["wall_s"], out_dir
    )


if __name__ == "__main__":
    register()  # the schema and the resolvers the configs use
    with stop_on_signals("each run folder records it (status interrupted)"):  # SIGTERM, SIGUSR2 act as Ctrl-C
        main()
