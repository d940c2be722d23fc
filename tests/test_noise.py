"""Residual noise and the recognisable rule of label_accuracy, on constructed cases: real digits against the same
digits with a little Gaussian noise, chunked and whole."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from diffexp.config import MetricsConfig
from diffexp.metrics.labels import LabelAccuracy
from diffexp.metrics.residual_noise import STATS_KEY, ResidualNoise, digits_limit, energy
from diffexp.sampling.ideal import digits_images, digits_labels


def noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def context(model: str = "digits-cond", real: str = "digits", channels: int = 1) -> Any:
    """What the metrics read of a run: its model's name and sample shape, and the metrics settings."""
    settings = MetricsConfig()
    settings.fid.real = real
    loaded = SimpleNamespace(name=model, null_class=10, sample_shape=(channels, 32, 32))
    run = SimpleNamespace(model=loaded, pixel_shape=(channels, 32, 32), first=SimpleNamespace(labels=(0, 1)))
    return SimpleNamespace(run=run, settings=settings)


def measured(metric: Any, x: torch.Tensor, labels: torch.Tensor | None = None, chunks: int = 1) -> dict[str, Any]:
    """``final`` of ``metric`` over x measured in ``chunks`` pieces, as a run concatenates chunk values."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in torch.arange(len(x)).chunk(chunks):
        chunk = SimpleNamespace(labels=None if labels is None else tuple(labels[i].tolist()))
        for k, v in metric.measure(chunk, SimpleNamespace(x_pixels=x[i])).items():
            parts.setdefault(k, []).append(v)
    return metric.final({k: torch.cat(v) for k, v in parts.items()})


def test_real_digits_are_clean_and_slightly_noisy_digits_are_not() -> None:
    x = digits_images(32)
    metric = ResidualNoise(context())
    real, grainy = measured(metric, x), measured(metric, noisy(x, 0.05))
    assert real["noisy_share"] == pytest.approx(0.01, abs=0.002)  # the limit is the real set's 99th percentile
    assert real["residual_noise"] < 0.8 and real["residual_noise_real"] == "digits"
    assert grainy["noisy_share"] > 0.95 and grainy["residual_noise"] > 1.3
    # noise a quarter of a grey level per 8 bits is invisible: most samples stay under the limit
    assert measured(metric, noisy(x, 0.01))["noisy_share"] < 0.1


def test_energy_is_measured_at_32_pixels_whatever_the_resolution() -> None:
    x = digits_images(32)[:8]
    assert torch.allclose(energy(digits_images(64)[:8]), energy(x), rtol=0.15)  # the same digits, drawn at 64 px
    assert torch.allclose(energy(x.repeat(1, 3, 1, 1)), energy(x))  # colour: the grey image


def test_residual_noise_streams_two_chunks_as_one() -> None:
    x = torch.cat([digits_images(32)[:30], noisy(digits_images(32)[30:60], 0.04)])
    metric = ResidualNoise(context())
    assert measured(metric, x, chunks=2) == measured(metric, x, chunks=1)
    assert measured(metric, x, chunks=3)["noisy_share"] == pytest.approx(measured(metric, x)["noisy_share"])


def test_other_models_use_their_real_set_or_say_why_not(tmp_path: Path) -> None:
    x = digits_images(32)[:20].repeat(1, 3, 1, 1)
    left_out = measured(ResidualNoise(context("ddpm-cifar10-32", channels=3)), x)
    assert set(left_out) == {"residual_noise_left_out"} and "ddpm-cifar10-32" in left_out["residual_noise_left_out"]
    stats = tmp_path / "real.npz"
    np.savez(stats, mu=np.zeros(2), sigma=np.eye(2), **{STATS_KEY: np.array(digits_limit())})
    from_stats = measured(ResidualNoise(context("ddpm-cifar10-32", str(stats), channels=3)), x)
    assert from_stats["residual_noise_real"] == str(stats) and from_stats["noisy_share"] < 0.2
    without = tmp_path / "old.npz"
    np.savez(without, mu=np.zeros(2), sigma=np.eye(2))
    assert STATS_KEY in measured(ResidualNoise(context("ddpm-cifar10-32", str(without))), x)["residual_noise_left_out"]


def test_label_accuracy_counts_only_recognisable_samples() -> None:
    x, labels = digits_images(32)[:100], digits_labels()[:100]
    metric = LabelAccuracy(context())
    clean = measured(metric, x, labels, chunks=2)
    assert clean["recognisable"] >= 0.9 and clean["label_accuracy"] >= 0.9
    grainy = measured(metric, noisy(x, 0.06), labels, chunks=2)
    # the classifier still reads most grainy digits right, but none counts: each is above the noise limit
    assert grainy["label_agreement"] >= 0.8
    assert grainy["recognisable"] <= 0.05 and grainy["label_accuracy"] <= 0.05
