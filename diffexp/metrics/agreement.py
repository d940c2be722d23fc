"""Agreement of the final samples with the reference solution from the same noise (diffexp.metrics.reference).

``ref_rmse``, ``ref_psnr`` and ``ref_ssim`` of the final samples, and ``x0_ref_rmse`` of every snapshot's x0, in
[-1, 1] pixel units. For a stochastic scheduler they are a distance, not an error (``ref_kind`` says so).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from diffexp.config import Precision
from diffexp.metrics.base import Context, Key, Metric
from diffexp.metrics.reference import solve_reference
from diffexp.sampling.loop import StepState

DATA_RANGE = 2.0  # samples live in [-1, 1]
STOCHASTIC = "stochastic: reference from the same noise is not its target"


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Root-mean-square difference over every pixel of the batch, in [-1, 1] pixel units."""
    from torchmetrics.functional.regression import mean_squared_error  # torchmetrics loads only when measured

    return mean_squared_error(x.double().flatten(), y.double().flatten(), squared=False).item()


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB over the batch, for the data range 2 of [-1, 1]: 20 log10(2 / rmse); identical gives inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(x.double(), y.double(), data_range=DATA_RANGE).item()


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (torchmetrics, Gaussian window) for the data range 2 of [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(x.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # the window must fit the image
    return structural_similarity_index_measure(x.double(), y.double(), data_range=DATA_RANGE, kernel_size=kernel).item()


def reference_agreement(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"ref_rmse": rmse(x, ref), "ref_psnr": psnr(x, ref), "ref_ssim": ssim(x, ref)}


class ReferenceAgreement(Metric):
    """Distance to the reference solution (``metrics.reference.enabled``)."""

    keys = (
        Key("ref_rmse", "lower"),
        Key("ref_psnr", "higher"),
        Key("ref_ssim", "higher"),
        Key("ref_kind"),
        Key("reference"),
        Key("x0_ref_rmse", "lower", "snapshot"),
    )

    @classmethod
    def enabled(cls, ctx: Context) -> bool:
        return bool(ctx.mcfg.reference.enabled)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        ref = ctx.mcfg.reference
        ctx.reference = solve_reference(
            OmegaConf.to_container(ref.scheduler, resolve=True),
            int(ref.steps),
            ctx.exp.loaded,
            ctx.exp.noise,
            ctx.cfg.seed,
            Precision(ctx.cfg.precision).value,
            ctx.cache_dir,
            ctx.progress,
            ctx.exp.model,
        )

    def snapshot(self, state: StepState) -> dict[str, Any]:
        return {"x0_ref_rmse": rmse(state.x0.float().cpu(), self.ctx.reference.x)}

    def final(self, final: StepState) -> dict[str, Any]:
        out: dict[str, Any] = reference_agreement(final.x.float().cpu(), self.ctx.reference.x)
        out["ref_kind"] = STOCHASTIC if self.ctx.exp.built.stochastic else "deterministic"
        out["reference"] = self.ctx.reference.describe()
        return out
