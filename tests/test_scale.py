"""Runs of many samples: chunks, processes (torchrun, gloo) and resuming never change a sample or a metric."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env, compose, run_main

import diffexp
from diffexp.folders import read_status
from diffexp.runner.claim import FolderTaken
from diffexp.samples import chunk_files

TIMINGS = {
    "wall_s",
    "images_per_s",
    "run_s",
    "load_s",
    "peak_mem_mb",
    "decode_s",
    "decode_share",
    "world_size",
    "startup_s",
}
METRICS = ["metrics.fid.enabled=true", "metrics.reference.enabled=true", "metrics.reference.steps=10"]


def outcome(metrics: dict) -> dict:
    """A run's metrics without its timings (and the reference's cache flag): what must not change."""
    out = {k: v for k, v in metrics.items() if k not in TIMINGS}
    out.get("reference", {}).pop("cached", None)
    return out


def assert_agree(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    """Sample by sample, equal to ``rel`` relative (in norm): float rounding of other batch sizes, nothing more."""
    error = np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)
    assert a.shape == b.shape and error.max() <= rel, error.max()


def sharded(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run(
        [*command, str(ROOT / "scripts/run.py"), *args, "logger=none", "progress=false"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_sharding_over_processes_changes_nothing(tmp_path: Path) -> None:
    common = ["num_samples=48", "batch_size=8", "steps=5", *METRICS]
    result = sharded([*common, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one = diffexp.run(compose(*common), tmp_path / "one")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    samples = diffexp.load_samples(tmp_path / "one")
    assert samples.shape == (48, 1, 32, 32) and len(chunk_files(tmp_path / "two")) == 6
    assert np.array_equal(diffexp.load_samples(tmp_path / "two"), samples)  # bit-equal, whatever rank sampled it
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["fid_n"] == 48
    assert two["fid"] == pytest.approx(one["fid"], abs=1e-6) and outcome(two) == outcome(one)
    assert sorted(p.name for p in tmp_path.glob("outputs/runs/*/*")) == []  # rank 1's own folder is gone
    # the first chunk is a plain run of one batch; another batch size agrees to float rounding
    plain = diffexp.run(compose("batch_size=8", "steps=5"), tmp_path / "plain")
    assert plain["chunks"] == 1 and np.array_equal(diffexp.load_samples(tmp_path / "plain"), samples[:8])
    diffexp.run(compose("num_samples=48", "batch_size=16", "steps=5"), tmp_path / "b16")
    assert_agree(diffexp.load_samples(tmp_path / "b16"), samples)


def test_an_uneven_last_chunk_and_labels_follow_the_sample_index(tmp_path: Path) -> None:
    common = ["model=digits-cond", "labels=all", "steps=4", "guidance_scale=2"]
    m = diffexp.run(compose(*common, "num_samples=10", "batch_size=4"), tmp_path / "chunked")
    diffexp.run(compose(*common, "batch_size=10"), tmp_path / "whole")
    assert m["chunks"] == 3 and m["num_samples"] == 10
    chunked, whole = diffexp.load_samples(tmp_path / "chunked"), diffexp.load_samples(tmp_path / "whole")
    assert_agree(chunked, whole)
    assert m["label_accuracy"] == json.loads((tmp_path / "whole" / "metrics.json").read_text())["label_accuracy"]


def test_a_killed_run_resumes_from_its_finished_chunks_to_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["num_samples=24", "batch_size=4", "steps=10", *METRICS, f"hydra.run.dir={tmp_path / 'killed'}"]
    command = [sys.executable, str(ROOT / "scripts/run.py"), "logger=none", "progress=false", *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(chunk_files(tmp_path / "killed")) < 2:  # the event: two chunks written
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended ({process.poll()}) before two chunks: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # as the kernel or a preemption would, with no chance to clean up
    process.communicate()
    assert process.returncode == -signal.SIGKILL  # killed, not ended by itself
    done_before = len(chunk_files(tmp_path / "killed"))
    assert done_before >= 2 and not (tmp_path / "killed" / "metrics.json").exists()
    assert read_status(tmp_path / "killed") == "died"  # its process is gone, its status still says running
    again = run_main("scripts/run.py", ["logger=none", "progress=false", *args], tmp_path, monkeypatch)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing from {done_before} finished chunks" in again.stdout + again.stderr
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    fresh = diffexp.run(compose(*args[:-1]), tmp_path / "fresh")
    assert np.array_equal(diffexp.load_samples(tmp_path / "killed"), diffexp.load_samples(tmp_path / "fresh"))
    assert outcome(resumed) == outcome(fresh)
    # a finished run started again does nothing, and says so
    third = run_main("scripts/run.py", ["logger=none", "progress=false", *args], tmp_path, monkeypatch)
    assert third.returncode == 0 and "nothing to do" in third.stdout + third.stderr


def test_a_folder_holding_another_run_is_refused_untouched_unless_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = diffexp.run(compose("steps=3"), tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(FolderTaken, match="config differs in steps"):
        diffexp.run(compose("steps=4"), tmp_path / "run")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before
    result = run_main("scripts/run.py", ["steps=4", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch)
    assert result.returncode == 2 and "overwrite=true" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["wall_s"] == first["wall_s"]
    # overwrite clears it first; a failed run then leaves no metrics.json beside its status
    with pytest.raises(diffexp.NonFiniteError):
        diffexp.run(
            compose("overwrite=true", "model=digits-ideal", "scheduler=kdpm2-ancestral", "steps=2"), tmp_path / "run"
        )
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "grids" / "step0003_x.png").exists()  # the earlier run's grids went with it
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    with pytest.raises(FolderTaken, match="is not empty"):
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "mine.txt").write_text("keep me")
        diffexp.run(compose("steps=3"), tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_two_runs_at_once_never_share_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["model=digits-ideal", "scheduler=euler", "steps=100000", f"hydra.run.dir={tmp_path / 'run'}"]
    env = cli_env()
    command = [sys.executable, str(ROOT / "scripts/run.py"), "logger=none", "progress=false", *args]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status = tmp_path / "run" / "status.json"
        deadline = time.monotonic() + 120
        while not (status.exists() and "running" in status.read_text()):  # the event: the first run has its folder
            assert first.poll() is None and time.monotonic() < deadline, "the first run never started running"
            time.sleep(0.1)
        second = run_main("scripts/run.py", ["logger=none", "progress=false", *args], tmp_path, monkeypatch)
        assert second.returncode == 2 and "running in" in second.stderr and "Traceback" not in second.stderr
        assert json.loads(status.read_text())["status"] == "running"  # the first run's, untouched
    finally:
        first.kill()
        first.wait()


def test_out_of_memory_fails_clearly_or_splits_the_chunk_without_changing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ["model=digits-ideal", "scheduler=euler-ancestral", "steps=4", "batch_size=4", "num_samples=8"]
    expected = diffexp.run(compose(*cfg), tmp_path / "plain")
    from diffexp.sampling.ideal import DigitsIdealDenoiser

    forward = DigitsIdealDenoiser.forward

    def small_memory(self, x: torch.Tensor, *args, **kwargs):  # a device that fits 2 samples, not 4
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(DigitsIdealDenoiser, "forward", small_memory)
    with pytest.raises(diffexp.DiffexpError, match=r"Out of memory on cpu sampling 4 samples at once \(batch_size=4"):
        diffexp.run(compose(*cfg), tmp_path / "oom")
    status = json.loads((tmp_path / "oom" / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == "oom"
    split = diffexp.run(compose(*cfg, "oom_retry=true"), tmp_path / "split")
    assert np.array_equal(diffexp.load_samples(tmp_path / "split"), diffexp.load_samples(tmp_path / "plain"))
    assert split["nfe"] == expected["nfe"] == 4


def test_a_write_failure_marks_the_run_failed_and_leaves_no_truncated_file(tmp_path: Path) -> None:
    import resource

    def small_files() -> None:  # like a full disk: no file over 200 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = cli_env()
    args = ["logger=none", "progress=false", "model=digits-ideal", "steps=10", "batch_size=64"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/run.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert result.returncode == 2 and "Could not write" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "metrics.json").exists()
    for name in ("trajectory.npz", "samples.npy"):  # either whole or absent, never cut short
        if (tmp_path / "run" / name).exists():
            np.load(tmp_path / "run" / name)


def test_bad_sample_counts_and_gaps_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main("scripts/run.py", ["num_samples=0", f"hydra.run.dir={tmp_path / 'zero'}"], tmp_path, monkeypatch)
    assert result.returncode == 2 and "num_samples=0 is not allowed" in result.stderr
    huge = run_main(
        "scripts/run.py", ["batch_size=10000000", f"hydra.run.dir={tmp_path / 'huge'}"], tmp_path, monkeypatch
    )
    assert huge.returncode == 2 and "batch_size=10000000 cannot fit on cpu: a chunk needs at least" in huge.stderr
    diffexp.run(compose("num_samples=12", "batch_size=4", "steps=2"), tmp_path / "run")
    (tmp_path / "run" / "chunks" / "chunk-000001.npz").unlink()
    with pytest.raises(diffexp.DiffexpError, match=r"missing samples 4\.\.7"):
        diffexp.load_samples(tmp_path / "run")


def test_a_sweep_under_torchrun_runs_each_job_sharded_in_one_folder(tmp_path: Path) -> None:
    result = sharded(["-m", "scheduler=ddim,euler", "steps=3", "num_samples=8", "batch_size=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list(tmp_path.glob("outputs/sweeps/*/*"))
    assert len(sweeps) == 1, sweeps  # rank 1's own sweep folder is gone
    jobs = sorted(p for p in sweeps[0].iterdir() if (p / "status.json").exists())
    assert [p.name.split("-")[-2] for p in jobs] == ["ddim", "euler"] and (sweeps[0] / "report.html").exists()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["chunks"] == 2 and len(chunk_files(job)) == 2
