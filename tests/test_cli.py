"""The CLI as a user meets it: the default command end to end (a real process), and every kind of bad input (the
script's main in this process: the same message and exit status, without a new interpreter each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, run_cli, run_main, shared_folder
from omegaconf import OmegaConf

import diffexp


def only_run(root: Path) -> Path:
    runs = sorted(root.glob("outputs/runs/*/*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default command (digits-ideal, DDIM, 30 steps), run once as a user would; its folder and its result."""

    def make(cwd: Path) -> None:
        result = run_cli(["model=digits-ideal", "scheduler=ddim", "steps=30"], cwd=cwd)
        (cwd / "result.json").write_text(json.dumps({"returncode": result.returncode, "stderr": result.stderr}))

    cwd = shared_folder(tmp_path_factory, "default-run", make)
    result = json.loads((cwd / "result.json").read_text())
    assert result["returncode"] == 0, result["stderr"]
    return only_run(cwd), result


def test_default_command_runs_end_to_end(default_run: tuple[Path, dict]) -> None:
    run, result = default_run
    assert run.name.endswith("digits-ideal-ddim-30")
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["nfe"] == 30 and metrics["wall_s"] > 0 and metrics["peak_mem_mb"] > 0
    assert metrics["scheduler"]["class"] == "DDIMScheduler" and metrics["scheduler"]["config"]["clip_sample"] is True
    assert metrics["torch"] == torch.__version__ and metrics["device"] == "cpu"
    # snapshots at steps 10, 20 and 30: x and x0 grids, steps.jsonl lines, the trajectory
    assert sorted(p.name for p in (run / "grids").iterdir()) == [
        f"step{k:04d}_{v}.png" for k in (10, 20, 30) for v in ("x", "x0")
    ]
    lines = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30] and lines[0]["sigma"] > lines[-1]["sigma"]
    samples = np.load(run / "samples.npy")
    assert samples.dtype == np.float32 and samples.shape == (4, 1, 32, 32) and np.abs(samples).max() <= 1
    trajectory = np.load(run / "trajectory.npz")
    assert trajectory["x0"].shape == (3, 4, 1, 32, 32) and np.array_equal(trajectory["x"][-1], samples)
    config = OmegaConf.load(run / "config.yaml")  # the resolved config of what ran
    assert config.model.name == "digits-ideal" and config.scheduler.name == "ddim" and config.steps == 30
    assert (run / "samples.png").exists() and "Traceback" not in result["stderr"]


def test_hydra_run_dir_override_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["model=digits-ideal", "steps=3", "logger=none", f"hydra.run.dir={tmp_path / 'mine'}"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "mine" / "status.json").read_text())["status"] == "finished"
    assert not (tmp_path / "outputs").exists()


