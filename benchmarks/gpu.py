"""GPU speed through the runner's own code paths, on the google/ddpm-celebahq-256 architecture with random weights.

Builds the ``UNet2DModel`` of ``ddpm-celebahq-256.json`` beside this file (113.7M parameters), saves it as a local
pipeline folder and samples it with ``diffexp.prepare`` and the speed keys alone (precision, channels_last,
compile). For each variant: the UNet forward (the denoiser's call) at batch 4 and 64, and the whole DDIM-30 loop
at batch 4. Counts the FLOPs of a forward (torch.utils.flop_counter) and prints what the device's bf16 limit
allows. Writes a JSON file (written after every measurement, so a cut-short run keeps what it measured) and prints a
Markdown table. Needs no download.

The part ``large`` (``large.py``) measures SDXL- and Flux-sized networks at 1024 px in bf16 (random weights, their
published configs): seconds per call and peak memory at batch 1 and 4, and a 28-step batch-1 run. Each part starts
no new measurement once its time budget is spent (what is left is marked skipped), so a GPU check stays in time.

python benchmarks/gpu.py                      # on a CUDA GPU: both parts, within their budgets
python benchmarks/gpu.py --parts unet --variants fp32 bf16 # some variants only
python benchmarks/gpu.py --smoke              # on the CPU with tiny configs, in seconds (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).with_name("ddpm-celebahq-256.json")
VARIANTS = {  # name -> the run's speed keys, nothing else
    "fp32": ["precision=fp32"],
    "bf16": ["precision=bf16"],
    "bf16 channels_last": ["precision=bf16", "channels_last=true"],
    "bf16 channels_last cudnn_benchmark": ["precision=bf16", "channels_last=true", "cudnn_benchmark=true"],
    "fp16 channels_last cudnn_benchmark": ["precision=fp16", "channels_last=true", "cudnn_benchmark=true"],
    "fp32 graph=step": ["precision=fp32", "graph=step"],
    "bf16 channels_last cudnn_benchmark graph=step": [
        "precision=bf16",
        "channels_last=true",
        "cudnn_benchmark=true",
        "graph=step",
    ],
    "bf16 compile reduce-overhead": ["precision=bf16", "channels_last=true", "compile=reduce-overhead"],
    "bf16 compile default": ["precision=bf16", "channels_last=true", "compile=default"],
    "bf16 contiguous compile reduce-overhead": ["precision=bf16", "compile=reduce-overhead"],
    "bf16 compile max-autotune cudnn_benchmark": [
        "precision=bf16",
        "channels_last=true",
        "compile=max-autotune",
        "cudnn_benchmark=true",
    ],
}
# bf16 dense matrix FLOP/s that the chip reaches in practice (about 80% of its datasheet peak)
BF16_LIMIT = {"H100": 790e12, "H200": 790e12}
SMOKE = {"sample_size": 32, "block_out_channels": [16, 16, 32, 32, 32, 32], "norm_num_groups": 8}
# on an H100/H200, batches 4 and 64: the DDIM-30 loop at batch 4 and forward images/s at batch 64
TARGETS = {"loop_small_s": 0.30, "large_img_s": 560.0}  # the goal: 0.15 s and 800 img/s


def save_model(folder: Path, overrides: dict[str, Any]) -> float:
    """The architecture with random weights (seed 0), as a pipeline folder with google's DDPM scheduler config;
    returns its parameter count in millions."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel.from_config(json.loads(CONFIG.read_text()) | overrides)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DDPM_SCHEDULER_CONFIG)).save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters()) / 1e6


def experiment(folder: Path, keys: list[str], batch: int, device: str, steps: int, loaded: Any = None) -> Any:
    """What the runner prepares for ``scheduler=ddim`` with these keys (one snapshot: the last call)."""
    import diffexp

    cfg = diffexp.compose(
        [
            "model=local",
            f"model.path={folder}",
            "scheduler=ddim",
            f"steps={steps}",
            f"batch_size={batch}",
            f"device={device}",
            f"log_every={steps}",
            "logger=none",
            "progress=false",
            *keys,
        ]
    )
    return diffexp.prepare(cfg, model=loaded)


def forward_s(exp: Any, repeats: int) -> float:
    """Mean seconds of one denoiser call on the run's batch, after warm-up."""
    from diffexp.sampling.device import synchronize

    t = exp.built.scheduler.timesteps.cpu()[0]
    with torch.inference_mode():
        for _ in range(3):
            exp.model(exp.noise, t)
        synchronize(exp.device)
        start = time.perf_counter()
        for _ in range(repeats):
            exp.model(exp.noise, t)
        synchronize(exp.device)
    return (time.perf_counter() - start) / repeats


def loop_s(exp: Any, repeats: int) -> tuple[float, float]:
    """Median of the loop's own clock (metrics.json's wall_s) and of the wall clock around it, after a warm-up."""
    from diffexp.sampling.loop import sample

    sample(exp.steps())
    clocks, walls = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        clocks.append(sample(exp.steps()).elapsed_s)
        walls.append(time.perf_counter() - start)
    return statistics.median(clocks), statistics.median(walls)


