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
from omegaconf import DictConfig, OmegaConf

from diffexp.metrics import rmse
from diffexp.models import LoadedModel
from diffexp.reference import Reference, clipping, is_stochastic
from diffexp.run import Experiment, prepare
from diffexp.sampler import sample

TOLERANCE = 0.3  # a fitted order within this of the theory counts as a match


def theory_order(name: str, options: Mapping[str, Any]) -> int | None:
    """The global order of accuracy of a deterministic scheduler with these options, where theory gives one."""
    if name in ("ddim", "euler"):
        return 1  # DDIM is the first-order exponential integrator (DPM-Solver-1); Euler is first order
    if name in ("heun", "kdpm2"):
        return 2
    if name in ("dpmsolver", "dpmsolver-single", "deis"):
        return int(options.get("solver_order") or 2)
    if name == "unipc":  # UniP-p with the UniC corrector has order p + 1 (Zhao et al. 2023, UniPC)
        return int(options.get("solver_order") or 2) + (0 if options.get("disable_corrector") else 1)
    if name == "lms":
        return int(options.get("order") or 4)
    if name == "pndm":
        return 4  # pseudo linear multistep (PLMS), fourth-order Adams-Bashforth in its own variable
    return None


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
    ref_rmse: float
    clip_sample: bool
    stochastic: bool
    wall_s: float


@dataclass
class Row:
    clip: str
    spacing: str
    scheduler: str
    points: list[Point]
    order: float | None
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
    done: dict[tuple[str, int], tuple[int, float, float]] = {}
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
                        with torch.inference_mode():
                            final = sample(
                                exp.model,
                                exp.built.scheduler,
                                exp.noise,
                                steps,
                                exp.generators,
                                exp.built.step_kwargs,
                                steps,
                            )
                        done[key] = (final.nfe, rmse(final.x.float().cpu(), reference.x), final.elapsed_s)
                    nfe, err, wall = done[key]
                    points.append(
                        Point(
                            clip,
                            spacing,
                            name,
                            target,
                            steps,
                            nfe,
                            err,
                            clipping(exp.built)["clip_sample"],
                            is_stochastic(exp.built),
                            wall,
                        )
                    )
                fit = [p for p in points if p.target >= fit_min_nfe and p.ref_rmse > floor]
                options = OmegaConf.to_container(cfg.scheduler, resolve=True)
                row = Row(
                    clip,
                    spacing,
                    name,
                    points,
                    fit_order([p.nfe for p in fit], [p.ref_rmse for p in fit]),
                    theory_order(name, options),
                    [p.nfe for p in fit],
                )
                rows.append(row)
                errs = " ".join(f"{p.nfe}:{p.ref_rmse:.2e}" for p in points)
                order = "-" if row.order is None else f"{row.order:.2f}"
                log(f"clip {clip:3s} {spacing:8s} {name:10s} {errs}  order {order}")
    return rows


def table(rows: Sequence[Row], nfes: Sequence[int]) -> str:
    """Markdown tables, one per clipping x spacing: ref_rmse at each NFE, fitted and theoretical order."""
    out = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.clip, r.spacing), []).append(r)
    for (clip, spacing), group in groups.items():
        out.append(f"\n### clipping {clip}, timestep_spacing={spacing}\n")
        out.append("| scheduler | " + " | ".join(f"NFE≈{n}" for n in nfes) + " | order (fit) | theory | match |")
        out.append("|---|" + "---|" * (len(nfes) + 3))
        for r in group:
            cells = [f"{p.ref_rmse:.2e} ({p.nfe})" for p in r.points]
            clip_note = " (clips x0)" if any(p.clip_sample for p in r.points) else ""
            order = "-" if r.order is None else f"{r.order:.2f}"
            theory = "-" if r.theory is None else str(r.theory)
            out.append(f"| {r.scheduler}{clip_note} | " + " | ".join(cells) + f" | {order} | {theory} | {r.verdict} |")
    return "\n".join(out)


def plot(rows: Sequence[Row], path: Any) -> None:
    """ref_rmse against NFE, log-log, one panel per clipping x spacing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.clip, r.spacing) for r in rows}, key=lambda k: (k[0], k[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (clip, spacing) in zip(axes[0], panels, strict=True):
        for r in rows:
            if (r.clip, r.spacing) != (clip, spacing):
                continue
            order = "" if r.order is None else f" ({r.order:.2f})"
            ax.loglog([p.nfe for p in r.points], [p.ref_rmse for p in r.points], "o-", label=r.scheduler + order)
        ax.set_title(f"clip {clip}, {spacing}")
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("ref_rmse")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def as_dict(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) | {"verdict": r.verdict} for r in rows]


def reference_accuracy(coarse: Reference, fine: Reference) -> float:
    """The reference's error, estimated from a solve with half the steps: |coarse - fine| bounds it."""
    return rmse(coarse.x, fine.x)
