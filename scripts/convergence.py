"""Convergence of deterministic schedulers: ref_rmse against NFE, and the empirical order against theory.

    python scripts/convergence.py                                  # digits-ideal, std 0.3, CPU
    python scripts/convergence.py --batch-size 64 --clip off,on --spacings leading,linspace,trailing
    python scripts/convergence.py model=digits-unet device=cuda    # any model: Hydra overrides pass through

Every run starts from the same noise as one cached reference solution (metrics.reference.*), so the error
is the scheduler's discretisation error on the model's probability-flow ODE. Prints Markdown tables, writes
results.json, tables.md and convergence.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import diffexp
from diffexp.catalog import resolve_class
from diffexp.config import Precision
from diffexp.errors import DiffexpError, exit_with
from diffexp.metrics.reference import solve_reference
from diffexp.sweep.convergence import as_dict, plot, reference_accuracy, study, table


def compose(overrides: list[str]) -> DictConfig:
    """The run config of these overrides; a bad override is a clear error, not a traceback."""
    try:
        return diffexp.compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise DiffexpError(f"Bad override in {' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers, e.g. 5,10,20."""
    return [positive_int(part) for part in text.split(",")]


def names_of(*allowed: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        wrong = [n for n in names if n not in allowed]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, wrong))}: use {', '.join(allowed)}")
        return names

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run config (model=..., device=...)")
    parser.add_argument("--schedulers", default="ddim,euler,heun,dpmsolver,unipc,deis")
    parser.add_argument("--nfe", type=positive_ints, default="5,10,20,40,80,160", help="target model calls per sample")
    spacings = names_of("leading", "linspace", "trailing")
    parser.add_argument("--spacings", type=spacings, default="leading,linspace,trailing")
    clip_help = "off: clip_sample/thresholding false; on: as inherited"
    parser.add_argument("--clip", type=names_of("off", "on"), default="off,on", help=clip_help)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--fit-min-nfe", type=positive_int, default=40, help="the asymptotic range starts here")
    parser.add_argument("--floor-factor", type=positive_float, default=3.0, help="fit only errors above this x ref")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if not any(o.startswith("model=") for o in overrides):
        overrides = ["model=digits-ideal", "model.std=0.3", *overrides]  # a smooth exact denoiser
    base = ["progress=false", f"batch_size={args.batch_size}", *overrides]
    nfes = args.nfe
    out = args.out or Path("outputs/convergence") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.schedulers.split(","):
            resolve_class(name)  # an unknown or unusable name: the valid ones, before any work
        cfg = compose([*base, f"scheduler={args.schedulers.split(',')[0]}"])  # the noise and model, once
        exp = diffexp.prepare(cfg)
        ref_cfg = cfg.metrics.reference
        spec = OmegaConf.to_container(ref_cfg.scheduler, resolve=True)
        solve = dict(
            loaded=exp.loaded,
            noise=exp.noise,
            seed=cfg.seed,
            precision=Precision(cfg.precision).value,
            cache_dir=Path(cfg.metrics.cache_dir),
            progress=True,
        )
        start = time.perf_counter()
        fine = solve_reference(spec, int(ref_cfg.steps), **solve)
        coarse = solve_reference(spec, int(ref_cfg.steps) // 2, **solve)
        ref_err = reference_accuracy(coarse, fine)
        print(
            f"model {exp.loaded.name} ({OmegaConf.to_container(cfg.model)}), batch {cfg.batch_size}, seed {cfg.seed}, "
            f"device {exp.device}\nreference {fine.solver} ({fine.nfe} calls, {'cached' if fine.cached else 'solved'}"
            f"); |ref(N/2) - ref(N)| = {ref_err:.2e}: errors below {args.floor_factor * ref_err:.1e} are not fitted",
            flush=True,
        )
        rows = study(
            compose,
            base,
            exp.loaded,
            fine,
            args.schedulers.split(","),
            nfes,
            args.spacings,
            args.clip,
            args.fit_min_nfe,
            args.floor_factor * ref_err,
            log=lambda line: print(line, flush=True),
        )
    except DiffexpError as err:
        exit_with(err, out)
    text = table(rows, nfes)
    print(text)
    (out / "tables.md").write_text(text + "\n")
    meta = {
        "overrides": base,
        "reference": fine.describe(),
        "reference_error": ref_err,
        "fit_min_nfe": args.fit_min_nfe,
        "wall_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": as_dict(rows)}, indent=1, default=str))
    plot(rows, out / "convergence.png")
    print(f"\n{len(rows)} rows in {meta['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
