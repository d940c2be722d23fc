"""Agreement of the final samples with the reference solution from the same noise (diffexp.metrics.reference).

``ref_rmse``, ``ref_psnr`` and ``ref_ssim`` of the final samples, and ``x0_ref_rmse`` of every snapshot's x0, in
[-1, 1] pixel units. For a stochastic scheduler they are a distance, not an error (``ref_kind`` says so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffexp.metrics.base import Chunk, Context, Key, Metric, Values
from diffexp.metrics.reference import Reference, solve_reference
from diffexp.sampling.adapters import Adapter
from diffexp.sampling.kdiffusion import iter_k_steps
from diffexp.sampling.loop import StepState, initial_noise, iter_steps, sample
from diffexp.sampling.network import Counter

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


def ssim(x: torch.Tensor, y: torch.Tensor, reduction: str = "elementwise_mean") -> Any:
    """Mean SSIM (torchmetrics, Gaussian window) for the data range 2 of [-1, 1]; ``reduction="none"``: per sample."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(x.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # the window must fit the image
    value = structural_similarity_index_measure(
        x.double(), y.double(), data_range=DATA_RANGE, kernel_size=kernel, reduction=reduction
    )
    return value if reduction == "none" else value.item()


def reference_agreement(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"ref_rmse": rmse(x, ref), "ref_psnr": psnr(x, ref), "ref_ssim": ssim(x, ref)}


def agreement_from(sse: torch.Tensor, pixels: int, ssims: torch.Tensor) -> dict[str, float]:
    """``reference_agreement`` from per-sample sums of squared differences (of ``pixels`` values each) and SSIMs:
    the same figures over all samples, so chunks add up to one batch. PSNR is torchmetrics' 10 log10(2^2 / mse)."""
    mse = sse.double().sum().item() / (pixels * len(sse))
    psnr_db = math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)
    return {"ref_rmse": math.sqrt(mse), "ref_psnr": psnr_db, "ref_ssim": ssims.double().mean().item()}


class ReferenceAgreement(Metric):
    """Distance to the reference solution (``metrics.reference.enabled``), from the same noise, chunk by chunk."""

    name = "reference"
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
        return bool(ctx.settings.reference.enabled)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.first = ctx.reference = self.solve(ctx.run.first)  # before the clock: the first chunk's snapshots use it

    def solve(self, chunk: Chunk) -> Reference:
        """The reference of this chunk's samples, solved or read from the cache."""
        if self.ctx.settings.reference.against == "uncached":
            return self.uncached(chunk)
        with without_cache(chunk.model) as model:  # the ODE's reference solves the model itself
            return self.solve_ode(chunk, model)

    def solve_ode(self, chunk: Chunk, model: Adapter) -> Reference:
        ref, run = self.ctx.settings.reference, self.ctx.run
        return solve_reference(
            dict(ref.scheduler),
            int(ref.steps),
            run.model,
            chunk.noise,
            run.seed,
            run.precision,
            self.ctx.cache_dir,
            self.ctx.progress,
            model,
            chunk.samples.start,
        )

    def uncached(self, chunk: Chunk) -> Reference:
        """The run's own sampler and steps from the same noise (and generators) with its cache off: what a cache
        costs. Not stored on disk: it is one more run of the same length."""
        run, model = self.ctx.run, chunk.model
        noise, generators = initial_noise(
            noise_shape(chunk), run.seed, len(chunk.samples), run.device, chunk.samples.start
        )
        built = run.scheduler
        with torch.inference_mode(), without_cache(model) as uncached:
            if built.sampler is not None:
                states = iter_k_steps(built.sampler, uncached, noise, generators, run.steps)
            else:
                states = iter_steps(uncached, built.scheduler, noise, run.steps, generators, built.step_kwargs,
                                    run.steps, built.timesteps_kwargs)  # fmt: skip
            final = sample(states)
        solver = {"against": "uncached", "scheduler": built.name, "steps": run.steps}
        return Reference(final.x.float().cpu(), "uncached", Path(), False, final.nfe, solver)

    def snapshot(self, state: StepState) -> dict[str, Any]:
        return {"x0_ref_rmse": rmse(state.x0.float().cpu(), self.first.x)}

    def measure(self, chunk: Chunk, final: StepState) -> Values:
        reference = self.first if chunk.samples == self.ctx.run.first.samples else self.solve(chunk)
        self.ctx.reference = reference  # for the metrics after this one (landing)
        x, ref = final.x.float().cpu().double(), reference.x.double()
        return {"sse": (x - ref).pow(2).flatten(1).sum(1), "ssim": ssim(x, ref, reduction="none")}

    def final(self, values: Values) -> dict[str, Any]:
        pixels = int(torch.tensor(self.ctx.run.first.noise.shape[1:]).prod())
        out: dict[str, Any] = agreement_from(values["sse"], pixels, values["ssim"])
        out["ref_kind"] = STOCHASTIC if self.ctx.run.scheduler.stochastic else "deterministic"
        out["reference"] = self.first.describe()
        return out


def noise_shape(chunk: Chunk) -> tuple[int, ...]:
    return tuple(chunk.noise.shape[1:])


@contextmanager
def without_cache(model: Adapter) -> Iterator[Adapter]:
    """The adapter with its cache's hooks off the network (applied again after), counting afresh."""
    if model.cache is None:
        yield model
        return
    with model.cache.removed():
        yield dataclasses.replace(model, cache=None, counter=Counter())
