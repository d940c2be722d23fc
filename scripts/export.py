"""A finished run's samples for external FID tools: python scripts/export.py RUN_DIR

Writes RUN_DIR/export/png/000000.png ... (one PNG per sample, grey kept 1-channel) and RUN_DIR/export/samples.npz
(``arr_0``: uint8 NHWC, grey repeated to RGB), the inputs of torch-fidelity, clean-fid, pytorch-fid and
guided-diffusion's evaluator.
"""

import argparse
import sys
from pathlib import Path

from diffexp.errors import DiffexpError
from diffexp.runner.export import export_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the folder a finished run wrote")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")
    parser.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="write the PNG folder")
    parser.add_argument("--npz", type=Path, default=None, help="the .npz path (default: OUT/samples.npz)")
    parser.add_argument("--no-npz", action="store_true", help="write no .npz")
    args = parser.parse_args(argv)
    try:
        done = export_run(args.run_dir, args.out, png=args.png, npz=False if args.no_npz else (args.npz or True))
    except DiffexpError as err:
        print(f"diffexp: {err}", file=sys.stderr)
        return 2
    if done.png_dir is not None:
        print(f"{done.count} PNGs: {done.png_dir}")
    if done.npz is not None:
        print(f"arr_0 {done.npz_shape} uint8: {done.npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
