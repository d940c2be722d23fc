"""The comparison as a W&B run: the report's table, with each run's samples in its row, and its figures."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from diffexp.config import LoggerConfig
from diffexp.report.write import REPORT_DIR, Report
from diffexp.tracking.session import finish_run, reason, start_run

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

log = logging.getLogger("diffexp")


def log_report(
    logger_cfg: LoggerConfig | Any | None, report: Report, group: str | None, links: dict[str, str] | None = None
) -> Run | None:
    """The comparison as a W&B run (``job_type=compare``) in the sweep's group: the table, with each run's final
    samples in its row, and the report's figures; ``links`` (the saved dashboard's ``workspace`` and ``report``
    URLs) go in its summary as ``dashboard_workspace`` and ``dashboard_report``. None when logging is off or W&B
    cannot start."""
    run = start_run(
        logger_cfg,
        report.sweep_dir / REPORT_DIR,
        f"compare-{report.sweep_dir.name}",
        "compare",
        {"sweep_dir": str(report.sweep_dir), "jobs": len(report.jobs), "quality_metrics": list(report.quality)},
        group,
    )
    if run is None:
        return None
    error: BaseException | None = None
    try:
        import wandb

        def cell(row: dict[str, Any], column: str) -> Any:
            value = row[column]
            return wandb.Image(str(report.sweep_dir / value)) if column == "samples" and value else value

        rows = [[cell(row, c) for c in report.columns] for row in report.rows]
        figures = {k: wandb.Image(str(p)) for k, p in report.files.items() if p.suffix == ".png"}
        run.log({"comparison": wandb.Table(columns=report.columns, data=rows), **figures})
        dashboard = {f"dashboard_{k}": url for k, url in (links or {}).items()}
        run.summary.update({"jobs": len(report.jobs), "failed": len(report.failed), **dashboard})
    except Exception as err:
        error = err
        log.warning("W&B could not log the comparison (%s); the report folder is complete.", reason(err))
    finally:
        finish_run(run, error)
    return run
