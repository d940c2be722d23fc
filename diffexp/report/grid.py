"""The report's picture figures: the samples grid (schedulers x steps) and the x0 trajectory strips."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from diffexp.report.jobs import Job, layout
from diffexp.sampling.images import grid, to_uint8

SAMPLES_PER_CELL = 4
MAX_FRAMES = 10  # snapshots per trajectory strip
FAILED_COLOR, MUTED = "#c62828", "#757575"
TRAJECTORY_FILE = "trajectory.npz"  # a run's x0 snapshots


def fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def caption(job: Job, quality: Sequence[str]) -> str:
    """Under a cell: NFE, sampling time, the first quality metric and a text model's prompts."""
    text = f"NFE {job.metrics.get('nfe', '?')} · {fmt_time(job.value('wall_s'))}"
    first = job.value(quality[0]) if quality else None
    if first is not None:
        text += f"\n{quality[0]} {first:.4g}"
    prompts = (job.metrics.get("latent") or {}).get("prompts")  # a text model's, sample by sample
    if prompts:
        text += "\n" + " | ".join(prompts[:SAMPLES_PER_CELL])
    return text


def _image(x: np.ndarray) -> np.ndarray:
    """The grid of a batch as an image array (H, W) or (H, W, 3)."""
    return np.asarray(grid(torch.from_numpy(x), nrow=x.shape[0]))


def draw_cell_status(ax: Any, job: Job | None) -> None:
    """A cell without samples: absent from the sweep, or its status (failures in red) and error."""
    ax.set_xticks([])
    ax.set_yticks([])
    if job is None:
        ax.text(0.5, 0.5, "not in this sweep", ha="center", va="center", color=MUTED, fontsize=9)
        for s in ax.spines.values():
            s.set_color("#e0e0e0")
        return
    color = FAILED_COLOR if job.failed else MUTED
    ax.set_facecolor("#fdecea" if job.failed else "#f5f5f5")
    for s in ax.spines.values():
        s.set_color(color)
        s.set_linewidth(2 if job.failed else 1)
    ax.text(
        0.5, 0.68, job.status.upper(), ha="center", va="center", fontsize=11, weight="bold", color=color,
        transform=ax.transAxes,
    )  # fmt: skip
    if job.error:
        short = textwrap.shorten(job.error, 70, placeholder=" …")
        wrapped = "\n".join(textwrap.wrap(short, 34))
        ax.text(0.5, 0.3, wrapped, ha="center", va="center", fontsize=7, color=color, transform=ax.transAxes)


def _headed_figure(width: float, height: float, title: str, subtitle: str) -> Figure:
    """A figure of ``width`` x ``height`` inches with a bold title and a muted subtitle at its top left."""
    fig = Figure(figsize=(width, height), dpi=110)
    fig.text(0.15 / width, 1 - 0.25 / height, title, fontsize=12, weight="bold", va="center")
    fig.text(0.15 / width, 1 - 0.52 / height, subtitle, fontsize=9, color=MUTED, va="center")
    return fig


def _row_label(fig: Figure, text: str, right: float, middle: float, size: tuple[float, float]) -> None:
    """A row's name, right-aligned at ``right`` inches, centred on ``middle`` inches from the bottom."""
    W, H = size
    fig.text(right / W, middle / H, text, ha="right", va="center", fontsize=10, weight="bold")


def grid_figure(jobs: Sequence[Job], quality: Sequence[str], title: str) -> Figure:
    """Rows: schedulers; columns: steps; cells: the first samples of each run (same seeds), captioned."""
    rows, cols, cells = layout(jobs)
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
    fig = _headed_figure(W, H, title, subtitle)
    for c, steps in enumerate(cols):
        x = (label_w + c * pitch_w + col_w / 2) / W
        fig.text(x, 1 - 0.8 / H, f"{steps} steps", ha="center", va="center", fontsize=11, weight="bold")
    for r, row in enumerate(rows):
        y0 = H - head - (r + 1) * pitch_h + cap_h
        _row_label(fig, row, label_w - 0.15, y0 + img_h / 2, (W, H))
        for c, steps in enumerate(cols):
            job = cells.get((row, steps))
            x = job.samples() if job is not None and job.finished else None
            left = label_w + c * pitch_w
            if x is None:
                draw_cell_status(fig.add_axes((left / W, y0 / H, col_w / W, img_h / H)), job)
                continue
            ax = fig.add_axes(((left + (col_w - img_w) / 2) / W, y0 / H, img_w / W, img_h / H))
            image = _image(x[:k])
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_aspect("auto")
            ax.set_axis_off()
            ax.text(0.5, -0.06, caption(job, quality), transform=ax.transAxes, ha="center", va="top", fontsize=9)
    return fig


def _trajectory_job(jobs: Sequence[Job], row: str) -> Job | None:
    """The longest finished run of a row that saved its trajectory."""
    done = [j for j in jobs if j.row == row and j.finished and j.folder and (j.folder / TRAJECTORY_FILE).exists()]
    return max(done, key=lambda j: j.steps) if done else None


def trajectory_figure(jobs: Sequence[Job]) -> Figure | None:
    """Per scheduler, x0 (the predicted clean image) of the first sample at each snapshot of one N-step run."""
    picked = [(row, j) for row in layout(jobs).rows if (j := _trajectory_job(jobs, row)) is not None]
    if not picked:
        return None
    strips = []
    for row, job in picked:
        assert job.folder is not None  # _trajectory_job picks jobs with a folder
        with np.load(job.folder / TRAJECTORY_FILE) as t:
            x0, steps = t["x0"][:, 0], t["step"]
        idx = np.unique(np.linspace(0, len(steps) - 1, min(MAX_FRAMES, len(steps))).round().astype(int))
        strips.append((row, job, x0[idx], steps[idx]))
    size, label_w, head = 0.95, 0.3 + 0.085 * max(len(r) for r, *_ in strips), 0.75
    frames = max(len(s) for *_, s in strips)
    pitch_w, pitch_h = size + 0.2, size + 0.45
    W, H = label_w + pitch_w * frames + 0.2, head + pitch_h * len(strips) + 0.1
    fig = _headed_figure(
        W, H, "x0 along one run of each scheduler",
        "the predicted clean image of the first sample at snapshots of its longest run (step k of N)",
    )  # fmt: skip
    for r, (row, job, x0, steps) in enumerate(strips):
        y0 = H - head - (r + 1) * pitch_h + 0.1
        _row_label(fig, row, label_w - 0.15, y0 + size / 2, (W, H))
        for c, (img, step) in enumerate(zip(x0, steps, strict=True)):
            ax = fig.add_axes(((label_w + c * pitch_w) / W, y0 / H, size / W, size / H))
            pixels = to_uint8(torch.from_numpy(img[None]))[0]
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            ax.set_title(f"step {int(step)} of {job.steps}", fontsize=8, pad=3)
    return fig
