"""What diffexp (and W&B) cost over the bare loop, in one process and as a whole command, on one thread.

1. In this process: ``diffexp.run`` (the config's observers, the run folder written) against the bare loop (the
   book's loop with the same model, scheduler, steps, batch and per-sample noise, saving grid PNGs of x and x0 at
   each snapshot, model loading included in both), at 30 and 300 steps, with ``logger=none`` and with W&B offline.
2. As processes, imports included: the default command ``python scripts/run.py logger=none progress=false`` (and
   with W&B offline) against this file run as the bare script (``--bare DIR``). The command defers Python's cyclic
   garbage collection until its first model call (diffexp/startup.py); the bare script run with that policy
   too (``--deferred``) shows what the command costs beyond it.

The arms take turns in rounds; a ratio is the median over rounds of the ratio to the baseline in the same round.

python benchmarks/overhead.py                                        # everything: about 12 minutes on one core
python benchmarks/overhead.py --repeats 2 --steps 30 --no-processes  # in process only, at 30 steps
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # diffexp from this checkout, installed or not
MODEL = ROOT / "diffexp" / "weights" / "digits-unet"  # the default model, as the default command loads it
BATCH, SEED, LOG_EVERY = 4, 0, 10  # the defaults of configs/run.yaml
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
TARGETS = {"runner, logger=none, 300 steps": 1.02, "command, logger=none": 1.10, "command, W&B offline": 1.25}


def bare_loop(
    out_dir: Path, steps: int = 30, model_dir: Path = MODEL, before_loop: Callable[[], None] = lambda: None
) -> float:
    """The book's loop, with per-sample noise and a grid of x and x0 every LOG_EVERY steps; seconds taken."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging
    from diffusers.utils.torch_utils import randn_tensor
    from torchvision.utils import save_image

    start = time.perf_counter()
    logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    generators = [torch.Generator().manual_seed(SEED + k) for k in range(BATCH)]
    size = unet.config.sample_size
    x = randn_tensor((BATCH, unet.config.in_channels, size, size), generator=generators)
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    out_dir.mkdir(parents=True, exist_ok=True)
    before_loop()
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            out = scheduler.step(eps, t, x, generator=generators)
            x = out.prev_sample
            if (i + 1) % LOG_EVERY == 0 or i == len(scheduler.timesteps) - 1:
                save_image(x / 2 + 0.5, out_dir / f"step{i + 1:04d}_x.png", nrow=BATCH)
                save_image(out.pred_original_sample / 2 + 0.5, out_dir / f"step{i + 1:04d}_x0.png", nrow=BATCH)
    save_image(x / 2 + 0.5, out_dir / "samples.png", nrow=BATCH)
    return time.perf_counter() - start


def runner(out_dir: Path, steps: int, wandb: bool) -> float:
    """``diffexp.run`` with the config's observers; the config is composed outside the clock."""
    import diffexp

    logger = ["logger=wandb", "logger.mode=offline"] if wandb else ["logger=none"]
    cfg = diffexp.compose(["progress=false", f"steps={steps}", *logger])
    start = time.perf_counter()
    diffexp.run(cfg, out_dir)
    return time.perf_counter() - start


