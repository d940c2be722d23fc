"""Sweeps through Hydra's multirun: job folders, failure isolation, exit status, progress, resuming, launchers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_main, shared_folder
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffexp.config import config_dir
from diffexp.folders import job_folders, read_status
from diffexp.report.write import write_report
from diffexp.sweep.callbacks import check_same_sweep, planned_jobs

# 3 schedulers x 2 step counts; pndm cannot run 2 steps (refused before sampling) and kdpm2-ancestral
# diverges to NaN at 2 steps (fails while sampling): 4 runs finish, 2 fail, each in its own folder
SWEEP = [
    "-m",
    "model=digits-ideal",
    "scheduler=ddim,kdpm2-ancestral,pndm",
    "steps=2,5",
    "batch_size=2",
    "log_every=1",
    "progress=false",
]
FAILED = {"kdpm2-ancestral-2", "pndm-2"}


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One real 3 x 2 multirun, shared by the tests that read it (they copy it before changing it), and by the
    pytest-xdist workers of one session."""

    def make(cwd: Path) -> None:
        result = run_cli([*SWEEP, "hydra.sweep.dir=sweep"], cwd=cwd)
        (cwd / "result.json").write_text(json.dumps([result.args, result.returncode, result.stdout, result.stderr]))

    cwd = shared_folder(tmp_path_factory, "shared-sweep", make)
    return cwd / "sweep", subprocess.CompletedProcess(*json.loads((cwd / "result.json").read_text()))


def _label(folder: Path) -> str:
    return folder.name.split("-", 1)[1].removeprefix("digits-ideal-")


