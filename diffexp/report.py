"""The comparison report of a sweep, written into the sweep folder: python scripts/compare.py SWEEP_DIR

- ``report/grid.png``: rows are schedulers (with options), columns are step counts, each cell the first samples
  of that run (same seeds everywhere), captioned with NFE and sampling time; failed cells are marked.
- ``report/trajectories.png``: per scheduler, x0 at each snapshot of its longest run ("step k of N").
- ``report/<metric>.png|svg``: each quality metric against NFE and against wall time, one line per scheduler, with
  the Pareto front; ``report/cost.png|svg``: wall time against NFE.
- ``report/table.csv``, ``report/table.md``: one row per job.
- ``report.html``: all of the above in one offline page (images embedded as data URIs).

Quality metrics are whichever of ``QUALITY`` the runs' metrics.json hold, so the report works with any metrics.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from diffexp.errors import DiffexpError
from diffexp.files import read_status, write_json
from diffexp.images import grid, to_uint8
from diffexp.schedulers import option_signatures, resolve_class, scheduler_label
from diffexp.sweep import SWEEP_FILE, job_folders

Better = Literal["lower", "higher"]

# metrics.json keys that measure quality, and which way is better
QUALITY: dict[str, Better] = {
    "ref_rmse": "lower",
    "ref_psnr": "higher",
    "ref_ssim": "higher",
    "fid": "lower",
    "kid_mean": "lower",
    "nn_dist": "lower",
    "hit_rate": "higher",
    "basin_mismatch": "lower",
}
COSTS: dict[str, str] = {"nfe": "NFE (model calls)", "wall_s": "sampling time (s)"}
SAMPLES_PER_CELL = 4
MAX_FRAMES = 10  # snapshots per trajectory strip
REPORT_DIR = "report"
HTML_FILE = "report.html"
FAILED_COLOR, MUTED = "#c62828", "#757575"


@dataclass
class Job:
    """One job folder of a sweep (or a planned job that never started)."""

    folder: Path | None
    num: int
    status: str  # finished | failed | interrupted | running | not run
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    row: str = ""  # the scheduler label, plus the settings that vary across the sweep

    @property
    def scheduler(self) -> str:
        return str(self.config["scheduler"]["name"])

    @property
    def steps(self) -> int:
        return int(self.config["steps"])

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def samples(self) -> np.ndarray | None:
        path = self.folder / "samples.npy" if self.folder else None
        return np.load(path) if path and path.exists() else None

    def value(self, key: str) -> float | None:
        """A finite number from metrics.json, else None."""
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass
class Report:
    """What was written, and the table ready for ``wandb.Table(columns=report.columns, data=report.table_data())``
    once the ``samples`` column (the run's samples.png relative to ``sweep_dir``, or None for a run that did not
    finish) is wrapped in ``wandb.Image``; the figures are in ``files``."""

    sweep_dir: Path
    jobs: list[Job]
    quality: dict[str, Better]  # the quality keys present in these runs, and which way is better
    columns: list[str]
    rows: list[dict[str, Any]]
    files: dict[str, Path]

    @property
    def html(self) -> Path:
        return self.files["html"]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if not j.finished]

    def table_data(self) -> list[list[Any]]:
        return [[row[c] for c in self.columns] for row in self.rows]


# ---------------------------------------------------------------------------------------------------- loading


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep in job order, with its row label; planned jobs without a folder are 'not run'."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DiffexpError(f"{sweep_dir} is not a folder. Pass the folder of a sweep, e.g. outputs/sweeps/<date>/<id>.")
    jobs = [_load_job(folder) for folder in job_folders(sweep_dir)]
    jobs += _not_started(sweep_dir, {j.num for j in jobs})
    if not jobs:
        raise DiffexpError(
            f"{sweep_dir} holds no sweep jobs (no */.hydra/hydra.yaml). Pass the folder a multirun wrote, "
            "e.g. outputs/sweeps/<date>/<time>-<id>."
        )
    jobs.sort(key=lambda j: j.num)
    _label_rows(jobs)
    return jobs


def _load_job(folder: Path) -> Job:
    hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
    num = int(hydra_cfg["hydra"]["job"].get("num") or 0)
    resolved = folder / "config.yaml"  # written when sampling starts; Hydra's record otherwise
    config = yaml.safe_load((resolved if resolved.exists() else folder / ".hydra" / "config.yaml").read_text())
    status = read_status(folder) or "not run"
    record = json.loads((folder / "status.json").read_text()) if status != "not run" else {}
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if status == "finished" and metrics_path.exists() else {}
    return Job(folder, num, status, config, metrics, record.get("error"))


def _not_started(sweep_dir: Path, seen: set[int]) -> list[Job]:
    """Planned jobs (sweep.json) that have no folder: an interrupted sweep's remainder."""
    path = sweep_dir / SWEEP_FILE
    planned = json.loads(path.read_text()).get("jobs") if path.exists() else None
    missing = [(n, o) for n, o in enumerate(planned or []) if n not in seen]
    if not missing:
        return []
    from omegaconf import OmegaConf

    from diffexp.runner import compose

    jobs = []
    for num, overrides in missing:
        try:
            config = OmegaConf.to_container(compose(overrides), resolve=True, enum_to_str=True)
        except Exception as err:  # configs changed since: still list the job
            config = {"scheduler": {"name": " ".join(overrides)}, "steps": 0}
            jobs.append(Job(None, num, "not run", config, error=f"cannot compose {overrides}: {err}"))
            continue
        jobs.append(Job(None, num, "not run", config, error="the sweep stopped before this job started"))
    return jobs


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _label_rows(jobs: Sequence[Job]) -> None:
    """Row = scheduler label (its non-default options) plus any other setting that varies across the sweep."""
    flats = [
        {k: v for k, v in _flat(j.config).items() if not k.startswith("scheduler.") and k not in ("steps", "progress")}
        for j in jobs
    ]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    for job, flat in zip(jobs, flats, strict=True):
        extra = [f"{k}={flat.get(k)}" for k in varying]
        job.row = " ".join([scheduler_label(job.config["scheduler"]), *extra])


