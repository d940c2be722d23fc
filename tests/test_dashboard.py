"""The W&B dashboard of a sweep (diffexp.report.dashboard, scripts/dashboard.py), built offline for real sweeps:
every panel points at a key the runs logged, and a key they did not log leaves its panel out."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, cli_env, shared_folder
from omegaconf import OmegaConf
from wandb_workspaces.reports.v2 import internal as report_models
from wandb_workspaces.workspaces import internal as workspace_models

from diffexp.folders import DASHBOARD_FILE, job_folders
from diffexp.metrics.suite import QUALITY
from diffexp.report import dashboard as dash
from diffexp.report.logged import flat, read_logged
from diffexp.runner.summary import COST_AXES, COST_KEYS, SNAPSHOT_KEYS
from diffexp.tracking.reader import OfflineRun

COMMON = ["-m", "model=tiny", "batch_size=2", "log_every=1", "progress=false", "~hydra.callbacks.report"]
SWEEPS = {
    # 2 schedulers x 2 step counts, with the reference metrics (ref_*, x0_ref_rmse)
    "ref": ["scheduler=ddim,euler", "steps=2,3", "metrics=reference", "metrics.reference.steps=8"],
    "fast": ["scheduler=ddim", "steps=2", "metrics=fast"],  # no reference: no ref_* keys logged
}


@pytest.fixture(scope="session")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real multiruns, logged offline to W&B, run side by side; laid out as outputs/sweeps/<date>/<name>; made
    once per session (tests copy what they change)."""

    def make(root: Path) -> None:
        env = cli_env()
        procs = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "scripts/run.py"), *COMMON, *args, f"hydra.sweep.dir=sweeps/d/{name}"],
                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL,
            )
            for name, args in SWEEPS.items()
        ]  # fmt: skip
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out

    root = shared_folder(tmp_path_factory, "dashboard-sweeps", make)
    return {name: root / "sweeps" / "d" / name for name in SWEEPS}


def wandb_runs(sweep_dir: Path) -> list[OfflineRun]:
    return [OfflineRun.read(f / "wandb") for f in job_folders(sweep_dir)]


