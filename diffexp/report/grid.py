"""The report's picture figures: the samples grid (schedulers x steps, per guidance scale) and the x0 trajectories."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from diffexp.images import grid, to_uint8
from diffexp.report.jobs import Job, facet_title, facets, layout, series_order, stated_text

SAMPLES_PER_CELL = 4
MAX_FRAMES = 10  # snapshots per trajectory strip
FAILED_COLOR, MUTED = "#c62828", "#757575"
TRAJECTORY_FILE = "trajectory.npz"  # a run's x0 snapshots


def fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def caption(
    job: Job, quality: Sequence[str], k: int = SAMPLES_PER_CELL, stated: Mapping[str, Sequence[str]] | None = None
) -> str:
    """Under a cell: NFE, sampling time, the first quality metric with the keys it is ``stated`` with (FID: its n
    and feature network), and the classes or a text model's prompts of the ``k`` samples shown."""
    text = f"NFE {job.metrics.get('nfe', '?')} · {fmt_time(job.value('wall_s'))}"
    first = job.value(quality[0]) if quality else None
    if first is not None:
        keys = (stated or {}).get(quality[0], ())
        counts = stated_text([job], [key for key in keys if key.endswith("_n")])
        others = stated_text([job], [key for key in keys if not key.endswith("_n")], sep="\n")
        text += f"\n{quality[0]} {first:.4g}" + (f" ({counts})" if counts else "") + (f"\n{others}" if others else "")
    labels = job.metrics.get("labels")
    if labels:
        text += "\nclasses " + " ".join(str(c) for c in labels[:k])
    prompts = (job.metrics.get("latent") or {}).get("prompts")  # a text model's, sample by sample
    if prompts:
        text += "\n" + " | ".join(prompts[:k])
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


def _draw_cell(fig: Figure, job: Job | None, box: tuple[float, ...], img_w: float, k: int, text: str) -> None:
    """One cell in ``box`` (left, bottom, width, height in inches; ``img_w`` wide images): ``k`` samples, captioned,
    or the cell's status."""
    W, H = fig.get_size_inches()
    left, bottom, width, height = box
    x = job.samples() if job is not None and job.finished else None
    if x is None:
        draw_cell_status(fig.add_axes((left / W, bottom / H, width / W, height / H)), job)
        return
    ax = fig.add_axes(((left + (width - img_w) / 2) / W, bottom / H, img_w / W, height / H))
    image = _image(x[:k])
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_aspect("auto")
    ax.set_axis_off()
    ax.text(0.5, -0.06, text, transform=ax.transAxes, ha="center", va="top", fontsize=9)


def grid_figure(
    jobs: Sequence[Job], quality: Sequence[str], title: str, stated: Mapping[str, Sequence[str]] | None = None
) -> Figure:
    """Rows: schedulers (sampler by sampler, a rule between samplers where the schedule varies, each of its schedules
    a row); columns: steps; cells: the first samples of each run (same seeds), captioned (``stated``: as in
    ``caption``). Where the guidance scale varies (the facet), the facets are stacked, each under its heading."""
    groups = [(g, layout(group)) for g, group in facets(jobs)]
    cols = sorted({j.steps for j in jobs})
    first = next((x for j in jobs if j.finished and (x := j.samples()) is not None), None)
    k = min(SAMPLES_PER_CELL, first.shape[0]) if first is not None else SAMPLES_PER_CELL
    shape = _image(first[:k]).shape if first is not None else (1, k)
    img_h = (1.0 if shape[0] <= 70 else 1.6) if shape[1] / shape[0] < 6 else 0.8  # inches; larger images larger
    img_w = img_h * shape[1] / shape[0]
    col_w = max(img_w, 1.9)  # room for the caption and for a failure's message
    labelled = any(j.metrics.get("labels") for j in jobs)
    prompted = any((j.metrics.get("latent") or {}).get("prompts") for j in jobs)
    keys = (stated or {}).get(quality[0], ()) if quality else ()
    extra = sum(not key.endswith("_n") for key in keys)  # lines under the first quality metric: FID's network
    cap_h = 0.22 + 0.14 * (1 + bool(quality) + extra + labelled + prompted)  # caption lines
    label_w = 0.3 + 0.085 * max(len(r) for _, lay in groups for r in lay.rows)
    pitch_w, pitch_h = col_w + 0.25, img_h + cap_h + 0.12
    head, pad, band = 0.95, 0.15, (0.45 if len(groups) > 1 else 0.0)  # band: a facet's heading
    what = f"the first {k} samples" if k > 1 else "the first sample"
    same = "the same seeds and classes" if labelled else "the same seeds"
    subtitle = f"each cell: {what} ({same} in every cell) · NFE · sampling time" + (" · classes" if labelled else "")
    W = max(label_w + pitch_w * len(cols) + pad, 2 * pad + 0.075 * max(len(subtitle), 1.2 * len(title)))
    H = head + sum(pitch_h * len(lay.rows) + band for _, lay in groups) + pad
    fig = _headed_figure(W, H, title, subtitle)
    for c, steps in enumerate(cols):
        x = (label_w + c * pitch_w + col_w / 2) / W
        fig.text(x, 1 - 0.8 / H, f"{steps} steps", ha="center", va="center", fontsize=11, weight="bold")
    top = H - head
    sampler = {j.row: j.sampler for j in jobs}
    rules = len({j.schedule_label for j in jobs}) > 1  # a rule between samplers, each with its schedules
    for g, (rows, _, cells) in groups:
        if band:
            fig.add_artist(Line2D([pad / W, 1 - pad / W], [(top - 0.06) / H] * 2, color="#bdbdbd", linewidth=1))
            fig.text(pad / W, (top - band / 2) / H, facet_title(g), fontsize=11, weight="bold", va="center")
            top -= band
        for r, row in enumerate(rows):
            y0 = top - (r + 1) * pitch_h + cap_h
            if rules and r > 0 and sampler[row] != sampler[rows[r - 1]]:
                y = (top - r * pitch_h + 0.03) / H
                fig.add_artist(Line2D([pad / W, 1 - pad / W], [y, y], color="#e0e0e0", linewidth=1))
            _row_label(fig, row, label_w - 0.15, y0 + img_h / 2, (W, H))
            for c, steps in enumerate(cols):
                job = cells.get((row, steps))
                text = caption(job, quality, k, stated) if job is not None else ""
                _draw_cell(fig, job, (label_w + c * pitch_w, y0, col_w, img_h), img_w, k, text)
        top -= pitch_h * len(rows)
    return fig


def _trajectory_job(jobs: Sequence[Job], series: str) -> Job | None:
    """The longest finished run of a series (row, and facet if any) that saved its trajectory."""
    done = [j for j in jobs if j.series == series and j.finished and j.folder and (j.folder / TRAJECTORY_FILE).exists()]
    return max(done, key=lambda j: j.steps) if done else None


def trajectory_figure(jobs: Sequence[Job]) -> Figure | None:
    """Per scheduler, x0 (the predicted clean image) of the first sample at each snapshot of one N-step run."""
    picked = [(row, j) for row in series_order(jobs) if (j := _trajectory_job(jobs, row)) is not None]
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
    title = "x0 along one run of each scheduler"
    subtitle = "the predicted clean image of the first sample at snapshots of its longest run (step k of N)"
    W = max(label_w + pitch_w * frames + 0.2, 0.3 + 0.075 * len(subtitle))  # room for the heading
    H = head + pitch_h * len(strips) + 0.1
    fig = _headed_figure(W, H, title, subtitle)
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