def test_multirun_runs_every_job_and_isolates_failures(sweep: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    sweep_dir, result = sweep
    folders = job_folders(sweep_dir)
    assert [f.name for f in folders] == sorted(
        f"{n}-digits-ideal-{s}-{k}" for n, (s, k) in enumerate((s, k) for s in ("ddim", "kdpm2-ancestral", "pndm")
                                                               for k in (2, 5))
    )  # fmt: skip
    for folder in folders:
        status = json.loads((folder / "status.json").read_text())
        if _label(folder) in FAILED:
            assert status["status"] == "failed"
            assert status["error"]
            assert not (folder / "metrics.json").exists()
        else:
            assert status["status"] == "finished", (folder, status)
            assert json.loads((folder / "metrics.json").read_text())["steps"] == int(folder.name.rsplit("-", 1)[1])
    assert "NaN" in json.loads((sweep_dir / "2-digits-ideal-kdpm2-ancestral-2" / "status.json").read_text())["error"]
    assert (
        "cannot run 2 steps" in json.loads((sweep_dir / "4-digits-ideal-pndm-2" / "status.json").read_text())["error"]
    )
    # the sweep says so: exit status 1, the failed jobs named with their errors, no traceback
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 job(s) of the sweep did not finish" in result.stderr
    assert "Traceback" not in result.stderr
    # progress after every job, and a summary
    log = result.stdout + result.stderr
    assert "sweep: 1 of 6 jobs done (1 finished, 0 failed), 5 left" in log
    assert "sweep: 6 of 6 jobs done (4 finished, 2 failed), 0 left" in log
    # the report was written at the end by itself
    assert (sweep_dir / "report.html").exists()
    assert json.loads((sweep_dir / "sweep.json").read_text())["total"] == 6


def test_rerun_skips_finished_jobs_and_retries_the_rest(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep[0], sweep_dir)
    missing = sweep_dir / "3-digits-ideal-kdpm2-ancestral-5"
    shutil.rmtree(missing)  # as if the sweep had been stopped before this job
    before = {f.name: (f / "metrics.json").read_bytes() for f in job_folders(sweep_dir) if read_status(f) == "finished"}
    assert len(before) == 3

    result = run_cli([*SWEEP, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 1  # the two impossible jobs fail again
    log = result.stdout + result.stderr
    assert log.count("finished before in") == 3
    for name, metrics in before.items():
        assert (sweep_dir / name / "metrics.json").read_bytes() == metrics  # not run again
    assert read_status(missing) == "finished"  # the missing job ran
    assert "sweep: 6 jobs (3 finished before: skipped)" in log


def test_a_sweep_folder_is_reused_only_by_the_same_sweep(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    def config(task: list[str]) -> DictConfig:
        return OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": {"params": None}}})

    check_same_sweep(config(list(reversed(SWEEP[1:]))), sweep[0])  # the same sweep: resumed
    with pytest.raises(SystemExit) as exit_:
        check_same_sweep(config([a if not a.startswith("steps=") else "steps=3" for a in SWEEP[1:]]), sweep[0])
    assert exit_.value.code == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_experiment_scheduler_sweep_is_a_multirun_of_schedulers_by_steps() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("run", overrides=["experiment=scheduler-sweep"], return_hydra_config=True)
    jobs = planned_jobs(cfg)
    assert jobs is not None and len(jobs) == 8 * 4
    assert {j[1] for j in jobs} == {f"steps={n}" for n in (5, 10, 20, 50)}
    assert {j[0] for j in jobs} >= {"scheduler=ddim", "scheduler=dpmsolver", "scheduler=euler", "scheduler=heun"}


def test_options_sweep_without_m_names_job_folders_by_what_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the experiment is a multirun by itself; the command line replaces its sweep and sweeps an option
    args = ["experiment=scheduler-sweep", "model=digits-ideal", "scheduler=dpmsolver", "steps=3", "logger=none"]
    args += ["scheduler.use_karras_sigmas=true,false", "batch_size=1"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep_dir.name)  # unique even within one second
    names = sorted(f.name for f in job_folders(sweep_dir))
    assert names == ["0-digits-ideal-dpmsolver-karras-3", "1-digits-ideal-dpmsolver-3"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_give_separate_runs(tmp_path: Path, launcher: str) -> None:
    options = {"joblib": ["hydra.launcher.n_jobs=2"], "submitit_local": ["hydra.launcher.timeout_min=10"]}[launcher]
    args = ["-m", "model=digits-ideal", "scheduler=ddim,euler", "steps=3", "batch_size=1", "progress=false"]
    result = run_cli([*args, f"hydra/launcher={launcher}", *options, "hydra.sweep.dir=s"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = job_folders(tmp_path / "s")
    assert [f.name for f in folders] == ["0-digits-ideal-ddim-3", "1-digits-ideal-euler-3"]
    labels = [json.loads((f / "metrics.json").read_text())["label"] for f in folders]
    assert labels == ["ddim-3", "euler-3"]
    assert all(read_status(f) == "finished" and (f / "samples.npy").exists() for f in folders)
    assert (tmp_path / "s" / "report.html").exists()


# ------------------------------------------------------------------------------------------ the comparison report


def test_report_holds_every_cell_and_marks_the_failed_ones(
    sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    sweep_dir = sweep[0]
    report = json.loads((sweep_dir / "report" / "report.json").read_text())  # written when the sweep ended
    cells = {(r["scheduler"], r["steps"]): r for r in report["rows"]}
    assert set(cells) == {(s, k) for s in ("ddim", "kdpm2-ancestral", "pndm") for k in (2, 5)}
    for (scheduler, steps), row in cells.items():
        failed = f"{scheduler}-{steps}" in FAILED
        assert row["status"] == ("failed" if failed else "finished")
        assert bool(row["error"]) == failed
        assert (row["nfe"] is None) == failed
        assert (row["samples"] is None) == failed
    assert cells[("kdpm2-ancestral", 5)]["nfe"] == 9  # second order: 2N - 1 model calls
    with (sweep_dir / "report" / "table.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    md = (sweep_dir / "report" / "table.md").read_text()
    assert md.count("| failed |") == 2 and md.count("| finished |") == 4
    # the grid marks the failed cells in red, and every part exists
    pixels = np.asarray(Image.open(sweep_dir / "report" / "grid.png").convert("RGB")).reshape(-1, 3).astype(int)
    red = (np.abs(pixels - [0xC6, 0x28, 0x28]).sum(axis=1) < 30).sum()
    assert red > 500
    for name in ("trajectories.png", "cost.png", "cost.svg"):
        assert (sweep_dir / "report" / name).stat().st_size > 1000
    assert report["quality"] == {"noisy_share": "lower", "residual_noise": "lower"}  # metrics=fast: residual noise


def test_compare_by_hand_and_quality_metrics_found_by_name(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep[0], sweep_dir)
    shutil.rmtree(sweep_dir / "report")
    (sweep_dir / "report.html").unlink()
    result = run_main("scripts/compare.py", [str(sweep_dir)], tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 runs (4 finished, 2 not finished)" in result.stdout
    assert (sweep_dir / "report.html").exists() and (sweep_dir / "report" / "grid.png").exists()

    # quality metrics are whichever known keys metrics.json holds; images/s stands in for one here
    report = write_report(sweep_dir, quality={"images_per_s": "higher", "absent_metric": "lower"})
    assert report.quality == {"images_per_s": "higher"}
    assert (sweep_dir / "report" / "images_per_s.png").exists() and (sweep_dir / "report" / "images_per_s.svg").exists()
    assert "images_per_s" in report.columns and "absent_metric" not in report.columns
    assert report.table_data()[0][report.columns.index("samples")].endswith("samples.png")
    assert "<h3>images_per_s" in report.html.read_text()


def test_compare_refuses_a_folder_that_is_not_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main("scripts/compare.py", [str(tmp_path)], tmp_path, monkeypatch)
    assert result.returncode == 2 and "holds no sweep jobs" in result.stderr


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers have a small /dev/shm
]


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Chromium and its driver, if this machine has them (the tests install nothing; .ci/run installs them)."""
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def browser(chromium: tuple[str, str], profile: Path):
    """Headless Chromium driven by selenium, logging the page's console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium[0]
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=chromium[1]))


def open_page(chromium: tuple[str, str], page: Path, screenshot: Path, profile: Path) -> dict:
    """Open ``page`` headless: its console errors, its images (loaded or not), and a full-page screenshot."""
    driver = browser(chromium, profile)
    try:
        driver.set_window_size(1400, 1000)
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, height)
        driver.save_screenshot(str(screenshot))
        text = driver.execute_script("return document.body.innerText")
    finally:
        driver.quit()
    return {"images": images, "errors": errors, "text": text}


def test_report_page_opens_offline_with_every_image(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], chromium: tuple[str, str], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(sweep[0], sweep_dir)
    page = (sweep_dir / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and not re.search(r'src="(?!data:)', page)  # self-contained

    # the check itself catches a broken image and a console error
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="data:image/png;base64,AAAA"><script>console.error("x")</script></body>')
    seen = open_page(chromium, broken, tmp_path / "broken.png", tmp_path / "profile-broken")
    assert seen["errors"] and seen["images"][0]["width"] == 0

    shutil.rmtree(sweep_dir / "report")  # nothing but the page itself
    seen = open_page(chromium, sweep_dir / "report.html", tmp_path / "report.png", tmp_path / "profile")
    assert seen["errors"] == []
    finished = [p for p in sweep_dir.glob("*/status.json") if json.loads(p.read_text())["status"] == "finished"]
    # grid, cost, noise levels, trajectories, the two residual-noise plots, each run's scrubber
    assert len(seen["images"]) == 4 + 2 + len(finished)
    assert all(i["complete"] and i["width"] > 100 for i in seen["images"]), seen["images"]
    assert "Runs that did not finish" in seen["text"] and "pndm, 2 steps" in seen["text"]
    shot = Image.open(tmp_path / "report.png")
    assert shot.width == 1400 and shot.height > 1500


def test_the_comparison_is_a_wandb_run_in_the_sweeps_group(
    sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from diffexp.tracking.reader import OfflineRun

    sweep_dir, _ = sweep
    compare = OfflineRun.read(sweep_dir / "report" / "wandb")
    job = OfflineRun.read(job_folders(sweep_dir)[0] / "wandb")
    assert compare.run.job_type == "compare" and compare.exit_code == 0
    assert compare.run.run_group == job.run.run_group == sweep_dir.name
    (row,) = compare.history
    assert row["comparison"]["_type"] == "table-file" and row["comparison"]["nrows"] == 6
    assert {"grid", "cost"} <= set(row) and compare.summary["failed"] == 2


SCRUB = """
const slider = document.getElementById("scrub-slider");
const shown = () => Array.from(document.querySelectorAll(".scrub-image")).map(i => i.src);
const steps = () => Array.from(document.querySelectorAll(".scrub-step")).map(s => s.textContent);
function move(value) { slider.value = value; slider.dispatchEvent(new Event("input")); return [shown(), steps()]; }
function pick(name, value) {
  const radio = document.querySelector(`input[name="${name}"][value="${value}"]`);
  radio.checked = true; radio.dispatchEvent(new Event("change")); return [shown(), steps()];
}
const label = () => document.getElementById("scrub-position").textContent;
const end = move(1000), start = move(0), x = pick("scrub-view", "x"), sigma = pick("scrub-align", "sigma");
const sigmaLabel = label(), sigmaEnd = move(1000);
return {end, start, x, sigma, sigmaEnd, sigmaLabel, runs: document.querySelectorAll(".scrub-run").length};
"""


def test_the_report_scrubs_every_run_with_one_slider(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], chromium: tuple[str, str], tmp_path: Path
) -> None:
    driver = browser(chromium, tmp_path / "profile")
    try:
        driver.get((sweep[0] / "report.html").as_uri())
        seen = driver.execute_script(SCRUB)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert not errors, errors
    finished = [p for p in sweep[0].glob("*/status.json") if json.loads(p.read_text())["status"] == "finished"]
    assert seen["runs"] == len(finished) > 1  # every finished run has a figure
    (end_src, end_steps), (start_src, start_steps) = seen["end"], seen["start"]
    assert all(src.startswith("data:image/png;base64,") for src in end_src + start_src)  # embedded: offline
    assert all(a != b for a, b in zip(end_src, start_src, strict=True))  # the slider moved every run
    assert start_steps != end_steps  # each run moved to its first snapshot
    assert seen["x"][0] != start_src  # x instead of x0, at the same position
    # by noise level: from the noisiest snapshot of each run to its cleanest, whatever its step count
    assert seen["sigmaLabel"].startswith("σ ≈") and seen["sigma"][1] == start_steps and seen["sigmaEnd"][1] == end_steps
