"""k-diffusion samplers against their diffusers counterparts, on the same model, noise levels and initial noise.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/kdiffusion_parity.py

Each pair runs on the same noise levels: the diffusers class's own (Karras's where it has
``use_karras_sigmas``), given to the k-diffusion sampler as ``schedule=custom``; prints the largest difference
of the final samples, relative to their largest magnitude. The README's table comes from this;
tests/test_kdiffusion.py pins its "equal" rows.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import diffexp
from diffexp.sampling.loop import sample

# k-diffusion sampler, diffusers scheduler file and its options
PAIRS = [
    ("k-euler", "euler", ["scheduler.use_karras_sigmas=true"]),
    ("k-heun", "heun", ["scheduler.use_karras_sigmas=true", "scheduler.clip_sample=false"]),  # x0 unclipped
    ("k-dpm2", "kdpm2", ["scheduler.use_karras_sigmas=true"]),
    ("k-lms", "lms", ["scheduler.use_karras_sigmas=true"]),
    ("k-dpmpp-2m", "dpmsolver", ["scheduler.use_karras_sigmas=true"]),
    ("k-dpmpp-2m-sde", "dpmsolver", ["scheduler.use_karras_sigmas=true", "scheduler.algorithm_type=sde-dpmsolver++"]),
    ("k-euler-ancestral", "euler-ancestral", []),
    ("k-dpm2-ancestral", "kdpm2-ancestral", ["scheduler.use_karras_sigmas=true"]),
    ("k-dpmpp-sde", "dpmsolver-sde", ["scheduler.use_karras_sigmas=true"]),
]


def final(overrides: list[str]) -> tuple[torch.Tensor, diffexp.Experiment]:
    exp = diffexp.prepare(diffexp.compose(["progress=false", "logger=none", "batch_size=2", *overrides]))
    with torch.inference_mode():
        return sample(exp.steps()).x.float(), exp


def compare(model: list[str], steps: int = 10) -> list[tuple[str, str, float]]:
    rows = []
    for k_name, name, options in PAIRS:
        ours, exp = final([*model, f"scheduler={name}", f"steps={steps}", *options])
        own = [float(v) for v in exp.built.scheduler.sigmas]  # second-order classes repeat each level
        levels = [v for i, v in enumerate(own) if i == 0 or v != own[i - 1]]
        schedule = ["schedule=custom", "schedule.sigmas=[" + ",".join(f"{v:.10g}" for v in levels) + "]"]
        theirs, _ = final([*model, f"scheduler={k_name}", *schedule])
        rows.append((k_name, name, float((ours - theirs).abs().max() / ours.abs().max())))
    return rows


def main() -> None:
    from tiny_latent import save_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "digits-ideal": ["model=digits-ideal"],
            "digits-unet": ["model=digits-unet"],
            "tiny SD": ["model=local", f"model.path={save_tiny_sd(Path(tmp) / 'sd')}", "prompt=a cat"],
        }
        for label, model in models.items():
            for k_name, name, diff in compare(model):
                print(f"| {label} | {k_name} | {name} | {diff:.2e} |")


if __name__ == "__main__":
    main()