def options_text(scheduler: Mapping[str, Any]) -> str:
    """The options that differ from the diffusers class default, as key=value."""
    try:
        init, step = option_signatures(resolve_class(str(scheduler["name"])))
    except DiffexpError:
        return ""
    params = {**init, **step}
    return ", ".join(
        f"{k}={v}" for k, v in scheduler.items() if k in params and v is not None and v != params[k].default
    )


# ---------------------------------------------------------------------------------------------------- figures


def _layout(jobs: Sequence[Job]) -> tuple[list[str], list[int], dict[tuple[str, int], Job]]:
    rows = list(dict.fromkeys(j.row for j in jobs))
    cols = sorted({j.steps for j in jobs})
    cells: dict[tuple[str, int], Job] = {}
    for j in jobs:  # a later attempt of the same cell wins only if it finished
        if (j.row, j.steps) not in cells or j.finished:
            cells[(j.row, j.steps)] = j
    return rows, cols, cells


def _caption(job: Job, quality: Sequence[str]) -> str:
    m = job.metrics
    text = f"NFE {m.get('nfe', '?')} · {_fmt_time(job.value('wall_s'))}"
    if quality and job.value(quality[0]) is not None:
        text += f"\n{quality[0]} {job.value(quality[0]):.4g}"
    return text


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _image(x: np.ndarray) -> np.ndarray:
    """The grid of a batch as an image array (H, W) or (H, W, 3)."""
    return np.asarray(grid(torch.from_numpy(x), nrow=x.shape[0]))