def flops_per_image(exp: Any) -> float:
    """FLOPs of one forward per image, counted on the eager network (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffexp.sampling.network import Network

    eager = exp.model.with_network(Network(exp.model.module))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        eager(exp.noise, exp.built.scheduler.timesteps.cpu()[0])
    return counter.get_total_flops() / exp.noise.shape[0]


def bf16_limit(device: str) -> float | None:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    return next((flops for chip, flops in BF16_LIMIT.items() if chip in name), None)


def measure(folder: Path, name: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """One variant: forward at both batches, the loop at the small one; compile time per shape."""
    keys, row = VARIANTS[name], result["variants"].setdefault(name, {"keys": VARIANTS[name]})
    small = experiment(folder, keys, args.batch[0], args.device, args.steps)
    row["attention"], row["compile_s"] = small.speed.attention, {str(args.batch[0]): small.speed.compile_s}
    if result.get("gflop_per_image") is None:
        result["gflop_per_image"] = flops_per_image(small) / 1e9
    row["forward_small_ms"] = forward_s(small, args.repeats[0]) * 1e3
    row["loop_small_s"], row["loop_small_wall_s"] = loop_s(small, args.repeats[2])
    if small.speed.capture_s is not None:
        row["capture_s"] = small.speed.capture_s  # graph=step: the steps captured once, before the timed runs
    write(args.out, result)
    large = experiment(folder, keys, args.batch[1], args.device, args.steps, loaded=small.loaded)
    row["compile_s"][str(args.batch[1])] = large.speed.compile_s
    row["forward_large_ms"] = forward_s(large, args.repeats[1]) * 1e3
    row["large_img_s"] = args.batch[1] / row["forward_large_ms"] * 1e3
    write(args.out, result)


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def table(result: dict[str, Any]) -> str:
    b, steps = result["batches"], result["steps"]
    lines = [
        f"{result['device_name']}, torch {result['torch']}, {result['params_m']:.1f}M parameters, "
        f"{result['gflop_per_image']:.4g} GFLOP per image per forward",
        "",
        f"| variant | forward b{b[0]} ms | forward b{b[1]} ms | b{b[1]} img/s | DDIM-{steps} b{b[0]} s | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        compile_s = "/".join(f"{v:.0f}" for v in row.get("compile_s", {}).values() if v is not None) or "-"
        cells = [row.get(k) for k in ("forward_small_ms", "forward_large_ms", "large_img_s", "loop_small_s")]
        text = " | ".join("-" if v is None else f"{v:.3g}" for v in cells)
        lines.append(f"| {name} | {text} | {compile_s} |")
    if (limit := result.get("limit")) is not None:
        cells = [f"{limit[k]:.3g}" for k in ("forward_small_ms", "forward_large_ms", "large_img_s", "loop_small_s")]
        lines.append(f"| bf16 limit ({result['bf16_limit_tflops']:.0f} TFLOP/s) | {' | '.join(cells)} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "gpu.json")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs, eager variants, one repeat")
    parser.add_argument("--parts", nargs="+", choices=("unet", "large"), default=["unet", "large"])
    parser.add_argument("--budget-s", type=float, default=150.0, help="unet part: no new variant after this")
    parser.add_argument("--large-budget-s", type=float, default=60.0, help="large part: no new network after this")
    args = parser.parse_args()
    args.device, args.steps, args.batch, args.repeats = "cuda", 30, (4, 64), (20, 5, 3)
    overrides: dict[str, Any] = {}
    if args.smoke:
        args.device, args.steps, args.batch, args.repeats, overrides = "cpu", 3, (2, 4), (1, 1, 1), SMOKE
        # compiling on the CPU takes minutes; fp16 is refused there
        args.variants = [v for v in args.variants if not any(k in v for k in ("compile", "fp16", "graph"))]
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --smoke, on the CPU).")
    import diffusers

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__}
    result |= {"diffusers": diffusers.__version__, "batches": list(args.batch), "steps": args.steps}
    result |= {"targets": TARGETS, "variants": {}}
    if "large" in args.parts:  # first: the big networks want the device's memory to themselves
        from large import measure_large
        from large import table as large_table

        result["large"] = measure_large(args.smoke, torch.device(args.device), args.large_budget_s, lambda part: write(
            args.out, result | {"large": part}))  # fmt: skip
        print(large_table(result["large"]) + "\n")
    if "unet" not in args.parts:
        write(args.out, result)
        return
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result["params_m"] = save_model(Path(tmp), overrides)
        result["gflop_per_image"] = None
        for name in args.variants:
            if time.perf_counter() - began > args.budget_s:
                result["variants"][name] = {"keys": VARIANTS[name], "skipped": f"budget {args.budget_s:g} s spent"}
                continue
            measure(Path(tmp), name, args, result)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if (limit := bf16_limit(args.device)) is not None:
        per_forward = result["gflop_per_image"] * 1e9 / limit  # seconds per image
        result["bf16_limit_tflops"] = limit / 1e12
        result["limit"] = {
            "forward_small_ms": per_forward * args.batch[0] * 1e3,
            "forward_large_ms": per_forward * args.batch[1] * 1e3,
            "large_img_s": 1 / per_forward,
            "loop_small_s": per_forward * args.batch[0] * args.steps,
        }
    write(args.out, result)
    print(table(result))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
