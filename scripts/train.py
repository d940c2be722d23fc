"""Train a UNet2DModel: python scripts/train.py [dataset=folder dataset.path=DIR] [steps=N]"""

import logging
from pathlib import Path

from diffexp.startup import defer_collection

if __name__ == "__main__":
    defer_collection()  # until the first training step (diffexp/startup.py)

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffexp.errors import exit_on_error
from diffexp.signals import stop_on_signals
from diffexp.targets import guard_hydra
from diffexp.training.config import register

log = logging.getLogger("diffexp")
guard_hydra()  # Hydra builds hydra.callbacks and its logging config itself: each is checked first


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from diffexp.training.loop import train  # torch and diffusers load only once the config is valid

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_error(out_dir):
        s = train(cfg, out_dir)
    log.info("finished %d steps in %.0f s (%.2f s/step) -> %s", s["steps"], s["wall_s"], s["step_s"], s["model"])


if __name__ == "__main__":
    register()  # the training schema
    with stop_on_signals("the training folder records it (status interrupted); run again to resume"):
        main()
