"""FID statistics of a real set, computed once: python scripts/fid_stats.py FOLDER OUT.npz --features digits

Writes ``mu`` and ``sigma`` (the mean and covariance of the images' features, as pytorch-fid and clean-fid write
them) plus ``n``, ``features``, ``size``, ``channels`` and ``residual_noise_p99`` (the limit of the residual-noise
metric, diffexp/metrics/residual_noise.py); a run takes it as ``metrics.fid.real=OUT.npz`` (FID only:
KID needs the features themselves). Images are resized to ``--size`` as a run resizes its real set: use the
resolution of the samples you will compare.
"""

import argparse
import sys
from pathlib import Path

import torch

from diffexp.errors import DiffexpError
from diffexp.metrics.features import feature_net
from diffexp.metrics.real_stats import image_files, real_images, write_stats
from diffexp.metrics.residual_noise import SIZE, STATS_KEY, limit_of
from diffexp.settings import compose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", metavar=REAL, help="a folder of images, or 'digits' (the scikit-learn digits)")
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--features", choices=["digits", "inception"], default="digits")
    parser.add_argument("--size", type=positive, default=None, help="resolution (default: the first image's width)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=None, help="default: digits 1, inception 3")
    parser.add_argument("--inception-weights", default=None, help="a local copy of the Inception weights")
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/cache"), help="where weights are looked for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        overrides = [f"metrics.fid.features={args.features}"]
        if args.inception_weights:
            overrides.append(f"metrics.fid.inception_weights={args.inception_weights}")
        net = feature_net(compose(overrides).metrics.fid, torch.device(args.device), args.cache_dir)
        size = args.size or (32 if args.real == "digits" else _width(image_files(args.real, REAL)[0]))
        channels = args.channels or (1 if args.features == "digits" else 3)
        limit = limit_of(real_images(args.real, (channels, SIZE, SIZE), REAL))  # residual noise (its 32 px)
        info = write_stats(args.out, net, args.real, (channels, size, size), REAL, {STATS_KEY: limit})
    except DiffexpError as err:
        print(f"diffexp: {err}", file=sys.stderr)
        return 2
    print(f"{info['n']} images, {info['features']}, {channels}x{size}x{size}: {args.out}")
    return 0


REAL = "REAL"  # the argument that names the real set, as messages name it


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (a resolution in pixels)")
    return value


def _width(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width


if __name__ == "__main__":
    sys.exit(main())
