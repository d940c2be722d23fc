"""What W&B tracking costs a run: wall time against logger=none in the same process, and media bytes per run.

python benchmarks/wandb_overhead.py                       # the default run (digits-ideal, 30 steps, batch 4)
python benchmarks/wandb_overhead.py model=tiny model.sample_size=256 --repeats 2   # 256 px RGB, worst-case PNGs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import diffexp


def one_run(overrides: list[str], out_dir: Path) -> float:
    cfg = diffexp.compose(["progress=false", *overrides])
    start = time.perf_counter()
    diffexp.run(cfg, out_dir)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms, e.g. scheduler=ddim steps=50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    times: dict[str, list[float]] = {"none": [], "wandb": []}
    media: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        one_run([*args.overrides, "logger=none"], Path(tmp) / "warmup")  # imports, model caches
        for i in range(args.repeats):
            for arm in ("none", "wandb"):  # alternate, so that load on the machine hits both arms alike
                out = Path(tmp) / f"{arm}{i}"
                extra = ["logger=none"] if arm == "none" else ["logger=wandb", "logger.mode=offline"]
                times[arm].append(one_run([*args.overrides, *extra], out))
                if arm == "wandb":  # the images are written when logged
                    media.append(sum(f.stat().st_size for f in (out / "wandb").rglob("media/**/*") if f.is_file()))

    none, tracked = statistics.median(times["none"]), statistics.median(times["wandb"])
    print(f"overrides: {' '.join(args.overrides) or '(defaults)'}; {args.repeats} runs per arm, medians")
    print("(the W&B service starts once per process, in the first W&B run, as in a multirun)")
    print(f"logger=none   {none:7.2f} s/run")
    print(f"logger=wandb  {tracked:7.2f} s/run (offline)  ratio {tracked / none:.2f}  overhead {tracked - none:+.2f} s")
    print(f"W&B media     {statistics.median(media) / 1e6:7.3f} MB/run")


if __name__ == "__main__":
    main()
