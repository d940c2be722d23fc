"""Training under faults: a signal, bad files in the dataset, a damaged checkpoint, a resumed W&B run, and a
sample scheduler checked before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, cli_env, read_wandb, run_main, train_cfg
from PIL import Image

from diffexp.errors import DiffexpError
from diffexp.folders import read_status_record
from diffexp.tracking.reader import OfflineRun
from diffexp.training.loop import train
from diffexp.training.trainer import STATE_FILE, checkpoints


def test_sigterm_interrupts_training_and_its_status_follows_the_steps(tmp_path: Path) -> None:
    args = [*TINY, "logger=wandb", "steps=100000", "log_every=2", "checkpoint_every=4", "hydra.run.dir=out"]
    env = cli_env()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    end = time.monotonic() + 240
    while ((read_status_record(tmp_path / "out") or {}).get("checkpoint") or 0) < 4:
        if proc.poll() is not None or time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a training behind
            pytest.fail(f"no checkpoint step in status.json: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err
    status = read_status_record(tmp_path / "out")
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"] and status["step"] >= 4
    assert OfflineRun.read(tmp_path / "out" / "wandb").exit_code not in (None, 0)


def test_a_file_that_is_no_image_in_the_dataset_folder_is_one_paragraph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "notes.png").write_text("not an image")
    (images / "readme.txt").write_text("ignored: not an image's name")
    args = [*TINY, "dataset=folder", f"dataset.path={images}", "steps=2", "hydra.run.dir=out"]
    result = run_main("scripts/train.py", args, tmp_path, monkeypatch)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 1 file(s) with an image's name that are not readable images: notes.png" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before training


def test_a_damaged_training_state_falls_back_to_the_checkpoint_before(tmp_path: Path) -> None:
    common = ("lr_schedule=constant", "checkpoint_every=2", "keep_checkpoints=2")
    train(train_cfg("steps=4", *common), tmp_path)
    newest = checkpoints(tmp_path)[-1]
    (newest / STATE_FILE).write_bytes(b"cut short")
    summary = train(train_cfg("steps=6", *common), tmp_path)
    assert summary["steps"] == 6 and summary["steps_this_session"] == 4  # resumed from step 2

    for checkpoint in checkpoints(tmp_path):
        (checkpoint / STATE_FILE).write_bytes(b"cut short")
    with pytest.raises(DiffexpError, match=r"None of the checkpoints in .* can be read"):
        train(train_cfg("steps=8", *common), tmp_path)


def test_a_resumed_training_resumes_its_wandb_run(tmp_path: Path) -> None:
    logged = ("logger=wandb", "logger.mode=offline", "checkpoint_every=2", "log_every=1")
    train(train_cfg("steps=2", *logged), tmp_path)
    train(train_cfg("steps=4", *logged), tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {read_wandb(r).run.run_id for r in runs}  # each once W&B has written all of it
    assert ids == {json.loads((tmp_path / "status.json").read_text())["wandb_id"]}  # one W&B run, resumed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sample_scheduler=nope"], "Unknown scheduler 'nope'"),
        (["sample_scheduler=ddim", "sample_steps=5000"], "cannot run sample_steps=5000"),
    ],
)
def test_the_sample_scheduler_is_checked_before_training(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(DiffexpError, match=message):  # the first grid would be at step 4, after a log at step 2
        train(train_cfg("steps=4", "sample_every=4", "log_every=2", *overrides), tmp_path)
    assert not (tmp_path / "train.jsonl").exists() and read_status_record(tmp_path)["status"] == "failed"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=-1", "lr=-1.0 is not allowed: lr must be > 0"),
        ("lr=0", "lr=0.0 is not allowed"),
        ("lr=nan", "lr=nan is not allowed"),
        ("weight_decay=-0.1", "weight_decay=-0.1 is not allowed"),
        ("grad_clip=-1", "grad_clip=-1.0 is not allowed"),
        ("warmup_steps=-1", "warmup_steps=-1 is not allowed"),
        ("seed=-1", "seed=-1 is not allowed"),
        ("threads=0", "threads=0 is not allowed"),
        ("ema_decay=1", "ema_decay=1.0 is not allowed: ema_decay must be >= 0 and < 1"),
        ("label_dropout=1.5", "label_dropout=1.5 is not allowed"),
        ("dataset.sample_size=0", "dataset.sample_size=0 is not allowed"),
        ("noise_schedule.beta_end=inf", "noise_schedule.beta_end=inf is not allowed"),
    ],
)
def test_every_numeric_training_key_is_checked_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(DiffexpError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train(train_cfg("steps=4", override), tmp_path)
    record = read_status_record(tmp_path)
    assert record["status"] == "failed" and override.split("=")[0] in record["error"]
    assert not (tmp_path / "train.jsonl").exists() and not (tmp_path / "checkpoints").exists()
