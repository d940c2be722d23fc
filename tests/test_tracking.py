"""W&B tracking, checked on the .wandb files that real offline runs write (no account, no network)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import diffusers
import pytest
import torch
import wandb
from conftest import compose, read_wandb, run_cli
from omegaconf import DictConfig
from PIL import Image

import diffexp
from diffexp.errors import NonFiniteError
from diffexp.folders import read_status
from diffexp.tracking.reader import OfflineRun
from diffexp.tracking.session import resolve_mode

SCALARS = {
    "index",
    "step",
    "num_steps",
    "nfe",
    "net_evals",
    "timestep",
    "sigma",
    "elapsed_s",
    "x0_change",
    "step_s",
} | {f"{v}_{s}" for v in ("x", "x0") for s in ("mean", "std", "min", "max")}


def offline(*overrides: str) -> DictConfig:
    return compose("logger=wandb", "logger.mode=offline", *overrides)


def steps_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def media(run_dir: Path, ref: dict) -> Path:
    """The file of a logged wandb.Image, inside the run's own W&B folder."""
    (sync_dir,) = (run_dir / "wandb").glob("offline-run-*")
    return sync_dir / "files" / ref["path"]


def test_offline_run_logs_history_images_config_and_summary(run_dir: Path) -> None:
    cfg = offline(
        "model=digits-ideal", "scheduler=dpmsolver", "scheduler.use_karras_sigmas=true", "steps=12", "log_every=5"
    )
    metrics = diffexp.run(cfg, run_dir)
    wb = read_wandb(run_dir / "wandb")
    records = steps_jsonl(run_dir)

    assert wb.run.display_name == "dpmsolver-karras-12"
    assert wb.run.job_type == "sample" and wb.run.project == "diffexp"
    assert wb.exit_code == 0

    # one history row per snapshot, at the sampling step, with the scalars of steps.jsonl and both grids
    assert [row["_step"] for row in wb.history] == [r["step"] for r in records] == [5, 10, 12]
    for row, record in zip(wb.history, records, strict=True):
        logged = {k for k, v in record.items() if v is not None} | {"x", "x0"}
        assert {k for k in row if not k.startswith("_")} == logged
        assert set(record) == SCALARS
        for key, value in record.items():
            assert row.get(key) == pytest.approx(value), key
        for key in ("x", "x0"):
            assert row[key]["_type"] == "image-file"
            name = f"step{record['step']:04d}_{key}.png"
            assert Image.open(media(run_dir, row[key])).size == Image.open(run_dir / "grids" / name).size
    assert sum("x" in row for row in wb.history) == sum("x0" in row for row in wb.history) == len(records) == 3

    # charts can use the sampling step (the default), the NFE or the network evaluations as x-axis
    defined = {m.name or m.glob_name: m.step_metric for m in wb.metrics}
    assert defined == {"step": "", "nfe": "", "net_evals": "", "*": "step"}

    # the config: resolved, the scheduler in force with its hash, the model, the machine and versions
    assert wb.config["steps"] == 12 and wb.config["scheduler"]["use_karras_sigmas"] is True
    effective = json.loads((run_dir / "scheduler.json").read_text())
    assert wb.config["effective_scheduler"] == effective
    assert effective["class"] == "DPMSolverMultistepScheduler" and effective["config"]["use_karras_sigmas"] is True
    assert wb.config["scheduler_label"] == "dpmsolver-karras"
    assert wb.config["loaded_model"] == {"name": "digits-ideal", "id": None, "revision": None}
    env = wb.config["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] == diffusers.__version__
    assert env["device"] == metrics["device"] and env["device_name"]

    # the summary: metrics.json, and the final samples grid
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key, value in saved.items():
        assert wb.summary[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert wb.summary["samples"]["_type"] == "image-file"
    assert Image.open(media(run_dir, wb.summary["samples"])).size == Image.open(run_dir / "samples.png").size


def test_failed_run_is_marked_failed(run_dir: Path) -> None:
    # KDPM2Ancestral diverges at 2 steps: a real failure in the middle of sampling
    with pytest.raises(NonFiniteError):
        diffexp.run(offline("scheduler=kdpm2-ancestral", "steps=2"), run_dir)
    wb = read_wandb(run_dir / "wandb")
    assert wb.exit_code == 1
    assert wb.summary["status"] == "failed" and "NaN" in wb.summary["error"]
    assert read_status(run_dir) == "failed"
    # the next run of this process is a new W&B run that finishes cleanly
    next_dir = run_dir.parent / "next"
    diffexp.run(offline("steps=3"), next_dir)
    assert wandb.run is None
    assert read_wandb(next_dir / "wandb").exit_code == 0


def test_logger_none_writes_no_wandb_files(run_dir: Path) -> None:
    cfg = compose("logger=none", "steps=3")
    assert cfg.logger is None
    diffexp.run(cfg, run_dir)
    assert read_status(run_dir) == "finished"
    assert not list(run_dir.rglob("*wandb*"))


def test_mode_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == ("online", None)  # the config wins
    assert resolve_mode("offline") == ("offline", "logger.mode=offline")
    assert resolve_mode(None) == (None, "WANDB_MODE=disabled")  # then W&B's own variable
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode(None) == (None, None)  # a key: online


def test_reader_joins_records_across_blocks(tmp_path: Path) -> None:
    blob = "".join(f"{i:06d}" for i in range(20000))  # 120 kB: one record over four 32 KiB blocks
    run = wandb.init(mode="offline", dir=tmp_path, project="reader", config={"blob": blob}, reinit="finish_previous")
    run.log({"a": 1.5}, step=3)
    run.summary["b"] = [1, 2]
    run.finish()
    wb = read_wandb(tmp_path / "wandb")
    assert wb.config["blob"] == blob
    assert [(row["_step"], row["a"]) for row in wb.history] == [(3, 1.5)]
    assert wb.summary["b"] == [1, 2] and wb.exit_code == 0


def clean_env(tmp_path: Path) -> dict[str, str | None]:
    """No W&B key, mode or settings from this machine: a fresh home, and W&B's variables unset."""
    home = tmp_path / "home"
    home.mkdir()
    names = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_CONFIG_DIR")
    names += ("WANDB_IDENTITY_TOKEN_FILE",)
    return {"HOME": str(home), "NETRC": str(home / ".netrc"), **dict.fromkeys(names)}


def test_no_key_logs_offline_and_groups_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep-a"
    done = run_cli(["-m", f"hydra.sweep.dir={sweep}", "progress=false", "steps=3,4"], tmp_path, clean_env(tmp_path))
    assert done.returncode == 0, done.stderr
    jobs = sorted(p for p in sweep.iterdir() if (p / "status.json").exists())
    assert len(jobs) == 2
    for job, steps in zip(jobs, (3, 4), strict=True):
        (sync_dir,) = (job / "wandb").glob("offline-run-*")
        # said once, with the exact command to upload it later
        assert (done.stdout + done.stderr).count(f"wandb sync {sync_dir}") == 1
        assert "no W&B API key" in done.stdout + done.stderr
        wb = OfflineRun.read(sync_dir)
        assert wb.run.run_group == "sweep-a"  # a sweep's runs are grouped
        assert wb.run.display_name == f"ddpm-{steps}" and wb.config["steps"] == steps
        assert wb.exit_code == 0 and len(wb.history) == 1  # each job's data in its own run


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_still_completes_the_run(tmp_path: Path) -> None:
    env = clean_env(tmp_path) | {"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    run_dir = tmp_path / "run"
    done = run_cli([f"hydra.run.dir={run_dir}", "progress=false", "logger.init_timeout=3"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"W&B could not start .*goes on without W&B", done.stdout + done.stderr)
    assert read_status(run_dir) == "finished"
    for name in ("metrics.json", "samples.png", "samples.npy", "trajectory.npz", "config.yaml", "scheduler.json"):
        assert (run_dir / name).is_file(), name
    assert len(steps_jsonl(run_dir)) == 3 and len(list((run_dir / "grids").glob("*.png"))) == 6
    assert not list((run_dir / "wandb").glob("offline-run-*"))
