"""Is a batch of samples a batch of digits? Class coverage, classifier confidence and copying, for 1x32x32 samples.

- Classes: a logistic regression on the 8x8 scikit-learn digits reads each sample, area-averaged back to 8x8.
- Confidence: the fraction of samples it gives one class with probability >= ``threshold`` (a proxy for "readable").
- Copying: each sample's RMS distance to its nearest training image, against the same distance between distinct
  training images; a copy would sit at about 0.
- Recognisable: confident and no farther from the training images than twice their own spacing (the classifier
  is confident about much that is not a digit, e.g. noise, so confidence alone is not enough).

python -m diffexp.metrics.digits_quality RUN_DIR   (reads RUN_DIR/samples.npy, prints JSON)
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffexp.sampling.ideal import digits_images, digits_labels


def to_8x8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 1, H, W) -> (N, 64) on the scikit-learn scale 0..16, by area averaging."""
    small = F.adaptive_avg_pool2d(x.float().clamp(-1, 1), 8)
    return ((small + 1) / 2 * 16).flatten(1).numpy()


@functools.cache
def digit_classifier() -> Any:
    """Logistic regression on the 1797 digits, seen as a 32x32 model sees them (area-averaged to 8x8)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # a small problem: more BLAS threads only contend
        return LogisticRegression(max_iter=5000).fit(to_8x8(digits_images(32)), digits_labels().numpy())


def nearest_distances(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """RMS (per pixel) distance from each sample to its nearest reference image."""
    d = torch.cdist(x.flatten(1).double(), reference.flatten(1).double())
    return d.min(dim=1).values / x[0].numel() ** 0.5


@functools.cache
def training_spacing(sample_size: int = 32) -> float:
    """Median RMS distance from a training image to its nearest distinct training image."""
    y = digits_images(sample_size).flatten(1).double()
    d = torch.cdist(y, y)
    d[d < 1e-9] = float("inf")  # itself (and exact duplicates)
    return (d.min(dim=1).values / y.shape[1] ** 0.5).median().item()


def digits_quality(x: torch.Tensor, threshold: float = 0.9) -> dict[str, Any]:
    """Class counts, confident fraction and nearest-training-image distances of samples x in [-1, 1]."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"digits_quality needs (N, 1, H, W) samples, got {tuple(x.shape)}")
    proba = digit_classifier().predict_proba(to_8x8(x))
    classes = proba.argmax(axis=1)
    counts = np.bincount(classes, minlength=10)
    nn = nearest_distances(x, digits_images(x.shape[-1]))
    spacing = training_spacing(x.shape[-1])
    confident = proba.max(axis=1) >= threshold
    return {
        "n": len(x),
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
        "confident_fraction": float(confident.mean()),
        "recognisable_fraction": float((confident & (nn.numpy() <= 2 * spacing)).mean()),
        "nn_distance_median": nn.median().item(),
        "nn_distance_min": nn.min().item(),
        "training_spacing_median": spacing,
    }


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    samples = torch.from_numpy(np.load(run_dir / "samples.npy"))
    print(json.dumps(digits_quality(samples), indent=2))
