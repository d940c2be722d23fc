"""How good a run's samples are, computed once for files, W&B and the report.

- Agreement with the reference solution from the same noise (diffexp/reference.py): ``ref_rmse``, ``ref_psnr``
  and ``ref_ssim`` of the final samples, and ``x0_ref_rmse`` of every snapshot's x0, in [-1, 1] pixel units.
- On digits-ideal, where the samples land among the training images: ``nn_dist``, ``hit_rate``,
  ``basin_mismatch`` and ``class_hist_distance``.
- FID and KID (diffexp/fid.py).
- Always: the run's clipping and thresholding settings.
``RunMetrics`` does the expensive parts (reference solve, feature network) before sampling starts, so they are
never timed as sampling.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.regression import mean_squared_error

from diffexp.config import MetricsConfig, Precision
from diffexp.errors import DiffexpError
from diffexp.ideal import DigitsIdealDenoiser, digits_labels
from diffexp.reference import Reference, clipping, is_stochastic, solve_reference

log = logging.getLogger("diffexp")

DATA_RANGE = 2.0  # samples live in [-1, 1]
STOCHASTIC = "stochastic: reference from the same noise is not its target"


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Root-mean-square difference over every pixel of the batch, in [-1, 1] pixel units."""
    return mean_squared_error(x.double().flatten(), y.double().flatten(), squared=False).item()


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB over the batch, for the data range 2 of [-1, 1]: 20 log10(2 / rmse); identical gives inf."""
    return peak_signal_noise_ratio(x.double(), y.double(), data_range=DATA_RANGE).item()


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (torchmetrics, Gaussian window) for the data range 2 of [-1, 1]."""
    side = min(x.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # the window must fit the image
    return structural_similarity_index_measure(x.double(), y.double(), data_range=DATA_RANGE, kernel_size=kernel).item()


def reference_agreement(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"ref_rmse": rmse(x, ref), "ref_psnr": psnr(x, ref), "ref_ssim": ssim(x, ref)}


def nearest(x: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample RMSE to the nearest training image, and its index."""
    flat = x.reshape(len(x), -1).double()
    d = torch.cdist(flat[None], images.double()[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    dist, index = d.min(dim=1)
    return dist / math.sqrt(flat.shape[1]), index


def landing(
    x: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    hit_tol: float,
    ref: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Where the samples land among the training images (meaningful at std 0, where the data is the images).

    - nn_dist: mean over samples of the RMSE to the nearest training image
    - hit_rate: fraction of samples within ``hit_tol`` of a training image
    - basin_mismatch: fraction whose nearest training image differs from the reference sample's
    - class_hist_distance: total variation distance, 0.5 * sum_c |p_c - q_c|, between the digit classes of the
      landed samples and of the training set (0: same proportions, 1: disjoint); None if nothing landed.
      With n landed samples it is about 1.2 / sqrt(n) by chance alone (10 classes of about 10% each).
    """
    dist, index = nearest(x, images)
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
    if ref is not None:
        out["basin_mismatch"] = (nearest(ref, images)[1] != index).double().mean().item()
    if hits.any():
        landed = torch.bincount(labels[index[hits]], minlength=10).double()
        train = torch.bincount(labels, minlength=10).double()
        out["class_hist_distance"] = 0.5 * (landed / landed.sum() - train / train.sum()).abs().sum().item()
        out["landed_classes"] = landed.long().tolist()
    return out


class RunMetrics:
    """The metrics a run's config switches on; ``snapshot`` and ``final`` give what to add to the records."""

    def __init__(self, cfg: DictConfig, exp: Any, progress: bool = False) -> None:
        self.mcfg = cfg.get("metrics") or OmegaConf.structured(MetricsConfig)
        self.exp = exp
        self.cache_dir = Path(self.mcfg.cache_dir).expanduser()
        self.stochastic = is_stochastic(exp.built)
        self.reference: Reference | None = None
        self.fid_net = None
        if self.mcfg.reference.enabled:
            ref = self.mcfg.reference
            self.reference = solve_reference(
                OmegaConf.to_container(ref.scheduler, resolve=True),
                int(ref.steps),
                exp.loaded,
                exp.noise,
                cfg.seed,
                Precision(cfg.precision).value,
                self.cache_dir,
                progress,
            )
        if self.mcfg.fid.enabled:
            from diffexp.fid import check_real, feature_net

            n = self.mcfg.fid.n
            if n is not None and not 2 <= n <= cfg.batch_size:
                raise DiffexpError(
                    f"metrics.fid.n={n} is not allowed: FID uses the first n samples of the batch, so n must be "
                    f"between 2 and batch_size={cfg.batch_size}."
                )
            if n is None and cfg.batch_size < 2:
                raise DiffexpError("FID needs at least 2 samples; raise batch_size (FID at small n is biased).")
            check_real(self.mcfg.fid.real)
            self.fid_net = feature_net(self.mcfg.fid, exp.device)
        model = exp.loaded.model
        self.ideal = model if self.mcfg.landing and isinstance(model, DigitsIdealDenoiser) else None

    def snapshot(self, state: Any) -> dict[str, Any]:
        """Per-snapshot additions: the distance of x0 to the reference's final samples."""
        if self.reference is None:
            return {}
        return {"x0_ref_rmse": rmse(state.x0.float().cpu(), self.reference.x)}

    def final(self, final: Any) -> dict[str, Any]:
        """What goes into metrics.json (and the W&B summary) beside the cost."""
        x = final.x.float().cpu()
        out: dict[str, Any] = {**clipping(self.exp.built), "stochastic": self.stochastic}
        if self.reference is not None:
            out |= reference_agreement(x, self.reference.x)
            out["ref_kind"] = STOCHASTIC if self.stochastic else "deterministic"
            out["reference"] = self.reference.describe()
        if self.ideal is not None:
            ref = self.reference.x if self.reference is not None else None
            out |= landing(x, self.ideal.images, digits_labels(), self.mcfg.hit_tol, ref)
            out["ideal_std"] = float(self.ideal.config.std)
        if self.fid_net is not None:
            from diffexp.fid import fid_kid

            n = self.mcfg.fid.n or len(x)
            out |= fid_kid(
                final.x[:n].float(),
                self.fid_net,
                self.mcfg.fid.real,
                self.cache_dir,
                self.mcfg.fid.kid_subset_size,
                self.mcfg.fid.kid_subsets,
            )
        return out