def _cell_status(ax: Any, job: Job | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if job is None:
        ax.text(0.5, 0.5, "not in this sweep", ha="center", va="center", color=MUTED, fontsize=9)
        for s in ax.spines.values():
            s.set_color("#e0e0e0")
        return
    failed = job.status in ("failed", "interrupted")
    ax.set_facecolor("#fdecea" if failed else "#f5f5f5")
    for s in ax.spines.values():
        s.set_color(FAILED_COLOR if failed else MUTED)
        s.set_linewidth(2 if failed else 1)
    ax.text(
        0.5, 0.68, job.status.upper(), ha="center", va="center", fontsize=11, weight="bold",
        color=FAILED_COLOR if failed else MUTED, transform=ax.transAxes,
    )  # fmt: skip
    if job.error:
        short = textwrap.shorten(job.error, 70, placeholder=" …")
        ax.text(
            0.5, 0.3, "\n".join(textwrap.wrap(short, 34)), ha="center", va="center", fontsize=7,
            color=FAILED_COLOR if failed else MUTED, transform=ax.transAxes,
        )  # fmt: skip


def grid_figure(jobs: Sequence[Job], quality: Sequence[str], title: str) -> Figure:
    """Rows: schedulers; columns: steps; cells: the first samples of each run (same seeds), captioned."""
    rows, cols, cells = _layout(jobs)
    first = next((x for j in jobs if j.finished and (x := j.samples()) is not None), None)
    k = min(SAMPLES_PER_CELL, first.shape[0]) if first is not None else SAMPLES_PER_CELL
    shape = _image(first[:k]).shape if first is not None else (1, k)
    img_h = (1.0 if shape[0] <= 70 else 1.6) if shape[1] / shape[0] < 6 else 0.8  # inches; larger images larger
    img_w = img_h * shape[1] / shape[0]
    col_w = max(img_w, 1.9)  # room for the caption and for a failure's message
    cap_h = 0.5 if quality else 0.36
    label_w = 0.3 + 0.085 * max(len(r) for r in rows)
    pitch_w, pitch_h = col_w + 0.25, img_h + cap_h + 0.12
    head, pad = 0.95, 0.15
    what = f"the first {k} samples" if k > 1 else "the first sample"
    subtitle = f"each cell: {what} (the same seeds in every cell) · NFE · sampling time"
    W = max(label_w + pitch_w * len(cols) + pad, 2 * pad + 0.075 * max(len(subtitle), 1.2 * len(title)))
    H = head + pitch_h * len(rows) + pad
    fig = Figure(figsize=(W, H), dpi=110)
    fig.text(pad / W, 1 - 0.25 / H, title, fontsize=12, weight="bold", va="center")
    fig.text(pad / W, 1 - 0.52 / H, subtitle, fontsize=9, color=MUTED, va="center")
    for c, steps in enumerate(cols):
        x = (label_w + c * pitch_w + col_w / 2) / W
        fig.text(x, 1 - 0.8 / H, f"{steps} steps", ha="center", va="center", fontsize=11, weight="bold")
    for r, row in enumerate(rows):
        y0 = H - head - (r + 1) * pitch_h + cap_h
        fig.text((label_w - 0.15) / W, (y0 + img_h / 2) / H, row, ha="right", va="center", fontsize=10, weight="bold")
        for c, steps in enumerate(cols):
            job = cells.get((row, steps))
            x = job.samples() if job is not None and job.finished else None
            left = label_w + c * pitch_w
            if x is None:
                _cell_status(fig.add_axes((left / W, y0 / H, col_w / W, img_h / H)), job)
                continue
            ax = fig.add_axes(((left + (col_w - img_w) / 2) / W, y0 / H, img_w / W, img_h / H))
            image = _image(x[:k])
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_aspect("auto")
            ax.set_axis_off()
            ax.text(0.5, -0.06, _caption(job, quality), transform=ax.transAxes, ha="center", va="top", fontsize=9)
    return fig


def _trajectory_job(jobs: Sequence[Job], row: str) -> Job | None:
    """The longest finished run of a row that saved its trajectory."""
    done = [j for j in jobs if j.row == row and j.finished and j.folder and (j.folder / "trajectory.npz").exists()]
    return max(done, key=lambda j: j.steps) if done else None


def trajectory_figure(jobs: Sequence[Job]) -> Figure | None:
    """Per scheduler, x0 (the predicted clean image) of the first sample at each snapshot of one N-step run."""
    rows, _, _ = _layout(jobs)
    picked = [(row, j) for row in rows if (j := _trajectory_job(jobs, row)) is not None]
    if not picked:
        return None
    strips = []
    for row, job in picked:
        with np.load(job.folder / "trajectory.npz") as t:
            x0, steps = t["x0"][:, 0], t["step"]
        idx = np.unique(np.linspace(0, len(steps) - 1, min(MAX_FRAMES, len(steps))).round().astype(int))
        strips.append((row, job, x0[idx], steps[idx]))
    size, label_w, head = 0.95, 0.3 + 0.085 * max(len(r) for r, *_ in strips), 0.75
    frames = max(len(s) for *_, s in strips)
    pitch_w, pitch_h = size + 0.2, size + 0.45
    W, H = label_w + pitch_w * frames + 0.2, head + pitch_h * len(strips) + 0.1
    fig = Figure(figsize=(W, H), dpi=110)
    fig.text(0.15 / W, 1 - 0.25 / H, "x0 along one run of each scheduler", fontsize=12, weight="bold", va="center")
    fig.text(
        0.15 / W, 1 - 0.52 / H,
        "the predicted clean image of the first sample at snapshots of its longest run (step k of N)",
        fontsize=9, color=MUTED, va="center",
    )  # fmt: skip
    for r, (row, job, x0, steps) in enumerate(strips):
        y0 = H - head - (r + 1) * pitch_h + 0.1
        fig.text((label_w - 0.15) / W, (y0 + size / 2) / H, row, ha="right", va="center", fontsize=10, weight="bold")
        for c, (img, step) in enumerate(zip(x0, steps, strict=True)):
            ax = fig.add_axes(((label_w + c * pitch_w) / W, y0 / H, size / W, size / H))
            pixels = to_uint8(torch.from_numpy(img[None]))[0]
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            ax.set_title(f"step {int(step)} of {job.steps}", fontsize=8, pad=3)
    return fig


def pareto_front(x: Sequence[float], y: Sequence[float], better: Better) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and better y, sorted by x."""
    sign = 1.0 if better == "lower" else -1.0
    order = sorted(range(len(x)), key=lambda i: (x[i], sign * y[i]))
    front, best = [], math.inf
    for i in order:
        if sign * y[i] < best:
            front.append(i)
            best = sign * y[i]
    return front


def quality_figure(jobs: Sequence[Job], key: str, better: Better) -> Figure:
    """``key`` against NFE and against wall time, one line per scheduler, the Pareto front dashed."""
    fig = Figure(figsize=(12, 4.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    rows, _, _ = _layout(jobs)
    done = [j for j in jobs if j.finished and j.value(key) is not None]
    colors = _colors(len(rows))
    for ax, (cost, cost_label) in zip(axes, COSTS.items(), strict=True):
        for row, color in zip(rows, colors, strict=True):
            pts = sorted((j.value(cost), j.value(key)) for j in done if j.row == row and j.value(cost) is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color, label=row, markersize=5, linewidth=1.5)
        pts = [(j.value(cost), j.value(key)) for j in done if j.value(cost) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            front = [pts[i] for i in pareto_front(xs, ys, better)]
            fx, fy = zip(*front, strict=True)
            ax.plot(fx, fy, drawstyle="steps-post", color="black", linestyle="--", linewidth=1, label="Pareto front")
            ax.plot(fx, fy, "o", markersize=11, markerfacecolor="none", markeredgecolor="black")
        ax.set_xscale("log")
        _plain_log_ticks(ax, "x")
        ax.set_xlabel(f"{cost_label} (log scale)")
        ax.set_ylabel(f"{key} ({better} is better)")
        ax.grid(True, alpha=0.3, which="both")
        ax.set_title(f"{key} vs {cost_label.split(' (')[0]}", fontsize=11)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.suptitle(f"{key}: {better} is better; the dashed line is the Pareto front (no run is cheaper and better)")
    return fig


def cost_figure(jobs: Sequence[Job]) -> Figure:
    """Sampling time against NFE, one line per scheduler: the cost of a model call and the overhead."""
    fig = Figure(figsize=(8, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    rows, _, _ = _layout(jobs)
    for row, color in zip(rows, _colors(len(rows)), strict=True):
        pts = sorted((j.value("nfe"), j.value("wall_s")) for j in jobs if j.row == row and j.finished)
        pts = [p for p in pts if None not in p]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=color, label=row, markersize=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax, "x", "y")
    ax.set_xlabel("NFE (model calls, log scale)")
    ax.set_ylabel("sampling time (s, log scale)")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title("cost: sampling time against model calls")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    return fig


def _plain_log_ticks(ax: Any, *axes: str) -> None:
    """Log axes labelled 2, 5, 10, 20, 50 rather than 5x10^0."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _: Any) -> str:
        mantissa = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""

    for a in axes:
        axis = ax.xaxis if a == "x" else ax.yaxis
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(minor))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- table


