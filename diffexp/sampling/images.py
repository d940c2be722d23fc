"""Tensors to pictures, with the pipelines' conversion so every grid shares one value range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from diffexp.folders import atomic


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, as diffusers' pipelines do: (v/2 + 0.5) clamped to [0, 1], x255, rounded."""
    v = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return (v * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(x: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """One image holding the batch, side by side (about square for larger batches)."""
    n = x.shape[0]
    nrow = nrow or (n if n <= 8 else int(np.ceil(np.sqrt(n))))
    pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2)
    g = make_grid(pixels, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    return Image.fromarray(g[..., 0] if g.shape[-1] == 1 or x.shape[1] == 1 else g)


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    with atomic(path) as tmp:
        grid(x, nrow).save(tmp)
    return path
