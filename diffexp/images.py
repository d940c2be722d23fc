"""Tensors to pictures, with the pipelines' conversion so every grid shares one value range."""

from __future__ import annotations

import base64
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


MIN_TILE = 128  # pixels: PNG and W&B grids enlarge smaller images (digits: 32 px) by a whole factor, nearest


def grid(x: torch.Tensor, nrow: int | None = None, min_tile: int = 0) -> Image.Image:
    """One image holding the batch, side by side (about square for larger batches); each image enlarged by the
    smallest whole factor (nearest neighbour: every pixel stays a sharp square) that makes it ``min_tile`` wide."""
    n = x.shape[0]
    nrow = nrow or (n if n <= 8 else int(np.ceil(np.sqrt(n))))
    pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2)
    factor = -(-min_tile // min(pixels.shape[-2:]))  # ceil
    if factor > 1:
        pixels = pixels.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    g = make_grid(pixels, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    return Image.fromarray(g[..., 0] if g.shape[-1] == 1 or x.shape[1] == 1 else g)


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """The batch as one PNG, tiles at least ``MIN_TILE`` pixels, written atomically."""
    with atomic(path) as tmp:
        grid(x, nrow, MIN_TILE).save(tmp, compress_level=1)  # fast: grids are small, written at every snapshot
    return path


def png_data_uri(path: Path) -> str:
    """A PNG file as a data URI: a page that embeds it needs nothing beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