def process(args: list[str], cwd: Path) -> float:
    """A command in a fresh process, imports included, on one thread; W&B (where on) offline."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


class NetworkClock:
    """Seconds spent inside the UNet's forward at the sampling batch, this process's arms alike: what is left is
    each arm's own work (the runner's batch-1 memory probe among it), which the machine's drift (it moves the
    network's time by several percent from one minute to the next) hardly touches."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from diffusers import UNet2DModel

        forward = UNet2DModel.forward

        def timed(self: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return forward(self, sample, *args, **kwargs)
            finally:
                if sample.shape[0] == BATCH:
                    cls.seconds += time.perf_counter() - start

        UNet2DModel.forward = timed  # type: ignore[method-assign]


Times = dict[str, list[tuple[float, float]]]  # per arm, per round: (seconds, of which inside the network)


def alternate(arms: dict[str, Callable[[Path], float]], repeats: int, tmp: Path) -> Times:
    """Seconds of each arm per round. The arms take turns, in an order that reverses every round (ABC, CBA, ...),
    so that a machine slowing down or speeding up during a round hits every arm alike."""
    times: Times = {name: [] for name in arms}
    for name, arm in arms.items():  # warm-up: imports, caches, the W&B service
        arm(tmp / f"warmup-{len(name)}-{abs(hash(name))}")
    for i in range(repeats):
        for name in list(arms)[:: 1 if i % 2 == 0 else -1]:
            NetworkClock.seconds = 0.0
            seconds = arms[name](tmp / f"{abs(hash(name))}-{i}")
            times[name].append((seconds, NetworkClock.seconds))
    return times


def report(title: str, times: Times, baseline: str) -> dict[str, float]:
    """Each arm's median seconds, and its ratio to the baseline: the median over rounds of the ratio within a
    round (the two measured minutes apart at most, so the machine's drift cancels). In process, also the time
    outside the network, and the ratio with the network's time equalised: (baseline + the arm's extra time outside
    the network) / baseline, per round."""
    inside = any(net for rounds in times.values() for _, net in rounds)
    extra = " outside network s | ratio, network equalised |" if inside else ""
    print(f"\n{title}\n| arm | median s | ratio (median of rounds) | ratio range |{extra} target |")
    print("|---" * (6 if inside else 4) + "|---|")
    ratios = {}
    for name, rounds in times.items():
        per_round = [s / b for (s, _), (b, _) in zip(rounds, times[baseline], strict=True)]
        ratios[name] = statistics.median(per_round)
        cells = [f"{statistics.median(s for s, _ in rounds):.3f}", f"{ratios[name]:.3f}"]
        cells.append(f"{min(per_round):.3f}-{max(per_round):.3f}")
        if inside:
            equalised = [(b + (s - n) - (b - bn)) / b for (s, n), (b, bn) in zip(rounds, times[baseline], strict=True)]
            cells += [f"{statistics.median(s - n for s, n in rounds):.3f}", f"{statistics.median(equalised):.3f}"]
        cells.append(f"<= {TARGETS[name]:.2f}" if name in TARGETS else "")
        print(f"| {name} | {' | '.join(cells)} |")
    return ratios


def media_mb(tmp: Path) -> float | None:
    """W&B media written per run (the x/x0 grids and samples it logs)."""
    sizes = [
        sum(f.stat().st_size for f in run.rglob("media/**/*") if f.is_file())
        for run in tmp.glob("*/wandb/*run-*")
        if run.is_dir()
    ]
    return statistics.median(sizes) / 1e6 if sizes else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="rounds (even: each order as often)")
    parser.add_argument("--steps", type=int, nargs="*", default=[30, 300], help="in-process step counts (none: skip)")
    parser.add_argument("--no-processes", dest="processes", action="store_false", help="in process only")
    parser.add_argument("--bare", type=Path, help="run as the bare script: the bare loop, writing into this folder")
    parser.add_argument("--deferred", action="store_true", help="the bare script with the command's start-up policy")
    args = parser.parse_args()
    if args.bare is not None:
        from diffexp.startup import defer_collection, end_startup

        if args.deferred:
            defer_collection()  # as scripts/run.py does: no collection passes until the first model call
        bare_loop(args.bare, before_loop=end_startup)
        return
    for key, value in ONE_THREAD.items():
        os.environ.setdefault(key, value)
    # diffexp's bytecode, as a user's first run writes it (PYTHONDONTWRITEBYTECODE would compile it every time)
    compileall.compile_dir(ROOT / "diffexp", quiet=1)
    import torch

    torch.set_num_threads(1)
    NetworkClock.install()
    print(f"{args.repeats} rounds; digits-unet, DDPM, batch {BATCH}, grids every {LOG_EVERY} steps")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for steps in args.steps:
            arms: dict[str, Callable[[Path], float]] = {
                f"bare loop, {steps} steps": lambda out, s=steps: bare_loop(out, s),
                f"runner, logger=none, {steps} steps": lambda out, s=steps: runner(out, s, wandb=False),
                f"runner, W&B offline, {steps} steps": lambda out, s=steps: runner(out, s, wandb=True),
            }
            times = alternate(arms, args.repeats, tmp)
            report(f"In process, {steps} steps", times, f"bare loop, {steps} steps")
            wandb = statistics.median(s for s, _ in times[f"runner, W&B offline, {steps} steps"])
            none = statistics.median(s for s, _ in times[f"runner, logger=none, {steps} steps"])
            print(f"W&B offline over logger=none: {wandb / none:.3f} ({wandb - none:+.2f} s per run)")
        if (mb := media_mb(tmp)) is not None:
            print(f"\nW&B media: {mb:.3f} MB per run")
        if args.processes:
            script = str(ROOT / "scripts" / "run.py")
            arms = {
                "bare script": lambda out: process([__file__, "--bare", str(out)], tmp),
                "command, logger=none": lambda out: process([script, "logger=none", "progress=false"], tmp),
                "command, W&B offline": lambda out: process([script, "progress=false"], tmp),
                # what the command costs over a bare script that also defers collection (diffexp/startup.py)
                "bare script, collection deferred": lambda out: process(
                    [__file__, "--bare", str(out), "--deferred"], tmp
                ),
            }
            times = alternate(arms, args.repeats, tmp)
            report("As processes (imports included)", times, "bare script")
            deferred = times.pop("bare script, collection deferred")
            for name in ("command, logger=none", "command, W&B offline"):
                ratio = statistics.median(c / b for (c, _), (b, _) in zip(times[name], deferred, strict=True))
                print(f"{name} over the bare script with collection deferred: {ratio:.3f}")


if __name__ == "__main__":
    main()
