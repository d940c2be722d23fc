"""The comparison report of a sweep: python scripts/compare.py SWEEP_DIR

Writes SWEEP_DIR/report.html (one offline page) and SWEEP_DIR/report/ (grid, trajectories, plots, table), or
into --out DIR (e.g. for a read-only sweep folder); a multirun does the same by itself when it ends.
"""

import argparse
import sys
from pathlib import Path

from diffexp.errors import DiffexpError
from diffexp.report.write import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the folder a multirun wrote (outputs/sweeps/<date>/<id>)")
    parser.add_argument("--out", type=Path, default=None, help="write the report here instead of SWEEP_DIR")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, out_dir=args.out)
    except DiffexpError as err:
        print(f"diffexp: {err}", file=sys.stderr)
        return 2
    failed = len(report.failed)
    print(f"{len(report.jobs)} runs ({len(report.jobs) - failed} finished, {failed} not finished)")
    print(f"report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
