"""The guidance-method table of a model card, regenerated from the shipped weights: label accuracy (and residual
noise, where diffexp measures it) by guidance method x scale x scheduler, each run with its own seeds 0..n-1.

    python scripts/guidance_table.py                     # digits-cond, 200 samples, prints the table
    python scripts/guidance_table.py --write             # and replaces the table in the model card
    python scripts/guidance_table.py --samples 20 --methods cfg,apg --scales 3 --schedulers dpmsolver

Each run is kept under --out (a run found finished there is read back, not sampled again), so an interrupted
table resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffexp
from diffexp.config import WEIGHTS_DIR

QUALITY = {"label_accuracy": "label accuracy", "residual_noise": "residual noise"}  # metrics.json key -> name
START, END = "<!-- guidance-table:start -->", "<!-- guidance-table:end -->"  # the card's table, between these


def measure(model: str, scheduler: str, method: str, scale: float, args: argparse.Namespace) -> dict:
    """One run's metrics (read back where it already finished)."""
    folder = Path(args.out) / f"{scheduler}-{method}-{scale:g}"
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = [f"model={model}", "labels=all", f"scheduler={scheduler}", f"guidance={method}",
                 f"guidance_scale={scale}", f"steps={args.steps}", f"num_samples={args.samples}",
                 f"batch_size={args.samples}", "logger=none", "progress=false", "overwrite=true",
                 f"metrics.cache_dir={Path(args.out) / 'cache'}"]  # fmt: skip
    return diffexp.run(diffexp.compose(overrides), folder)


def table(results: dict[tuple[str, str, float], dict], scales: list[float], keys: list[str]) -> str:
    """Markdown: one row per scheduler and method, one column per scale (per quality key), and net evals."""
    head = [f"{QUALITY[k]} s = {s:g}" if len(keys) > 1 else f"s = {s:g}" for k in keys for s in scales]
    lines = ["| scheduler | method | net evals / sample | " + " | ".join(head) + " |"]
    lines.append("|---" * (3 + len(head)) + "|")
    rows = dict.fromkeys((sch, m) for sch, m, _ in results)
    for sch, m in rows:
        evals = sorted({int(r["net_evals"]) for (a, b, _), r in results.items() if (a, b) == (sch, m)})
        cells = []
        for k in keys:
            for s in scales:
                value = results.get((sch, m, s), {}).get(k)
                cells.append("" if value is None else f"{value:.3f}")
        lines.append(f"| {sch} | {m} | {'/'.join(map(str, evals))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cond")
    parser.add_argument("--methods", default="cfg,apg,tcfg,pag,autoguidance")
    parser.add_argument("--scales", default="1.5,3,5,8")
    parser.add_argument("--schedulers", default="dpmsolver,k-euler-ancestral")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", default="outputs/guidance-table")
    parser.add_argument("--write", action="store_true", help="replace the table in the model card")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    results = {}
    for scheduler in args.schedulers.split(","):
        for method in args.methods.split(","):
            for scale in scales:
                results[(scheduler, method, scale)] = measure(args.model, scheduler, method, scale, args)
                print(scheduler, method, scale, {k: results[(scheduler, method, scale)].get(k) for k in QUALITY})
    keys = [k for k in QUALITY if any(r.get(k) is not None for r in results.values())]
    text = table(results, scales, keys)
    print(text)
    if args.write:
        card = WEIGHTS_DIR / args.model / "README.md"
        body = card.read_text()
        if START not in body or END not in body:
            raise SystemExit(f"{card} has no {START} ... {END} section to replace.")
        before, rest = body.split(START, 1)
        card.write_text(f"{before}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
