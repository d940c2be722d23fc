"""Where guided grain comes from on the digits: the networks' x0 error off the data's own subspace, per branch.

The digits are 8x8 images upsampled bilinearly to 32x32, so every training image lies in a 64-dimensional linear
subspace of the 1024 pixels (the span of the upsampled 8x8 basis images): an exact denoiser's x0 lies in it too, for
any label. Whatever a network's x0 puts outside it is high-frequency grain. Guidance at scale s returns
``x0_u + s (x0_c - x0_u)``, so it multiplies the part of the grain where the conditional and unconditional branches
differ. For real digits noised to timestep t, this prints the mean squared off-subspace energy of each branch's x0,
of their difference (and its ratio to the sum: 0 for identical errors, 1 for independent ones) and of the guided x0.

    python scripts/guidance_grain.py digits-cond digits-dit --timesteps 20 50 100 200 400
"""

from __future__ import annotations

import argparse

import torch

from diffexp.sampling.ideal import digits_images, digits_labels, upsample_digits
from diffexp.sampling.models import load_model
from diffexp.sampling.parameterisation import x0_from_output
from diffexp.settings import model_config


def off_subspace(size: int = 32) -> torch.Tensor:
    """The projection onto the complement of the bilinearly upsampled 8x8 images: (size^2, size^2)."""
    up = upsample_digits(torch.eye(64).reshape(64, 1, 8, 8), size).reshape(64, -1).T
    return torch.eye(size * size) - up @ torch.linalg.pinv(up)


def energy(x: torch.Tensor, projection: torch.Tensor) -> float:
    flat = x.reshape(x.shape[0], -1)
    return (flat @ projection.T).pow(2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="class-conditional digits models: digits-cond, digits-dit ...")
    parser.add_argument("--timesteps", nargs="+", type=int, default=[20, 50, 100, 200, 400])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 5.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    projection = off_subspace()
    pick = torch.randperm(1797)[: args.samples]
    x0, labels = digits_images()[pick], digits_labels()[pick]
    print(f"real digits: off-subspace energy {energy(x0, projection):.1e}")
    scales = " | ".join(f"guided s = {s:g}" for s in args.scales)
    print(f"| model | t | cond | uncond | cond - uncond (ratio) | {scales} |")
    print("|---" * (5 + len(args.scales)) + "|")
    for name in args.models:
        loaded = load_model(model_config(name), torch.device("cpu"))
        net, kind = loaded.model.eval(), loaded.scheduler_config["prediction_type"]
        alphas = DDPMScheduler.from_config(loaded.scheduler_config).alphas_cumprod
        null = torch.full_like(labels, loaded.null_class)
        for t in args.timesteps:
            a, b = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
            xt = a * x0 + b * torch.randn_like(x0)
            steps = torch.full((len(x0),), t)
            with torch.no_grad():
                cond = x0_from_output(net(xt, steps, class_labels=labels).sample, xt, a, b, kind)
                uncond = x0_from_output(net(xt, steps, class_labels=null).sample, xt, a, b, kind)
            ec, eu, ed = energy(cond, projection), energy(uncond, projection), energy(cond - uncond, projection)
            guided = [energy(uncond + s * (cond - uncond), projection) for s in args.scales]
            cells = [f"{ec:.2e}", f"{eu:.2e}", f"{ed:.2e} ({ed / (ec + eu):.2f})", *(f"{g:.2e}" for g in guided)]
            print(f"| {name} | {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
