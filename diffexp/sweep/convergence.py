"""Convergence study: ref_rmse against NFE for several schedulers, and their empirical order.

For a deterministic solver of order p, the final-sample error against the exact ODE solution falls like
NFE^-p once the steps are small enough; the order is minus the slope of log(error) against log(NFE) over that
asymptotic range. ``scripts/convergence.py`` is the command line; this module holds the logic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffexp.catalog import scheduler_spec
from diffexp.metrics.agreement import rmse
from diffexp.metrics.landing import nearest
from diffexp.metrics.reference import Reference
from diffexp.metrics.scheduler_flags import clipping
from diffexp.sampling.experiment import Experiment, prepare
from diffexp.sampling.ideal import DigitsIdealDenoiser
from diffexp.sampling.loop import iter_steps, sample
from diffexp.sampling.models import LoadedModel

TOLERANCE = 0.3  # a fitted order within this of the theory counts as a match


def theory_order(name: str, options: Mapping[str, Any]) -> int | None:
    """The global order of accuracy that the scheduler's file declares for these options (null: none)."""
    return scheduler_spec({**options, "name": name}).theory_order


def steps_for_nfe(exp: Experiment, target: int) -> int:
    """The most steps whose model calls do not exceed ``target`` (Heun: 2N - 1 calls for N steps)."""
    scheduler = exp.built.scheduler
    for steps in range(target, 0, -1):
        try:
            scheduler.set_timesteps(steps, device=exp.device)
        except (ValueError, IndexError):
            continue
        if len(scheduler.timesteps) <= target:
            return steps
    return 1


def fit_order(nfe: Sequence[float], err: Sequence[float]) -> float | None:
    """Minus the least-squares slope of log(err) against log(nfe); None with fewer than two usable points."""
    pts = [(n, e) for n, e in zip(nfe, err, strict=True) if e is not None and e > 0 and math.isfinite(e)]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(-np.polyfit(x, y, 1)[0])


@dataclass
class Point:
    clip: str  # "on": the model's clip_sample/thresholding are inherited; "off": switched off
    spacing: str
    scheduler: str
    target: int  # the NFE asked for
    steps: int
    nfe: int  # the NFE used: at most the target
    ref_rmse: float  # over the whole batch
    median_rmse: float  # the median of the per-sample errors: robust to a few basin switches
    switched: int | None  # digits-ideal: samples nearest another training image than the reference's
    clip_sample: bool
    stochastic: bool
    wall_s: float


@dataclass
class Row:
    clip: str
    spacing: str
    scheduler: str
    points: list[Point]
    order: float | None  # fitted over the asymptotic range
    last_order: float | None  # from the last two points of that range alone
    theory: int | None
    fit_nfe: list[int]

    @property
    def verdict(self) -> str:
        if self.order is None or self.theory is None:
            return "?"
        return "yes" if abs(self.order - self.theory) <= TOLERANCE else "NO"


def configure(head: DictConfig, spacing: str, clip: str) -> DictConfig:
    """A copy of ``head`` with this spacing, and clipping/thresholding off (clip=off) where the scheduler has them."""
    cfg = copy.deepcopy(head)
    if "timestep_spacing" in cfg.scheduler:
        cfg.scheduler.timestep_spacing = spacing
    if clip == "off":
        for key in ("clip_sample", "thresholding"):
            if key in cfg.scheduler:
                cfg.scheduler[key] = False
    return cfg


def measure(exp: Experiment, steps: int, reference: Reference, images: torch.Tensor | None) -> dict[str, Any]:
    """Sample ``exp`` from its noise and compare with the reference; on digits-ideal count basin switches."""
    with torch.inference_mode():
        final = sample(
            iter_steps(exp.model, exp.built.scheduler, exp.noise, steps, exp.generators, exp.built.step_kwargs, steps)
        )
    x = final.x.float().cpu()
    per_sample = (x - reference.x).flatten(1).pow(2).mean(1).sqrt()
    out = {
        "nfe": final.nfe,
        "ref_rmse": rmse(x, reference.x),
        "median_rmse": per_sample.median().item(),
        "wall_s": final.elapsed_s,
        "switched": None,
    }
    if images is not None:  # samples that land nearest another training image than the reference's
        out["switched"] = int((nearest(x, images)[1] != nearest(reference.x, images)[1]).sum())
    return out