def panels(spec: Any) -> Iterator[dict[str, Any]]:
    """Every panel in a serialised workspace or report."""
    if isinstance(spec, dict):
        if "viewType" in spec and "config" in spec:
            yield spec
        for v in spec.values():
            yield from panels(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from panels(v)


def references(panel: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, key) for every key a serialised panel reads: history, summary, config or media."""
    c = panel["config"]
    refs = [*(("media", k) for k in c.get("mediaKeys", [])), *(("history", k) for k in c.get("metrics", []))]
    refs += [("history", c["xAxis"])] if panel["viewType"] == "Run History Line Plot" else []
    accessors = [c.get(a) for a in ("xAxis", "yAxis", "zAxis")] if panel["viewType"] == "Scatter Plot" else []
    for accessor in [*accessors, *(col["accessor"] for col in c.get("columns", []))]:
        if accessor:
            section, name = accessor.split(":", 1)
            refs.append((section, name.replace(".value", "") if section == "config" else name))
    return [("summary", name.removeprefix("summary_metrics.")) if name.startswith("summary_metrics.") else
            (where, name) for where, name in refs]  # fmt: skip


def check_all_logged(spec: dict[str, Any], runs: list[OfflineRun]) -> set[str]:
    """Every key of every panel is in the history, summary or config of the sweep's real .wandb files."""
    logged = {
        "history": {k for r in runs for row in r.history for k, v in row.items() if not isinstance(v, dict)},
        "media": {k for r in runs for row in r.history for k, v in row.items() if isinstance(v, dict)},
        "summary": {k for r in runs for k in r.summary},
        "config": {k for r in runs for k in flat(r.config)},
    }
    keys = set()
    for part in ("workspace", "report"):
        found = [ref for p in panels(spec[part]) for ref in references(p)]
        assert found
        for where, key in found:
            assert key in logged[where], (part, where, key)
            keys.add(key)
    return keys


def test_the_dashboard_of_a_sweep_points_only_at_logged_keys(sweeps: dict[str, Path]) -> None:
    runs = wandb_runs(sweeps["ref"])
    board = dash.build(read_logged([sweeps["ref"]]), "E", "diffexp")
    view, report = board.workspace._to_model(), board.report._to_model()
    assert isinstance(view, workspace_models.View) and isinstance(report, report_models.ReportViewspec)
    spec = json.loads(json.dumps(board.to_json()))
    # the JSON is W&B's own models: it validates back into them, and the workspace loads back
    assert workspace_models.View.model_validate(spec["workspace"]).spec.section.run_sets
    assert report_models.ReportViewspec.model_validate(spec["report"]).display_name == board.report.title
    assert type(board.workspace)._from_model(view).sections[0].name == "Quality vs cost"

    keys = check_all_logged(spec, runs)
    metrics = json.loads((job_folders(sweeps["ref"])[0] / "metrics.json").read_text())
    quality = [k for k in QUALITY if k in metrics]
    assert {"ref_rmse", "ref_psnr", "ref_ssim"} <= set(quality) <= keys
    assert {"x", "x0", "x0_change", "x0_ref_rmse", "nfe", "wall_s", "scheduler_label", "steps"} <= keys
    assert "net_evals" not in keys  # unguided: net_evals is nfe, shown once
    outline = {s["section"]: s["panels"] for s in spec["outline"]}
    assert list(outline) == ["Quality vs cost", "Trajectories", "Schedulers", "Cost"]
    assert outline["Quality vs cost"] == [f"{q} vs {x}" for q in quality for x in ("nfe", "wall_s")]
    assert outline["Cost"] == [k.name for k in COST_KEYS if k.name in metrics]
    assert {"compile_s: not in the runs' summary", "decode_s: not in the runs' summary"} <= set(spec["left_out"])
    # the runs: the sweep's group, sampling runs only, grouped by scheduler
    (runset,) = spec["workspace"]["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "config", "name": "scheduler_label.value"}]
    assert {f["key"]["name"]: f["value"] for f in runset["filters"]["filters"]} == {
        "group": [runs[0].run.run_group], "jobType": "sample"
    }  # fmt: skip
    texts = [b["content"] for b in spec["report"]["spec"]["blocks"] if b["type"] == "markdown-block"]
    assert any("equal NFE" in t for t in texts) and len(texts) == 5  # the intro and one per section


def test_a_sweep_without_reference_metrics_leaves_those_panels_out(sweeps: dict[str, Path]) -> None:
    spec = dash.build(read_logged([sweeps["fast"]]), "E", "diffexp").to_json()
    keys = check_all_logged(spec, wandb_runs(sweeps["fast"]))
    assert not {k for k in keys if "ref" in k}
    assert {"ref_rmse: not in the runs' summary", "x0_ref_rmse: not in the runs' history"} <= set(spec["left_out"])
    outline = {s["section"]: s["panels"] for s in spec["outline"]}
    # no quality metric logged: no quality section; one run, nothing swept: no parallel coordinates
    assert list(outline) == ["Trajectories", "Schedulers", "Cost"]
    assert outline["Trajectories"] == ["x", "x0", "x0_change vs step", "x0_change vs nfe"]
    assert outline["Schedulers"] == ["RunComparer"]


def test_panels_come_from_the_declarations(sweeps: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # the snapshot record is its declaration, plus the metrics' snapshot keys
    for line in (job_folders(sweeps["ref"])[0] / "steps.jsonl").read_text().splitlines():
        assert list(json.loads(line)) == [k.name for k in SNAPSHOT_KEYS] + ["x0_ref_rmse"]
    metrics = json.loads((job_folders(sweeps["ref"])[0] / "metrics.json").read_text())
    assert {k.name for k in COST_AXES} <= set(metrics)
    # a quality metric declared later (here: a snapshot statistic's final value) appears by itself
    logged = read_logged([sweeps["fast"]])
    for summary in logged.summaries:
        summary["sharpness"] = 1.0
    monkeypatch.setattr(dash, "QUALITY", {**QUALITY, "sharpness": "higher"})
    outline = {s["section"]: s["panels"] for s in dash.build(logged, "E", "diffexp").to_json()["outline"]}
    assert outline["Quality vs cost"] == ["sharpness vs nfe", "sharpness vs wall_s"]


def no_wandb_key(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    home.mkdir(exist_ok=True)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))


def test_script_dry_run_and_without_a_key(
    sweeps: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main = runpy.run_path(str(ROOT / "scripts" / "dashboard.py"))["main"]
    shutil.copytree(sweeps["ref"].parent.parent, tmp_path / "sweeps", symlinks=True)  # the script writes there
    ref = tmp_path / "sweeps" / sweeps["ref"].relative_to(sweeps["ref"].parent.parent)
    target = ref / DASHBOARD_FILE
    group = wandb_runs(ref)[0].run.run_group
    # --group finds the sweep folder under --sweeps (outputs/sweeps/<date>/<time>-<id>)
    assert main(["--entity", "E", "--group", group, "--sweeps", str(tmp_path / "sweeps"), "--dry-run"]) == 0
    spec = json.loads(target.read_text())
    assert spec["entity"] == "E" and spec["groups"] == [group] and list(panels(spec["workspace"]))
    target.unlink()

    no_wandb_key(monkeypatch, tmp_path / "home")
    capsys.readouterr()
    assert main(["--entity", "E", str(ref)]) == 1
    err = capsys.readouterr().err
    assert "not saved to W&B: no W&B API key is configured" in err and "wandb login" in err and str(target) in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert json.loads(target.read_text())["groups"] == [group]  # written first


def test_sweep_end_writes_the_specification_and_saves_only_online(
    sweeps: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = tmp_path / "d" / "fast"
    shutil.copytree(sweeps["fast"], fast, symlinks=True)  # the sweep's end writes into its folder
    target = fast / DASHBOARD_FILE
    assert dash.sweep_dashboard(OmegaConf.create({"dashboard": False}), fast) is None
    assert dash.sweep_dashboard(None, fast) is None and not target.exists()
    cfg = OmegaConf.create({"dashboard": True, "mode": "offline", "project": "diffexp", "entity": None})
    assert dash.sweep_dashboard(cfg, fast) is None
    assert json.loads(target.read_text())["groups"] == [wandb_runs(fast)[0].run.run_group]
    no_wandb_key(monkeypatch, tmp_path / "home")
    cfg.mode = None
    assert dash.offline_reason() == "no W&B API key is configured"
    assert dash.sweep_dashboard(cfg, fast) is None


def test_jobs_logged_without_wandb_are_read_from_their_folders(sweeps: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "d" / "fast"
    shutil.copytree(sweeps["ref"], copy, ignore=shutil.ignore_patterns("wandb"))
    from_folders, from_wandb = read_logged([copy]), read_logged([sweeps["ref"]])
    assert from_folders.groups == ["fast"]  # the sweep's group: its folder name
    assert from_folders.history == {k for k in from_wandb.history if not k.startswith("_")}
    assert from_folders.swept() == from_wandb.swept() == ["scheduler_label", "steps"]
    assert from_folders.summary <= from_wandb.summary
    assert dash.build(from_folders, "E", "diffexp").to_json()["outline"][0]["panels"][0] == "ref_rmse vs nfe"


@pytest.mark.parametrize("entity", [[], ["--entity", "E"]])
def test_script_on_a_dead_wandb_server_writes_the_specification_and_says_why(
    sweeps: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    entity: list[str],
) -> None:
    import time

    main = runpy.run_path(str(ROOT / "scripts" / "dashboard.py"))["main"]
    no_wandb_key(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "5")
    target = tmp_path / "dashboard.json"
    started = time.monotonic()
    assert main([*entity, str(sweeps["ref"]), "--out", str(target)]) == 1
    assert time.monotonic() - started < 120
    err = capsys.readouterr().err
    assert "not saved to W&B: W&B refused or could not be reached" in err and str(target) in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert json.loads(target.read_text())["groups"]
