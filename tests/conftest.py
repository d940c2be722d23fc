"""Shared test helpers: compose the real configs, run the real CLI, outputs under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import diffexp
from diffexp.catalog import register
from diffexp.training.config import register as register_training

register()  # the schema and resolvers, as scripts/run.py registers them
register_training()  # the training schema, as scripts/train.py registers it
ROOT = Path(__file__).resolve().parent.parent
# test tensors are small: one thread is fastest, and avoids oversubscribing a busy CPU
torch.set_num_threads(1)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def compose(*overrides: str) -> DictConfig:
    """The run config the CLI would build, quiet, small and without W&B unless overridden."""
    return diffexp.compose(["progress=false", "logger=none", *overrides])


def cli_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a command run as a user would: this checkout, offline, one thread; None unsets a var."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **ONE_THREAD}
    return {k: v for k, v in (full | (env or {})).items() if v is not None}


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str | None] | None = None,
    script: str = "scripts/run.py",
    timeout: int = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a script of this checkout as a user would, offline, with its outputs under ``cwd``; None unsets a var."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
