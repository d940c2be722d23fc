"""Scaling of a run over samples and processes, on the CPU (one thread per process).

    python benchmarks/scaling.py            # about 5 minutes on 2 idle cores
    python benchmarks/scaling.py --quick    # fewer samples, one repeat

1. Throughput: images/s of the same run (digits-unet, DDIM-30, batch 8) under ``torchrun --nproc_per_node=1`` and
   ``=2``, alternating, medians; the ratio is the speed-up of sharding chunks over processes (target >= 1.7x on 2
   cores). Each figure is num_samples / run_s, the sampling time from the first chunk to the last.
2. Memory: the peak resident memory of a run of N=256 against N=4096 samples at the same batch (64), FID
   features streamed chunk by chunk (target: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
COMMON = ["logger=none", "progress=false", "model=digits-unet", "scheduler=ddim"]


def run(args: list[str], folder: Path, processes: int = 0) -> dict:
    """One run as a process (under torchrun when ``processes``); its metrics.json."""
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, str(ROOT / "scripts/run.py"), *COMMON, *args, f"hydra.run.dir={folder}"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=folder.parent)
    if result.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return json.loads((folder / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and one repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "scaling.json")
    a = parser.parse_args()
    samples, repeats = (32, 1) if a.quick else (96, 3)
    large = 1024 if a.quick else 4096
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        speed: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats):
            for processes in (1, 2):
                m = run([f"num_samples={samples}", "batch_size=8", "steps=30"], folder / f"p{processes}-{r}", processes)
                speed[processes].append(m["num_samples"] / m["run_s"])
                print(f"  {processes} process(es), repeat {r}: {speed[processes][-1]:.1f} images/s", flush=True)
        memory = {}
        for n in (256, large):
            args = [f"num_samples={n}", "batch_size=64", "steps=10", "metrics.fid.enabled=true"]
            memory[n] = run(args, folder / f"n{n}")["peak_mem_mb"]
            print(f"  N={n}: peak {memory[n]:.0f} MB", flush=True)
    one, two = statistics.median(speed[1]), statistics.median(speed[2])
    result = {
        "images_per_s": {"1": one, "2": two},
        "speedup_2_processes": two / one,
        "peak_mem_mb": {str(n): v for n, v in memory.items()},
        "memory_ratio": memory[large] / memory[256],
        "samples": samples,
        "repeats": repeats,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"images/s: 1 process {one:.1f}, 2 processes {two:.1f}: {two / one:.2f}x (target >= 1.7x)")
    print(f"peak memory: N=256 {memory[256]:.0f} MB, N={large} {memory[large]:.0f} MB: {result['memory_ratio']:.3f}x")
    print(f"(target within 10%) -> {a.out}")


if __name__ == "__main__":
    main()
