"""A model card's quality table: scheduler x steps (x guidance), one run each, as a Markdown table.

    python scripts/model_card_table.py digits-cond --guidance 3 --num-samples 1000 --fid-n 1000
    python scripts/model_card_table.py digits-unet --num-samples 500 --fid-n 500
    python scripts/model_card_table.py digits-cond --path outputs/train/NAME/model --steps 20 --guidance 1 3 5
    python scripts/model_card_table.py digits-dit --schedulers ddim --steps 50 --caches none first-block taylorseer

Each run is diffexp's own (``diffexp.run``), in OUT/<model>/<scheduler>-<steps>-cfg<s>; a run already finished there
is read back, not sampled again. Columns: residual-noise share and median (diffexp/metrics/residual_noise.py), label
accuracy and recognisable share (labelled runs, diffexp/metrics/labels.py) or the digits classifier's confident and
recognisable shares (diffexp/metrics/digits_quality.py), and FID on the digits features. With ``--caches``, one
row per cache setting (configs/cache/) too, each with the network passes that ran of the nominal and ``ref_rmse``
against the uncached run from the same noise (``metrics=uncached``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import diffexp
from diffexp.errors import DiffexpError
from diffexp.metrics.digits_quality import digits_quality
from diffexp.settings import model_config


def run_one(args: argparse.Namespace, scheduler: str, steps: int, scale: float, cache: str) -> dict[str, Any]:
    out = args.out / args.model / (f"{scheduler}-{steps}-cfg{scale:g}" + ("" if cache == "none" else f"-{cache}"))
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        overrides = [f"model={args.model}", f"scheduler={scheduler}", f"steps={steps}", f"seed={args.seed}"]
        if args.path:  # a trained folder with the packaged model's settings (and name: the digits real set)
            overrides += ["model.source=local", f"model.path={Path(args.path).resolve()}"]
        n = args.num_samples
        overrides += [f"num_samples={n}", f"batch_size={min(n, args.batch_size)}", "logger=none", "progress=false"]
        if args.labels:
            overrides += ["labels=all", f"guidance_scale={scale}"]
        if cache != "none":  # the cost of the cache: agreement with the uncached run from the same noise
            overrides += [f"cache={cache}", "metrics=uncached"]
        if args.fid_n:
            fid = "metrics=fid" if cache == "none" else "metrics.fid.enabled=true"  # uncached: metrics=fid's keys
            overrides += [fid, f"metrics.fid.n={args.fid_n}"]
        metrics = diffexp.run(diffexp.compose(overrides), out)
    if not args.labels:  # the digits classifier's own reading (scikit-learn), beside the noise figures
        quality = digits_quality(torch.from_numpy(diffexp.load_samples(out)))
        metrics |= {k: quality[k] for k in ("confident_fraction", "recognisable_fraction", "classes_present")}
    return metrics


def row(args: argparse.Namespace, scheduler: str, steps: int, scale: float, cache: str, m: dict[str, Any]) -> str:
    cells = [scheduler, str(steps)] + ([f"{scale:g}"] if args.labels else [])
    if args.caches != ["none"]:
        nominal = m.get("net_evals_nominal") or m["net_evals"]
        cells += [cache, f"{m['net_evals']}/{nominal}", f"{m['ref_rmse']:.4f}" if "ref_rmse" in m else "-"]
    cells += [f"{m['noisy_share']:.3f}", f"{m['residual_noise']:.2f}"]
    if args.labels:
        cells += [f"{m['label_accuracy']:.3f}", f"{m['recognisable']:.3f}", f"{m['label_agreement']:.3f}"]
    else:
        cells += [f"{m['confident_fraction']:.3f}", f"{m['recognisable_fraction']:.3f}", str(m["classes_present"])]
    cells += [f"{m['fid']:.2f}" if "fid" in m else "-"]
    return "| " + " | ".join(cells) + " |"


def header(args: argparse.Namespace) -> list[str]:
    cells = ["scheduler", "steps"] + (["guidance"] if args.labels else [])
    if args.caches != ["none"]:
        cells += ["cache", "net evals (ran/nominal)", "ref_rmse vs uncached"]
    cells += ["noisy share", "residual noise"]
    if args.labels:
        cells += ["label accuracy", "recognisable", "label agreement"]
    else:
        cells += ["confident", "recognisable (digits_quality)", "classes"]
    cells += [f"FID (digits, n={args.fid_n})" if args.fid_n else "FID"]
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a packaged digits model: digits-unet, digits-cond, digits-flow ...")
    parser.add_argument("--path", default=None, help="a pipeline folder to measure in the model's place")
    parser.add_argument("--schedulers", nargs="+", default=["ddpm", "dpmsolver", "unipc", "euler"])
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--guidance", nargs="+", type=float, default=[3.0], help="labelled models only")
    parser.add_argument("--caches", nargs="+", default=["none"], help="cache settings (configs/cache/)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--fid-n", type=int, default=None, help="FID on the first n samples; default: no FID")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/model-card"))
    args = parser.parse_args(argv)
    args.labels = model_config(args.model).num_classes is not None  # class-conditional: labels and guidance
    lines = header(args)
    try:
        for scheduler in args.schedulers:
            for steps in args.steps:
                for scale in args.guidance if args.labels else [1.0]:
                    for cache in args.caches:
                        metrics = run_one(args, scheduler, steps, scale, cache)
                        lines.append(row(args, scheduler, steps, scale, cache, metrics))
                        print(lines[-1], file=sys.stderr, flush=True)
    except DiffexpError as err:
        print(f"diffexp: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
