"""Train a UNet2DModel: python scripts/train.py [dataset=folder dataset.path=DIR] [steps=N]"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import diffexp.train  # registers the schema; the training loop
from diffexp.errors import DiffexpError, exit_with

log = logging.getLogger("diffexp")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = diffexp.train.train(cfg, out_dir)
    except DiffexpError as err:
        exit_with(err, out_dir)
    log.info(
        "finished %d steps in %.0f s (%.2f s/step) -> %s",
        summary["steps"],
        summary["wall_s"],
        summary["step_s"],
        summary["model"],
    )


if __name__ == "__main__":
    main()
