"""Faults through the real CLI: signals, a process killed mid-sweep, corrupt run files, names that would lead
out of outputs/, and runs whose process vanished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, run_cli, run_main, shared_folder

from diffexp.folders import RunStatus, job_folders, read_status, read_status_record, write_json, write_status
from diffexp.sweep.callbacks import progress_line
from diffexp.tracking.reader import OfflineRun


def start_cli(args: list[str], cwd: Path, env: dict[str, str | None] | None = None) -> subprocess.Popen[str]:
    """scripts/run.py started in its own session (so a signal can go to its process group, as Ctrl-C does)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run.py"), *args],
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 240) -> None:
    """Poll ``condition``; on failure the command's whole process group is killed, so no run is left behind."""
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def snapshots(run: Path) -> int:
    path = run / "steps.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_termination_signal_interrupts_a_run_like_ctrl_c(tmp_path: Path, signum: signal.Signals) -> None:
    run = tmp_path / "outputs" / "run"
    args = ["model=digits-ideal", "scheduler=euler", "steps=100000", "log_every=1", "progress=false"]
    proc = start_cli([*args, "hydra.run.dir=outputs/run"], cwd=tmp_path)  # logger: W&B, offline
    wait_for(lambda: snapshots(run) >= 2, proc)
    proc.send_signal(signum)  # to the command's own process only, as `kill` or `timeout` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"stopped by {signum.name}" in err and "Traceback" not in err
    status = read_status_record(run)
    assert status["status"] == RunStatus.interrupted and signum.name in status["error"]
    assert (run / "trajectory.npz").exists() and not (run / "metrics.json").exists()  # partial outputs flushed
    wb = OfflineRun.read(run / "wandb")
    assert wb.exit_code not in (None, 0) and wb.summary["status"] == "interrupted"


