"""The W&B dashboard of a sweep: python scripts/dashboard.py --entity E --project diffexp --group G [--dry-run]

Builds a saved workspace and a report that compare the sweep's schedulers (quality against cost, trajectories,
the effective scheduler configs, cost) from what the sweep's runs logged, writes their specification to
SWEEP_DIR/dashboard.json and, unless --dry-run, saves both to W&B and prints their URLs.
"""

import argparse
import sys
from pathlib import Path

from diffexp.errors import DiffexpError
from diffexp.folders import DASHBOARD_FILE
from diffexp.report.dashboard import build, offline_reason
from diffexp.report.logged import find_sweeps, read_logged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="*", help="sweep folders (default: found by --group)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: the API key's)")
    parser.add_argument("--project", default="diffexp", help="W&B project (default: diffexp)")
    parser.add_argument("--group", action="append", default=[], help="a W&B group (a sweep); repeat for several")
    parser.add_argument("--metric", default=None, help="the quality key of the parallel coordinates")
    parser.add_argument("--sweeps", type=Path, default=Path("outputs/sweeps"), help="where to find --group's sweep")
    parser.add_argument("--out", type=Path, default=None, help=f"default: SWEEP_DIR/{DASHBOARD_FILE}")
    parser.add_argument("--dry-run", action="store_true", help="write the specification only; save nothing")
    args = parser.parse_args(argv)
    if not args.sweep_dirs and not args.group:
        parser.error("pass a sweep folder or --group")
    try:
        logged = read_logged(args.sweep_dirs or find_sweeps(args.group, args.sweeps))
    except DiffexpError as err:
        print(f"diffexp: {err}", file=sys.stderr)
        return 2
    logged.groups = args.group or logged.groups
    why = None if args.dry_run else offline_reason()
    dashboard = build(logged, args.entity or "", args.project, args.metric)
    path = dashboard.write(args.out or logged.sweep_dirs[0] / DASHBOARD_FILE)
    sections = ", ".join(f"{name} ({len(panels)})" for name, panels in dashboard.sections)
    print(f"dashboard of {', '.join(dashboard.groups)}: {sections}; specification: {path}")
    if args.dry_run:
        return 0
    urls = None
    try:
        urls = None if why else dashboard.save()
    except Exception as err:  # no network, a wrong entity, ...: W&B says why
        why = f"W&B refused or could not be reached ({str(err).strip().splitlines()[0] if str(err).strip() else err!r})"
    if urls is None:
        print(
            f"\ndiffexp: the dashboard was not saved to W&B: {why}. Its specification is in {path}. To save it, "
            "log in once with `wandb login` (or set WANDB_API_KEY), make sure the W&B server can be reached, sync "
            "the sweep's offline runs (wandb sync SWEEP_DIR/*/wandb/offline-run-*) so that the panels have data, "
            "and run this command again without --dry-run.",
            file=sys.stderr,
        )
        return 1
    print(f"workspace: {urls['workspace']}\nreport: {urls['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