def table(jobs: Sequence[Job], quality: Sequence[str], sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per job, in grid order."""
    columns = [
        "scheduler", "options", "steps", "nfe", "wall_s", "images_per_s", "peak_mem_mb", *quality,
        "status", "error", "folder", "samples",
    ]  # fmt: skip
    rows_order, cols_order, _ = _layout(jobs)
    ordered = sorted(jobs, key=lambda j: (rows_order.index(j.row), cols_order.index(j.steps), j.num))
    rows = []
    for j in ordered:
        samples = j.folder / "samples.png" if j.folder and j.finished else None
        rows.append(
            {
                "scheduler": j.row,
                "options": options_text(j.config["scheduler"]),
                "steps": j.steps,
                **{k: j.metrics.get(k) for k in ("nfe", "wall_s", "images_per_s", "peak_mem_mb", *quality)},
                "status": j.status,
                "error": j.error or "",
                "folder": j.folder.name if j.folder else "",
                "samples": str(samples.relative_to(sweep_dir)) if samples and samples.exists() else None,
            }
        )
    return columns, rows


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if key == "wall_s":
            return f"{v:.3g}"
        if key == "peak_mem_mb":
            return f"{v:.0f}"
        return f"{v:.4g}"
    return str(v)


HEADERS = {
    "scheduler": "scheduler",
    "options": "options",
    "steps": "steps",
    "nfe": "NFE",
    "wall_s": "time (s)",
    "images_per_s": "images/s",
    "peak_mem_mb": "memory (MB)",
    "status": "status",
    "error": "error",
}


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)
    return path


def _shown(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c not in ("folder", "samples")]


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    shown = _shown(columns)

    def cell(c: str, v: Any) -> str:
        text = textwrap.shorten(_fmt(c, v), 80, placeholder=" …") if c == "error" else _fmt(c, v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- page


def _save(fig: Figure, path: Path, svg: bool = False) -> Path:
    fig.savefig(path, facecolor="white")
    if svg:
        fig.savefig(path.with_suffix(".svg"), facecolor="white")
    return path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _sweep_command(sweep_dir: Path) -> str:
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return ""
    cfg = yaml.safe_load(path.read_text())
    params = (cfg.get("hydra", {}).get("sweeper") or {}).get("params") or {}
    task = cfg.get("hydra", {}).get("overrides", {}).get("task") or []
    args = [a for a in task if not any(a.startswith(f"{k}=") for k in params)]
    args += [f"{k}={v}" for k, v in params.items() if not any(a.startswith(f"{k}=") for a in task)]
    return "python scripts/run.py -m " + " ".join(args)


def _summary(jobs: Sequence[Job]) -> dict[str, Any]:
    done = [j for j in jobs if j.finished]
    m = done[0].metrics if done else {}
    seeds = sorted({int(j.config.get("seed", 0)) for j in jobs})
    batches = sorted({int(j.config.get("batch_size", 0)) for j in jobs})
    return {
        "model": ", ".join(sorted({str(j.config.get("model", {}).get("name")) for j in jobs})),
        "samples": ", ".join(f"seeds {s}..{s + b - 1}" for s in seeds for b in batches),
        "device": f"{m.get('device', '?')} ({m.get('device_name', '?')})" if m else "?",
        "precision": ", ".join(sorted({str(j.config.get("precision")) for j in jobs})),
        "versions": f"torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}" if m else "?",
        "jobs": len(jobs),
        "finished": len(done),
        "not finished": len(jobs) - len(done),
    }


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1rem; color: #212121; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #e0e0e0; padding-bottom: .2rem; }
.muted { color: #757575; } .summary td { padding: .1rem 1rem .1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #eeeeee; }
table.runs { border-collapse: collapse; font-size: .9rem; }
table.runs th, table.runs td { border: 1px solid #e0e0e0; padding: .25rem .5rem; text-align: right; }
table.runs td.text, table.runs th.text { text-align: left; white-space: nowrap; }
table.runs td.error { text-align: left; }
table.runs tr.failed td { background: #fdecea; color: #b71c1c; }
table.runs tr.notrun td { background: #f5f5f5; color: #757575; }
code { background: #f5f5f5; padding: .1rem .3rem; border-radius: 3px; }
ul.failures li { color: #b71c1c; }
"""


def html_page(report: Report, images: Mapping[str, Path], title: str, searched: Sequence[str] = tuple(QUALITY)) -> str:
    e = html.escape
    s = _summary(report.jobs)
    failed = report.failed
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="muted">{e(str(report.sweep_dir))} · written {time.strftime("%Y-%m-%d %H:%M")}</p>',
        '<table class="summary">',
        *[f"<tr><td><b>{e(k)}</b></td><td>{e(str(v))}</td></tr>" for k, v in s.items()],
        "</table>",
    ]
    command = _sweep_command(report.sweep_dir)
    if command:
        parts.append(f"<p>Sweep: <code>{e(command)}</code></p>")
    parts += [
        "<h2>How to read this page</h2><ul>",
        "<li>Every run starts from the same noise (the same seeds), so the cells of a column differ only by the "
        "scheduler; more steps should change a sample less and less.</li>",
        "<li><b>NFE</b> is the number of model calls: second-order schedulers (Heun, KDPM2, DPM-SDE) make about "
        "two per step, so compare schedulers at equal NFE or equal time, not at equal steps.</li>",
        "<li>The time is sampling only (model loading excluded); memory is the peak during sampling.</li>",
        "<li>Runs that did not finish are marked in red, with their error, in the grid and the table.</li></ul>",
        "<h2>Samples: schedulers × steps</h2>",
        f'<img id="grid" alt="grid of samples, schedulers by steps" src="{_data_uri(images["grid"])}">',
        "<h2>Quality against cost</h2>",
    ]
    if report.quality:
        for key, better in report.quality.items():
            parts.append(
                f'<h3>{e(key)} <span class="muted">({better} is better)</span></h3>'
                f'<img alt="{e(key)} against NFE and time" src="{_data_uri(images[key])}">'
            )
    else:
        parts.append(
            '<p class="muted">These runs hold no quality metric (metrics.json has none of '
            f"{e(', '.join(searched))}), so there is nothing to plot against cost yet.</p>"
        )
    parts.append(f'<img alt="sampling time against NFE" src="{_data_uri(images["cost"])}">')
    parts += ["<h2>All runs</h2>", _html_table(report)]
    if "trajectories" in images:
        parts += [
            "<h2>Trajectories: step k of N</h2>",
            '<p class="muted">Step k of an N-step run is not a k-step run: these are x0 predictions along one run.</p>',
            f'<img alt="x0 at each snapshot of one run per scheduler" src="{_data_uri(images["trajectories"])}">',
        ]
    if failed:
        parts.append("<h2>Runs that did not finish</h2><ul class='failures'>")
        parts += [
            f"<li><b>{e(j.row)}, {j.steps} steps</b> ({e(j.status)}, {e(j.folder.name if j.folder else 'no folder')})"
            f": {e(j.error or 'no error recorded')}</li>"
            for j in failed
        ]
        parts.append("</ul>")
    parts += [
        "<h2>Files</h2><p>In the sweep folder: <code>report/table.csv</code>, <code>report/table.md</code>, the "
        "figures as PNG and SVG in <code>report/</code>, and one folder per run. Rebuild this page with "
        f"<code>python scripts/compare.py {e(str(report.sweep_dir))}</code>.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _html_table(report: Report) -> str:
    e = html.escape
    shown = _shown(report.columns)
    text_cols = {"scheduler", "options", "status"}
    head = "".join(
        f'<th class="{"text" if c in text_cols | {"error"} else ""}">{e(HEADERS.get(c, c))}</th>' for c in shown
    )
    body = []
    for row in report.rows:
        cls = (
            "failed" if row["status"] in ("failed", "interrupted") else "" if row["status"] == "finished" else "notrun"
        )
        cells = "".join(f'<td class="{"text" if c in text_cols else c}">{e(_fmt(c, row[c]))}</td>' for c in shown)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_report(sweep_dir: Path, quality: Mapping[str, Better] = QUALITY) -> Report:
    """Write every part of the report into ``sweep_dir``; ``quality`` maps metrics.json keys to their direction."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs = load_jobs(sweep_dir)
    present = {k: b for k, b in quality.items() if any(j.value(k) is not None for j in jobs if j.finished)}
    out = sweep_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    summary = _summary(jobs)
    title = f"Scheduler comparison: {summary['model']}"
    images: dict[str, Path] = {"grid": _save(grid_figure(jobs, list(present), title), out / "grid.png")}
    for key, better in present.items():
        images[key] = _save(quality_figure(jobs, key, better), out / f"{key}.png", svg=True)
    images["cost"] = _save(cost_figure(jobs), out / "cost.png", svg=True)
    strips = trajectory_figure(jobs)
    if strips is not None:
        images["trajectories"] = _save(strips, out / "trajectories.png")
    columns, rows = table(jobs, list(present), sweep_dir)
    files = dict(images)
    files["csv"] = write_csv(out / "table.csv", columns, rows)
    (out / "table.md").write_text(markdown_table(columns, rows))
    files["md"] = out / "table.md"
    report = Report(sweep_dir, jobs, present, columns, rows, files)
    html_path = sweep_dir / HTML_FILE
    html_path.write_text(html_page(report, images, title, list(quality)))
    files["html"] = html_path
    write_json(out / "report.json", {"quality": present, "columns": columns, "rows": rows})
    return report
