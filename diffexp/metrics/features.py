"""FID/KID feature networks: features of a batch of images in [-1, 1], whichever network.

- ``digits``: a small digits classifier whose penultimate layer is diffexp's offline feature space. Trained by
  ``scripts/train_features.py`` on the scikit-learn digits at 32x32 and shipped in
  ``diffexp/weights/digits-features/model.safetensors`` (about 400 KB). FID in this space measures digit-likeness
  and class balance of 1x32x32 samples; its values are not comparable with Inception FID.
- ``inception``: torch-fidelity's InceptionV3, the standard FID network (diffexp/metrics/inception.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import nn

from diffexp.config import WEIGHTS_DIR, FidConfig, FidFeatures
from diffexp.errors import DiffexpError
from diffexp.metrics.inception import load_inception

WEIGHTS = WEIGHTS_DIR / "digits-features" / "model.safetensors"
SIZE = 32  # the classifier's input resolution; other sizes are resized


class DigitsFeatures(nn.Module):
    """Images in [-1, 1], (N, C, H, W) -> features (N, num_features); ``classify`` gives the digit logits."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Linear(128, self.num_features)
        self.head = nn.Linear(self.num_features, 10)
        # set after training: the features of the real digits then have mean 0 and std 1 in every dimension
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Grey, 32x32, in [-1, 1]: colour images are averaged over channels, other sizes resized."""
        x = x.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(-1, 1)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(self.prepare(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The FID/KID features: the embedding, standardised on the real digits."""
        return (self.embedding(x) - self.feature_mean) / self.feature_std

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embedding(x)))


def load_digits_features(path: Path = WEIGHTS) -> tuple[DigitsFeatures, dict[str, str]]:
    """The shipped network in eval mode, and the metadata its training script stored with the weights
    (plus ``sha256`` of the file, so that FID values name the exact network)."""
    if not path.exists():
        raise DiffexpError(
            f"The digits feature network {path} is missing; train it with `python scripts/train_features.py`."
        )
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    net = DigitsFeatures()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False), metadata


def feature_name(metadata: dict[str, str]) -> str:
    """``digits-cnn@<first 8 hex of the file's sha256>``: FID values are comparable only under one name."""
    return f"digits-cnn@{metadata.get('sha256', '?')[:8]}"


@dataclass
class FeatureNet:
    """A feature network on its device and its name, recorded as ``fid_features`` (network and dimension)."""

    module: nn.Module
    name: str

    @property
    def dim(self) -> int:
        return int(self.module.num_features)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def features(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Features (N, dim) of images (N, C, H, W) in [-1, 1], on the CPU in float64."""
        with torch.inference_mode():
            return torch.cat([self.module(b).double().cpu() for b in batches(x, self.device, batch)])


def batches(x: torch.Tensor, device: torch.device, size: int = 256) -> Iterator[torch.Tensor]:
    """``x`` in slices of ``size``, each moved to ``device``."""
    for i in range(0, len(x), size):
        yield x[i : i + size].to(device)


def feature_net(cfg: FidConfig | DictConfig, device: torch.device, cache_dir: Path) -> FeatureNet:
    """The configured feature network, or a clear error saying why it can't be had."""
    if FidFeatures(cfg.features) == FidFeatures.digits:
        net, metadata = load_digits_features()
        return FeatureNet(net.to(device), f"{feature_name(metadata)} {net.num_features}")
    module, name = load_inception(cfg.inception_weights, cache_dir)
    return FeatureNet(module.to(device), name)
