"""Train a UNet2DModel: python scripts/train.py [dataset=folder dataset.path=DIR] [steps=N]"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import diffexp.train  # registers the schema; the training loop
from diffexp.errors import DiffexpError

log = logging.getLogger("diffexp")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = diffexp.train.train(cfg, out_dir)
    except DiffexpError as err:
        log.error("%s", err)
        print(f"\ndiffexp: {err}\n(training folder: {out_dir})", file=sys.stderr)
        sys.exit(2)
    log.info(
        "finished %d steps in %.0f s (%.2f s/step) -> %s",
        summary["steps"],
        summary["wall_s"],
        summary["step_s"],
        summary["model"],
    )


if __name__ == "__main__":
    main()
