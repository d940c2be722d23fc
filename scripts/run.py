"""Sample with one model and one scheduler: python scripts/run.py scheduler=ddim steps=30

A sweep: python scripts/run.py -m scheduler=ddim,dpmsolver steps=10,20 (see diffexp/sweep/). The command runs
under a small supervisor process (diffexp/sweep/supervisor.py), so that a sweep outlives a job the kernel kills.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import diffexp.catalog  # noqa: F401  (registers the schema and resolvers; light, so config errors come fast)
from diffexp.errors import exit_on_error
from diffexp.signals import stop_on_signals
from diffexp.sweep.supervisor import supervise, supervised

log = logging.getLogger("diffexp")


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
def main(cfg: DictConfig) -> dict | None:
    from diffexp.runner.run import run  # torch and diffusers load only once the config is valid
    from diffexp.sweep.jobs import run_job

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_job(cfg, out_dir)  # a failed job is recorded in its folder; the others still run
    with exit_on_error(out_dir):
        m = run(cfg, out_dir)
    log.info(
        "finished %s: %d steps, %d model calls, %.2f s -> %s", m["label"], m["steps"], m["nfe"], m["wall_s"], out_dir
    )


if __name__ == "__main__":
    if not supervised():
        sys.exit(supervise(__file__, sys.argv[1:]))
    with stop_on_signals("each run folder records it (status interrupted)"):  # SIGTERM, SIGUSR2 act as Ctrl-C
        main()
