"""Where the samples land among the training images, on digits-ideal (meaningful at std 0, where the data is the
images): ``nn_dist``, ``hit_rate``, ``basin_mismatch`` and ``class_hist_distance``."""

from __future__ import annotations

import math
from typing import Any

import torch

from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.sampling.ideal import DigitsIdealDenoiser, digits_labels
from diffexp.sampling.loop import StepState


def nearest(x: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample RMSE to the nearest training image, and its index."""
    flat = x.reshape(len(x), -1).double()
    d = torch.cdist(flat[None], images.double()[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    dist, index = d.min(dim=1)
    return dist / math.sqrt(flat.shape[1]), index


def landing(
    dist: torch.Tensor,
    index: torch.Tensor,
    labels: torch.Tensor,
    hit_tol: float,
    ref_index: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Where the samples land among the training images (meaningful at std 0, where the data is the images), from
    each sample's RMSE to its nearest training image (``dist``), that image's ``index`` and the reference sample's.

    - nn_dist: mean over samples of the RMSE to the nearest training image
    - hit_rate: fraction of samples within ``hit_tol`` of a training image
    - basin_mismatch: fraction whose nearest training image differs from the reference sample's
    - class_hist_distance: total variation distance, 0.5 * sum_c |p_c - q_c|, between the digit classes of the
      landed samples and of the training set (0: same proportions, 1: disjoint); None if nothing landed.
      With n landed samples it is about 1.2 / sqrt(n) by chance alone (10 classes of about 10% each).
    """
    hits = dist <= hit_tol
    out: dict[str, Any] = {
        "nn_dist": dist.mean().item(),
        "nn_dist_max": dist.max().item(),
        "hit_rate": hits.double().mean().item(),
        "hit_tol": hit_tol,
        "basin_mismatch": None,
        "class_hist_distance": None,
        "landed_classes": None,
    }
    if ref_index is not None:
        out["basin_mismatch"] = (ref_index != index).double().mean().item()
    if hits.any():
        landed = torch.bincount(labels[index[hits]], minlength=10).double()
        train = torch.bincount(labels, minlength=10).double()
        out["class_hist_distance"] = 0.5 * (landed / landed.sum() - train / train.sum()).abs().sum().item()
        out["landed_classes"] = landed.long().tolist()
    return out


class Landing(Metric):
    """``metrics.landing`` on digits-ideal: nearest training image, hits and basins (with a reference)."""

    name = "landing"
    keys = (
        Key("nn_dist", "lower"),
        Key("nn_dist_max"),
        Key("hit_rate", "higher"),
        Key("hit_tol"),
        Key("basin_mismatch", "lower"),
        Key("class_hist_distance"),  # compare only at equal n: about 1.2 / sqrt(n) by chance alone
        Key("landed_classes"),
        Key("ideal_std"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return ctx.settings.landing and isinstance(ctx.run.model.model, DigitsIdealDenoiser)

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        images = self.ctx.run.model.model.images
        dist, index = nearest(final.x.float().cpu(), images)
        values = {"dist": dist, "index": index}
        if self.ctx.reference is not None:  # this chunk's, solved by ReferenceAgreement just before
            values["ref_index"] = nearest(self.ctx.reference.x, images)[1]
        return values

    def final(self, values: Values) -> dict[str, Any]:
        ideal = self.ctx.run.model.model
        hit_tol = self.ctx.settings.hit_tol
        out = landing(values["dist"], values["index"], digits_labels(), hit_tol, values.get("ref_index"))
        return out | {"ideal_std": float(ideal.config.std)}