def study(
    compose: Any,
    base: Sequence[str],
    loaded: LoadedModel,
    reference: Reference,
    schedulers: Iterable[str],
    nfes: Sequence[int],
    spacings: Iterable[str],
    clips: Iterable[str],
    fit_min_nfe: int,
    floor: float,
    log: Any = print,
) -> list[Row]:
    """Sample every scheduler x spacing x clipping x NFE from the reference's noise; fit an order per row.

    Identical effective configurations (e.g. clipping on and off for a scheduler that can't clip) are
    sampled once. Points whose error is below ``floor`` (the reference's own accuracy) are left out of the fit.
    """
    heads = {name: compose([*base, f"scheduler={name}", "steps=1"]) for name in schedulers}
    images = loaded.model.images if isinstance(loaded.model, DigitsIdealDenoiser) else None
    done: dict[tuple[str, int], dict[str, Any]] = {}
    rows = []
    for clip in clips:
        for spacing in spacings:
            for name, head in heads.items():
                cfg = configure(head, spacing, clip)
                points = []
                for target in nfes:
                    cfg.steps = 1
                    cfg.steps = steps = steps_for_nfe(prepare(cfg, model=loaded), target)
                    exp = prepare(cfg, model=loaded)
                    key = (exp.built.effective_config()["hash"], steps)
                    if key not in done:
                        done[key] = measure(exp, steps, reference, images)
                    flags = {"clip_sample": clipping(exp.built)["clip_sample"], "stochastic": exp.built.stochastic}
                    points.append(Point(clip, spacing, name, target, steps, **done[key], **flags))
                fit = [p for p in points if p.target >= fit_min_nfe and p.ref_rmse > floor]
                order = fit_order([p.nfe for p in fit], [p.ref_rmse for p in fit])
                last = fit_order([p.nfe for p in fit[-2:]], [p.ref_rmse for p in fit[-2:]])
                theory = exp.built.theory_order
                row = Row(clip, spacing, name, points, order, last, theory, [p.nfe for p in fit])
                rows.append(row)
                errs = " ".join(f"{p.nfe}:{p.ref_rmse:.2e}" for p in points)
                log(f"clip {clip:3s} {spacing:8s} {name:10s} {errs}  order {_num(order)}")
    return rows


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: Sequence[Row], nfes: Sequence[int]) -> str:
    """Markdown tables, one per clipping x spacing: ref_rmse at each NFE, fitted and theoretical order."""
    out = [
        "ref_rmse of the final samples against the reference, at each target NFE (the NFE used, where it is "
        "less, in brackets).\norder (fit): minus the slope of log ref_rmse against log NFE over the asymptotic "
        "range; last 2: from its last two points alone.\nswitched (digits-ideal): samples, at each NFE, that land "
        "nearest another training image than the reference's sample does."
    ]
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.clip, r.spacing), []).append(r)
    for (clip, spacing), group in groups.items():
        out.append(f"\n### clipping {clip}, timestep_spacing={spacing}\n")
        head = " | ".join(f"NFE≈{n}" for n in nfes)
        out.append(f"| scheduler | {head} | order (fit) | last 2 | theory | match | switched |")
        out.append("|---|" + "---|" * (len(nfes) + 5))
        for r in group:
            cells = " | ".join(f"{p.ref_rmse:.2e}" + (f" ({p.nfe})" if p.nfe != p.target else "") for p in r.points)
            note = " (clips x0)" if any(p.clip_sample for p in r.points) else ""
            theory = "-" if r.theory is None else str(r.theory)
            switched = "/".join("-" if p.switched is None else str(p.switched) for p in r.points)
            out.append(
                f"| {r.scheduler}{note} | {cells} | {_num(r.order)} | {_num(r.last_order)} | {theory} "
                f"| {r.verdict} | {switched} |"
            )
    return "\n".join(out)


def plot(rows: Sequence[Row], path: Any) -> None:
    """ref_rmse against NFE, log-log, one panel per clipping x spacing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = sorted({r.clip for r in rows}, key=lambda c: c != "off")
    spacings = list(dict.fromkeys(r.spacing for r in rows))
    fig, axes = plt.subplots(
        len(clips), len(spacings), figsize=(4.2 * len(spacings), 3.6 * len(clips)), squeeze=False, sharey=True
    )
    for i, clip in enumerate(clips):
        for j, spacing in enumerate(spacings):
            ax = axes[i][j]
            for r in rows:
                if (r.clip, r.spacing) == (clip, spacing):
                    label = f"{r.scheduler} ({_num(r.order)})"
                    ax.loglog([p.nfe for p in r.points], [p.ref_rmse for p in r.points], "o-", label=label)
            ax.set_title(f"clipping {clip}, {spacing}")
            ax.set_xlabel("NFE")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[i][0].set_ylabel("ref_rmse")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def as_dict(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) | {"verdict": r.verdict} for r in rows]


def reference_accuracy(coarse: Reference, fine: Reference) -> float:
    """The reference's error, estimated from a solve with half the steps: |coarse - fine| bounds it."""
    return rmse(coarse.x, fine.x)