BAD_INPUT = {
    "unknown scheduler": (["scheduler=nope"], "Could not find 'scheduler/nope'"),
    "unknown model": (["model=nope"], "Could not find 'model/nope'"),
    "invalid scheduler": (["scheduler.name=edm-euler"], "cannot drive an epsilon-prediction UNet2DModel"),
    "steps <= 0": (["steps=0"], "steps=0 is not allowed"),
    "batch_size <= 0": (["batch_size=-2"], "batch_size=-2 is not allowed"),
    "unknown key": (["+stepz=3"], "Unknown config key(s): stepz"),
    "unknown key without +": (["stepz=3"], "Key 'stepz' not in 'RunConfig'"),
    "wrong type": (["steps=many"], "could not be converted to Integer"),
    "wrong enum": (["precision=fp64"], "Invalid value 'fp64'"),
    "unknown scheduler option": (
        ["scheduler=euler-ancestral", "+scheduler.use_karras_sigmas=true"],
        "has no option 'use_karras_sigmas'",
    ),
    "hub model offline": (["model=ddpm-cifar10-32"], "Could not load the diffusers model 'google/ddpm-cifar10-32'"),
    "local model without folder": (["model=local", "model.path=/nonexistent"], "is not a folder"),
    "too many steps": (["scheduler=ddim", "steps=2000"], "cannot run 2000 steps"),
    "solver order diffusers runs as 3": (
        ["scheduler=dpmsolver", "scheduler.solver_order=9"],
        "solver_order=9 is outside 1..3",
    ),
    "deis order 4": (["scheduler=deis", "scheduler.solver_order=4"], "solver_order=4 is outside 1..3"),
    "singlestep order 0": (["scheduler=dpmsolver-single", "scheduler.solver_order=0"], "outside 1..3"),
    "sa-solver order 5": (["scheduler=sasolver", "scheduler.corrector_order=5"], "corrector_order=5 is outside 1..4"),
    "unipc order 0": (["scheduler=unipc", "scheduler.solver_order=0"], "solver_order=0 is outside 1..inf"),
    "lms order 0": (["scheduler=lms", "scheduler.order=0"], "order=0 is outside 1..inf"),
    "negative std": (["model.std=-1"], "model.std=-1.0 is not allowed"),
    "infinite std": (["model.std=inf"], "model.std=inf is not allowed"),
    "std whose square overflows": (["model.std=1e200"], "model.std=1e+200 is not allowed"),
    "seed beyond 2**64 - 1": (["seed=18446744073709551616"], "seed must be in [0, 18446744073709551612]"),
    "negative seed": (["seed=-1"], "seed=-1 is not allowed"),
    "seed + k beyond 2**64 - 1": (["seed=18446744073709551615"], "for 4 samples"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_clearly(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args, message = BAD_INPUT[case]
    result = run_main("scripts/run.py", ["model=digits-ideal", *args], tmp_path, monkeypatch)
    assert result.returncode in (1, 2)  # 1: Hydra refused the command line; 2: diffexp refused the values
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for run in tmp_path.glob("outputs/runs/*/*"):  # a run that never sampled is never mistaken for a finished one
        assert not (run / "metrics.json").exists()
        assert json.loads((run / "status.json").read_text())["status"] == "failed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main("scripts/run.py", ["model=digits-ideal", "device=cuda"], tmp_path, monkeypatch)
    assert result.returncode == 2 and "no usable CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_a_run_that_diverges_is_marked_failed_with_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # KDPM2 ancestral at 2 steps gets NaN timesteps from diffusers
    args = ["model=digits-ideal", "scheduler=kdpm2-ancestral", "steps=2", "logger=none"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 2 and "NaN/Inf at step 1" in result.stderr
    assert "This scheduler and step count diverge" in result.stderr  # a NaN timestep: the scheduler's fault
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "NaN/Inf" in status["error"]
    assert not (run / "metrics.json").exists() and not (run / "samples.npy").exists()


def test_a_nan_from_the_ideal_model_is_blamed_on_the_model() -> None:
    # a notebook can build the ideal denoiser with an infinite std (the CLI refuses it): its output is NaN
    from omegaconf import OmegaConf

    from diffexp.errors import NonFiniteError
    from diffexp.sampling.models import load_model

    cfg = compose("model=digits-ideal", "scheduler=ddim", "steps=3", "batch_size=1")
    broken = OmegaConf.merge(cfg.model, {"std": float("inf")})
    exp = diffexp.prepare(cfg, model=load_model(broken, torch.device("cpu")))
    with pytest.raises(NonFiniteError, match="the model produced it, not the scheduler"):
        diffexp.sample(exp.steps())


def test_grids_enlarge_small_images_to_at_least_128_pixels(default_run: tuple[Path, dict]) -> None:
    from PIL import Image

    from diffexp.tracking.session import image

    run, _ = default_run
    samples = Image.open(run / "samples.png")
    assert samples.size == (4 * 128 + 5 * 2, 128 + 2 * 2)  # 32 px digits, 4x, nearest; 2 px padding
    tile = np.asarray(samples)[2:130, 2:130]
    assert (tile.reshape(32, 4, 32, 4) == tile[::4, ::4][:, None, :, None]).all()  # whole pixels, no blur
    assert len(np.unique(tile)) > 2  # a digit, not a blank tile
    grid = Image.open(run / "grids" / "step0010_x0.png")
    assert grid.size == samples.size  # the snapshot grids too
    assert image(torch.zeros(2, 1, 32, 32)).image.size == (2 * 128 + 3 * 2, 132)  # the W&B image too
