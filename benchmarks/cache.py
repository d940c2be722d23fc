"""Training-free caches against the uncached run from the same noise: speed-up and quality cost.

For each cache setting, the same model, sampler, steps and noise: the median seconds of the sampling loop (after a
warm-up run) and of the same loop without the cache, timed in turns in the same process, and their ratio; the
network passes that ran of the nominal, the linear-layer work share, and ``ref_rmse`` (in [-1, 1] units of the final
samples, latents for a latent model) against the uncached samples. Writes a JSON file and prints a Markdown table.

python benchmarks/cache.py                                  # digits-dit on the CPU
python benchmarks/cache.py --model dit-xl-2-256 --device cuda --steps 50
python benchmarks/cache.py --smoke                          # a tiny random DiT, in seconds (the tests run this)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> the run's cache keys
    "none": ["cache=none"],
    "first-block 0.05": ["cache=first-block"],
    "first-block 0.1": ["cache=first-block", "cache.threshold=0.1"],
    "first-block 0.2": ["cache=first-block", "cache.threshold=0.2"],
    "taylorseer 3": ["cache=taylorseer", "cache.cache_interval=3"],
    "pab 2": ["cache=pab"],
    "faster 2": ["cache=faster"],
}
SMOKE_DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 6}
SMOKE_DIT |= {"sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000}


def save_smoke_dit(folder: Path) -> list[str]:
    """A tiny random DiTPipeline (6 blocks, 8x8 latents) as a local folder; the keys that load it."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=DiTTransformer2DModel(**SMOKE_DIT), vae=vae, scheduler=scheduler).save_pretrained(folder)
    return ["model=local", f"model.path={folder}", "labels=all"]


def seconds(exp: Any) -> tuple[float, Any]:
    from diffexp.sampling.loop import sample

    start = time.perf_counter()
    final = sample(exp.steps())
    return time.perf_counter() - start, final


def measure(keys: list[str], args: argparse.Namespace, model: list[str], loaded: Any) -> tuple[Any, dict[str, Any]]:
    """One cache setting, timed in turns with the same run without its cache (``Cache.removed``, the uncached
    reference's own switch), so that a drift of the machine's speed cancels in the ratio."""
    import diffexp

    base = [f"scheduler={args.scheduler}", f"steps={args.steps}", f"batch_size={args.batch}", f"device={args.device}"]
    cfg = diffexp.compose([*model, *base, f"log_every={args.steps}", "logger=none", "progress=false", *keys])
    exp = diffexp.prepare(cfg, model=loaded)
    cache = exp.model.cache
    uncached = contextlib.nullcontext if cache is None else cache.removed
    with uncached():
        _, plain = seconds(exp)  # warm-up
    seconds(exp)
    times, plain_times, counts = [], [], {}
    for _ in range(args.repeats):
        elapsed, final = seconds(exp)
        times.append(elapsed)
        if cache is not None:  # read before the uncached turn resets them
            counts = {"passes_ran": cache.count.ran, "passes_nominal": cache.count.nominal, "share": cache.count.share}
        with uncached():
            plain_times.append(seconds(exp)[0])
    row = {"keys": keys, "seconds": statistics.median(times), "uncached_seconds": statistics.median(plain_times)}
    row |= {"nfe": final.nfe, "net_evals": final.net_evals} | counts
    return exp, row | {"x": final.x.float().cpu(), "uncached_x": plain.x.float().cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-dit", help="a model config (configs/model/<name>.yaml)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    # A sweep-sized chunk: at small batches on a CPU the per-step costs a cache cannot skip (scheduler update,
    # embeddings, the final layer) weigh more (digits-dit's card gives both).
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "cache.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny random DiT, 6 steps, one repeat")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = [f"model={args.model}", "labels=all"]
        if args.smoke:
            model, args.steps, args.batch, args.repeats = save_smoke_dit(Path(tmp)), 6, 2, 1
        names = ["none", *[n for n in args.settings if n != "none"]]
        first, base = measure(SETTINGS["none"], args, model, None)
        rows: dict[str, dict[str, Any]] = {"none": base}
        for name in names[1:]:
            _, rows[name] = measure(SETTINGS[name], args, model, first.loaded)
    result: dict[str, Any] = {"model": args.model, "device": args.device, "scheduler": args.scheduler}
    result |= {"steps": args.steps, "batch": args.batch, "settings": {}}
    lines = ["| cache | s | s uncached | speed-up | passes ran | work share | ref_rmse |", "|---" * 7 + "|"]
    for name, row in rows.items():
        x, uncached = row.pop("x"), row.pop("uncached_x")
        row["speedup"] = row["uncached_seconds"] / row["seconds"]
        row["ref_rmse"] = (x.double() - uncached.double()).pow(2).mean().sqrt().item()
        result["settings"][name] = row
        ran = f"{row['passes_ran']}/{row['passes_nominal']}" if "passes_ran" in row else f"{row['net_evals']}"
        share = f"{row['share']:.3f}" if "share" in row else "1"
        cells = f"{row['seconds']:.3g} | {row['uncached_seconds']:.3g} | {row['speedup']:.2f} | {ran} | {share}"
        lines.append(f"| {name} | {cells} | {row['ref_rmse']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.model}, {args.scheduler}-{args.steps}, batch {args.batch}, {args.device}\n")
    print("\n".join(lines))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
