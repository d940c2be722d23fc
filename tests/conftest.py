"""Shared test helpers: compose the real configs, run the real CLI (in this process or as a command), outputs under
tmp_path, and folders built once per session and shared by the pytest-xdist workers."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: the tests never reach the network

import pytest
import torch
from filelock import FileLock
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import diffexp
from diffexp.catalog import register
from diffexp.training.config import register as register_training

if TYPE_CHECKING:
    from diffexp.tracking.reader import OfflineRun

register()  # the schema and resolvers, as scripts/run.py registers them
register_training()  # the training schema, as scripts/train.py registers it
ROOT = Path(__file__).resolve().parent.parent
# test tensors are small: one thread is fastest, and avoids oversubscribing a busy CPU
torch.set_num_threads(1)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def compose(*overrides: str) -> DictConfig:
    """The run config the CLI would build, quiet, small and without W&B unless overridden."""
    return diffexp.compose(["progress=false", "logger=none", *overrides])


# a UNet small enough to train a few steps in a second on a CPU
TINY = [
    "progress=false",
    "logger=none",
    "dataset.sample_size=16",
    "unet.block_out_channels=[8,16]",
    "unet.down_block_types=[DownBlock2D,DownBlock2D]",
    "unet.up_block_types=[UpBlock2D,UpBlock2D]",
    "unet.norm_num_groups=4",
    "batch_size=8",
    "sample_every=0",
    "warmup_steps=0",
    "device=cpu",
]


def train_cfg(*overrides: str) -> DictConfig:
    """The training config of the tiny UNet above."""
    return diffexp.compose([*TINY, *overrides], config_name="train")


def bf16_matches_fp32(device: str) -> None:
    """The bf16 model's outputs within 1e-2 (relative) of fp32's on the same inputs, and its samples from the
    same noise within 2e-2 (mean, in [-1, 1] pixel units, after 30 steps)."""
    from diffexp.sampling.loop import sample

    base = ("model=digits-unet", "scheduler=ddim", "steps=30", "batch_size=4", f"device={device}")
    exact, half = diffexp.prepare(compose(*base)), diffexp.prepare(compose(*base, "precision=bf16"))
    assert next(half.loaded.model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():  # each model output, at every fifth timestep of the run
        for t in exact.built.scheduler.timesteps.cpu()[::5]:
            x = exact.noise * 0.7
            out, ref = half.model(x, t), exact.model(x, t)
            assert out.dtype == torch.float32
            assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    a, b = sample(exact.steps()).x, sample(half.steps()).x
    assert (a - b).abs().mean().item() < 2e-2  # 30 steps of bf16 rounding: measured 0.011 on an H200
    assert not torch.equal(a, b)


def cli_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a command run as a user would: this checkout, offline, one thread; None unsets a var."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **OFFLINE, **ONE_THREAD}
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


# ------------------------------------------------------------------------------------------ the CLI in this process


class Ran(NamedTuple):
    """What a script's ``main`` did in this process: its exit status and what it wrote."""

    returncode: int
    stderr: str
    stdout: str


_scripts: dict[str, ModuleType] = {}


def script_main(script: str) -> Callable[..., object]:
    """The ``main`` of a script of this checkout, loaded once per process (its ``__main__`` block does not run)."""
    if script not in _scripts:
        path = ROOT / script
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        assert spec and spec.loader, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        task = getattr(module.main, "__wrapped__", None)
        if task is not None:  # a Hydra app: its config_path is relative to its file, as when the script runs
            task.__module__ = "__main__"
        _scripts[script] = module
    return _scripts[script].main


@contextmanager
def _kept_logging() -> Iterator[None]:
    """Hydra configures the root logger for each run; restore it (and close the run's log file) afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def run_main(
    script: str,
    args: Sequence[str],
    cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str | None] | None = None,
) -> Ran:
    """Run a script's ``main`` with command-line ``args`` in this process, in ``cwd``, offline, as the command would
    (Hydra apps read ``sys.argv``; the others take ``argv``); its exit status and output. Much faster than a new
    process; the exit codes of signals and the process itself are for ``run_cli``."""
    main = script_main(script)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # Hydra would re-raise instead of reporting
    for key, value in (OFFLINE | (env or {})).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    out, err = io.StringIO(), io.StringIO()
    hydra_app = hasattr(main, "__wrapped__")
    if hydra_app:
        monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    GlobalHydra.instance().clear()
    try:
        with _kept_logging(), redirect_stdout(out), redirect_stderr(err):
            result = main() if hydra_app else main(list(args))
        code = result if isinstance(result, int) else 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message"), as a process would end
            err.write(f"{stop.code}\n")
            code = 1
    finally:
        GlobalHydra.instance().clear()
    return Ran(code, err.getvalue(), out.getvalue())


# ------------------------------------------------------------------------------------------ built once per session


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that ``make`` fills once per test session, also for all pytest-xdist workers (under a file lock);
    tests read it, or copy it before changing it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def read_wandb(folder: Path, timeout: float = 120.0) -> OfflineRun:
    """The W&B run in ``folder`` (a ``wandb`` folder, or one ``offline-run-*`` in it) once W&B's service has written all
    of it: it flushes asynchronously, and the exit record comes last. (Waiting for the file, not for the service to
    stop: ``wandb.teardown()`` waits for a service that an earlier test of the process may still keep busy.)"""
    from diffexp.tracking.reader import OfflineRun

    deadline = time.monotonic() + timeout
    while True:
        try:
            run = OfflineRun.read(folder)
            if run.exit_code is not None:
                return run
        except Exception:  # a record being written: read again
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"W&B wrote no exit record in {folder} within {timeout} s"
        time.sleep(0.2)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
