"""Train the digits feature network of the offline FID/KID: python scripts/train_features.py

A small CNN classifies the scikit-learn digits at 32x32 (diffexp.metrics.features.DigitsFeatures); its penultimate
layer is the feature space. Training sees shifted and noisy copies, so imperfect samples still get sensible
features, which are finally standardised on all the digits. 80% of the digits train it, 20% measure its
accuracy; the weights and that record go to diffexp/weights/digits-features/model.safetensors. Deterministic on the
CPU for a given seed (about 5 minutes of one core).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffexp.metrics.features import WEIGHTS, DigitsFeatures
from diffexp.sampling.ideal import digits_images, digits_labels


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 3, noise: float = 0.2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (background -1) and Gaussian noise of random strength."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    strength = torch.rand(n, 1, 1, 1, generator=generator) * noise
    return out + strength * torch.randn(out.shape, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images, labels = digits_images(32), digits_labels()
    order = torch.randperm(len(images), generator=g)
    n_val = len(images) // 5
    val, train = order[:n_val], order[n_val:]

    net = DigitsFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = train[torch.randperm(len(train), generator=g)]
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(net.classify(augment(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net.classify(images[val]).argmax(1) == labels[val]).float().mean().item()
        print(f"epoch {epoch + 1:3d}  loss {total / len(train):.4f}  val. accuracy {acc:.4f}")

    with torch.no_grad():  # standardise the features on all the real digits (diffexp.metrics.features)
        features = net.embedding(images)
        net.feature_mean.copy_(features.mean(0))
        net.feature_std.copy_(features.std(0).clamp_min(1e-6))
    info = {
        "val_accuracy": acc,
        "train_images": len(train),
        "val_images": n_val,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(args.out), metadata={"info": json.dumps(info)})
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KB): {json.dumps(info)}")


if __name__ == "__main__":
    main()