def test_sigterm_stops_a_sweep_and_its_running_job_reads_interrupted(tmp_path: Path) -> None:
    args = ["-m", "model=digits-ideal", "scheduler=euler", "steps=100000,3", "log_every=1", "progress=false"]
    proc = start_cli([*args, "logger=none", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    job = tmp_path / "sweep" / "0-digits-ideal-euler-100000"
    wait_for(lambda: snapshots(job) >= 2, proc)
    proc.send_signal(signal.SIGTERM)  # to the supervisor, which passes it on and does not restart the sweep
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err
    assert read_status(job) == "interrupted" and (job / "trajectory.npz").exists()
    assert not (tmp_path / "sweep" / "1-digits-ideal-euler-3").exists()


def test_a_sweep_outlives_a_job_the_kernel_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the debugging hook kills the process of the euler job with SIGKILL, as the out-of-memory killer would
    args = ["-m", "model=digits-ideal", "scheduler=ddim,euler,heun", "steps=3", "batch_size=1", "progress=false"]
    result = run_cli(
        [*args, "logger=none", "hydra.sweep.dir=sweep"], cwd=tmp_path, env={"DIFFEXP_DEBUG_SIGKILL": "euler-3"}
    )
    sweep = tmp_path / "sweep"
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]  # a job did not finish
    assert log.count("killed by SIGKILL during the job") == 2  # tried again once, then left
    assert "died 2 times" in log and "Traceback" not in result.stderr
    statuses = {f.name: read_status(f) for f in job_folders(sweep)}
    assert statuses == {
        "0-digits-ideal-ddim-3": "finished",
        "1-digits-ideal-euler-3": "died",
        "2-digits-ideal-heun-3": "finished",
    }
    assert len(read_status_record(sweep / "1-digits-ideal-euler-3")["deaths"]) == 1  # and the current one
    assert "sweep: 3 of 3 jobs done (2 finished, 0 failed, 1 died), 0 left" in log
    rows = {r["scheduler"]: r for r in json.loads((sweep / "report" / "report.json").read_text())["rows"]}
    assert rows["euler"]["status"] == "died" and "killed" in rows["euler"]["error"]

    # a resume leaves the job that died twice, unless asked (no process dies now: the sweep runs in this one)
    again = run_main("scripts/run.py", [*args, "logger=none", "hydra.sweep.dir=sweep"], tmp_path, monkeypatch)
    assert again.returncode == 1 and "died 2 times" in again.stdout + again.stderr
    retry = [*args, "logger=none", "hydra.sweep.dir=sweep", "sweep.max_deaths=3"]
    retried = run_main("scripts/run.py", retry, tmp_path, monkeypatch)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert read_status(sweep / "1-digits-ideal-euler-3") == "finished"


def test_a_running_folder_whose_process_is_gone_reads_died(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in ("here", "dead"):
        (tmp_path / name).mkdir()
    write_status(tmp_path / "here", RunStatus.running)  # this process: alive
    assert read_status(tmp_path / "here") == "running"
    record = write_status(tmp_path / "dead", RunStatus.running)
    write_json(tmp_path / "dead" / "status.json", record | {"pid": gone.pid})
    assert read_status(tmp_path / "dead") == "died"
    far = record | {"host": "elsewhere", "heartbeat": time.time() - 7200}
    (tmp_path / "far").mkdir()
    write_json(tmp_path / "far" / "status.json", far)
    assert read_status(tmp_path / "far") == "died"  # another host, no heartbeat for two hours
    write_json(tmp_path / "far" / "status.json", far | {"heartbeat": time.time() - 60})
    assert read_status(tmp_path / "far") == "running"


SMALL_SWEEP = ["-m", "model=digits-ideal", "scheduler=ddim,euler", "steps=2", "batch_size=1", "progress=false"]


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sweep of two jobs, made once per session; tests copy it before changing it."""

    def make(cwd: Path) -> None:
        result = run_cli([*SMALL_SWEEP, "logger=none", "hydra.sweep.dir=sweep"], cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]

    return shared_folder(tmp_path_factory, "small-sweep", make)


def test_corrupt_run_files_read_corrupt_and_a_resume_runs_them_again(
    small_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(small_sweep, tmp_path, dirs_exist_ok=True)
    sweep = tmp_path / "sweep"
    ddim, euler = job_folders(sweep)
    (ddim / "status.json").write_text('{"status": "fini')  # cut short
    (euler / "metrics.json").write_text("not json")
    assert read_status(ddim) == read_status(euler) == "corrupt"
    assert progress_line(sweep) == "sweep: 2 of 2 jobs done (0 finished, 0 failed, 2 corrupt), 0 left"

    report = run_main("scripts/compare.py", [str(sweep)], tmp_path, monkeypatch)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-3000:]
    assert "2 runs (0 finished, 2 not finished)" in report.stdout
    rows = json.loads((sweep / "report" / "report.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["corrupt", "corrupt"] and "cannot be read" in rows[0]["error"]

    resumed = run_main("scripts/run.py", [*SMALL_SWEEP, "logger=none", "hydra.sweep.dir=sweep"], tmp_path, monkeypatch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(ddim) == read_status(euler) == "finished"


# compare.py's main on a sweep folder, then with --out elsewhere: one process for both (its imports are slow)
COMPARE_TWICE = """import runpy, sys
main = runpy.run_path(sys.argv[1], run_name="compare")["main"]
print("in place:", main([sys.argv[2]]), file=sys.stderr)
print("elsewhere:", main([sys.argv[2], "--out", sys.argv[3]]), file=sys.stderr)
"""


def test_compare_on_a_read_only_sweep_says_so(small_sweep: Path, tmp_path: Path) -> None:
    # a read-only bind mount in a private mount namespace (root ignores file modes)
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare (user and mount namespaces) for a read-only folder")
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep / "sweep", sweep)
    shutil.rmtree(sweep / "report")
    (tmp_path / "twice.py").write_text(COMPARE_TWICE)
    compare = f"{sys.executable} {tmp_path / 'twice.py'} {ROOT / 'scripts' / 'compare.py'} {sweep} {tmp_path / 'else'}"
    mount = f"mount --bind {sweep} {sweep} && mount -o remount,ro,bind {sweep}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && {compare}"], capture_output=True,
                            text=True, env=cli_env(), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stderr.split("in place: ")
    assert "cannot write the report into" in first and "--out DIR" in first and second.startswith("2\n")
    assert "elsewhere: 0" in second and (tmp_path / "else" / "report.html").exists(), second[-3000:]
    assert not (sweep / "report").exists() and "Traceback" not in result.stderr


def test_compare_writes_elsewhere_with_out(small_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [str(small_sweep / "sweep"), "--out", str(tmp_path / "r")]
    result = run_main("scripts/compare.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "report" / "grid.png").exists()
    assert f"report: {tmp_path / 'r' / 'report.html'}" in result.stdout


# ------------------------------------------------------------------------------------------ names of folders

ESCAPES = {
    "model.name with ..": ["model.name=../../escaped"],
    "model.name with /": ["model.name=a/b"],
    "algorithm_type with ..": ["scheduler=dpmsolver", "scheduler.algorithm_type=../../../escaped"],
    "timestep_spacing with /": ["scheduler=ddim", "scheduler.timestep_spacing=x/../../../escaped"],
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_names_in_folder_templates_stay_inside_outputs(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    args = ["model=digits-ideal", "steps=2", "logger=none", "progress=false", *ESCAPES[case]]
    result = run_main("scripts/run.py", args, work, monkeypatch)
    refused = not case.startswith("model.name")  # the scheduler options are no valid values: refused, in outputs/
    assert result.returncode == (2 if refused else 0) and "Traceback" not in result.stderr, result.stderr
    made = [p for p in tmp_path.rglob("*") if p.is_dir() and "outputs" not in p.relative_to(tmp_path).parts]
    assert sorted(made) == [tmp_path / "a", work.parent, work]  # nothing outside outputs/
    (record,) = work.rglob(".hydra")  # Hydra's record sits in the run folder: outputs/runs/<date>/<name>
    run = record.parent
    assert run.parent.parent == work / "outputs" / "runs", run
    assert all(c.isalnum() or c in "._+-" for c in run.name) and ".." not in run.name
    expected = {"model.name with ..": "_._escaped", "model.name with /": "a_b"}.get(case, "digits-ideal")
    assert f"-{expected}-" in run.name


def test_a_slash_in_a_sweep_value_does_not_nest_job_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["-m", "model=digits-ideal", "model.name=x/y", "scheduler=ddim,euler", "steps=2", "batch_size=1"]
    args += ["logger=none", "progress=false", "hydra.sweep.dir=s"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [f.name for f in job_folders(tmp_path / "s")]
    assert names == ["0-x_y-ddim-2", "1-x_y-euler-2"]
    assert "sweep: 2 of 2 jobs done (2 finished, 0 failed), 0 left" in result.stdout + result.stderr
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["folders"] == {"0": names[0], "1": names[1]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.run.dir=", "hydra.run.dir is empty"),
        ("hydra.run.dir=outputs/${model.id}", "is outside"),
    ],
)
def test_an_empty_or_escaping_run_dir_is_refused(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    args = ["model=digits-ideal", "steps=2", "logger=none", "model.id=../../out", override]
    result = run_main("scripts/run.py", args, work, monkeypatch)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["w"]  # no folder made, nothing written


# ------------------------------------------------------------------------------------------ W&B's connection wait


class Silent:
    """A server that accepts connections, reads the requests and never answers: W&B waits for it until
    init_timeout. ``asked`` is set once a request has arrived."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.asked = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                self.asked.set()
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def test_ctrl_c_while_wandb_waits_for_its_server_exits_at_once(tmp_path: Path) -> None:
    server = Silent()
    env = {
        "WANDB_MODE": "online",
        "WANDB_API_KEY": "0" * 40,
        "WANDB_BASE_URL": f"http://127.0.0.1:{server.port}",
    }
    # W&B would wait 10 minutes for an answer: a command that ends within the communicate timeout did not wait
    args = ["model=digits-ideal", "steps=3", "progress=false", "logger.init_timeout=600", "hydra.run.dir=run"]
    proc = start_cli(args, cwd=tmp_path, env=env)
    try:
        wait_for(lambda: read_status(tmp_path / "run") == "running" and server.asked.is_set(), proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"Ctrl-C did not end the wait for W&B's server: {proc.communicate()[1][-2000:]}")
    finally:
        server.close()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert read_status(tmp_path / "run") == "interrupted"


def test_the_trajectory_holds_whole_snapshots_only(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from diffexp.runner.folder import Trajectory
    from diffexp.sampling.loop import StepState

    def state(k: int) -> StepState:
        x = torch.full((2, 1, 4, 4), float(k))
        return StepState(k, k, k, 3, 900.0 - k, 10.0 / k, x, -x, True, True, k == 3, 0.0, 0.0)

    trajectory = Trajectory(tmp_path / ".trajectory")
    (tmp_path / ".trajectory").mkdir()
    for k in (1, 2, 3):
        trajectory.append(state(k))
    with open(tmp_path / ".trajectory" / "x.raw", "ab") as f:
        f.write(b"\0" * 40)  # a fourth snapshot cut short
    trajectory.save(tmp_path / "trajectory.npz")
    saved = np.load(tmp_path / "trajectory.npz")
    assert saved["x"].shape == (3, 2, 1, 4, 4) and np.array_equal(saved["x"][:, 0, 0, 0, 0], [1, 2, 3])
    assert np.array_equal(saved["x0"], -saved["x"]) and saved["step"].tolist() == [1, 2, 3]
    assert saved["sigma"].dtype == np.float64 and saved["timestep"].tolist() == [899.0, 898.0, 897.0]
    assert not (tmp_path / ".trajectory").exists() and len(trajectory) == 0


def test_background_work_runs_in_order_and_its_failure_reaches_the_loop() -> None:
    from diffexp.runner.background import Background

    done: list[int] = []
    started = threading.Event()
    release = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)
        done.append(0)

    def fail() -> None:
        raise OSError("disk full")

    background = Background("test", most_pending=2)
    background.submit(slow)
    background.submit(lambda: done.append(1))
    started.wait(10)
    waiter = threading.Thread(target=lambda: background.submit(fail))  # two queued: waits for the oldest
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and done == []
    release.set()
    waiter.join(10)
    with pytest.raises(OSError, match="disk full"):
        background.wait()
    assert done == [0, 1]
    background.submit(fail)
    background.close()  # never raises
    assert background.pending == deque()
