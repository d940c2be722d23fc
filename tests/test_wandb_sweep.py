"""The W&B sweep files: the command line W&B's agent builds from them reaches Hydra with the intended types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_main
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps import utils as sweep_utils

from diffexp.config import config_dir
from diffexp.sampling.schedulers import split_options
from diffexp.settings import compose, read_settings

CONFIG_DIR = config_dir()

SWEEP_FILES = sorted((CONFIG_DIR / "wandb").glob("*.yaml"))


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command W&B's agent runs for one set of values, built as wandb/wandb_agent.py (Agent._command_run) does:
    the values come from the server as JSON, the macros are filled by wandb's own create_sweep_command_args."""
    args = {k: {"value": v} for k, v in json.loads(json.dumps(values)).items()}
    macros = sweep_utils.create_sweep_command_args({"args": args})
    macros |= {"interpreter": ["python"], "program": [sweep["program"]], "env": ["/usr/bin/env"]}
    command = []
    for chunk in map(str, sweep_utils.create_sweep_command(list(sweep["command"]))):
        command += macros.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def candidates(spec: dict[str, Any]) -> list[Any]:
    """Values the sweep may choose for one parameter: each listed value, or the ends and middle of a range."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    lo, hi = spec["min"], spec["max"]
    if spec["distribution"] == "int_uniform":
        return [lo, (lo + hi) // 2, hi]
    assert spec["distribution"] == "uniform", spec
    return [float(lo), (lo + hi) / 2, float(hi)]


def intended(value: Any) -> Any:
    """What a value means: YAML's own types, and the string "null" for None (see the files' header)."""
    return None if value == "null" else value


def combinations(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Each value of each parameter once, the other parameters at their first value."""
    params = sweep["parameters"]
    base = {k: candidates(v)[0] for k, v in params.items()}
    return [base | {k: v} for k, spec in params.items() for v in candidates(spec)]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_agent_command_lines_parse_into_the_intended_types(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "bayes", "random") and sweep["program"] == "scripts/run.py"
    assert "${args_no_hyphens}" in sweep["command"]
    if sweep["method"] == "bayes":
        assert sweep["metric"]["goal"] in ("minimize", "maximize")
    parser = OverridesParser.create()
    runs = combinations(sweep)
    assert len(runs) >= 4
    for values in runs:
        command = agent_command(sweep, values)
        assert command[:3] == ["/usr/bin/env", "python", "scripts/run.py"]
        overrides = parser.parse_overrides(command[3:])
        parsed = {o.key_or_group: o.value() for o in overrides}
        assert parsed.keys() == values.keys()
        for key, value in values.items():
            want = intended(value)
            assert type(parsed[key]) is type(want) and parsed[key] == pytest.approx(want), (key, value, parsed[key])
        # the config composes, and every option has a type diffusers' scheduler class accepts
        cfg = compose(command[3:])
        split_options(read_settings(cfg).scheduler)
        for key, value in values.items():
            key = f"{key}.name" if key in ("model", "scheduler") else key  # a group: the file chosen
            assert OmegaConf.select(cfg, key) == pytest.approx(intended(value))


def test_why_null_is_written_as_a_string() -> None:
    # the agent writes f"{key}={value}": None becomes "None", which Hydra reads as a string
    parser = OverridesParser.create()
    (none,) = parser.parse_overrides(agent_command({"program": "p", "command": ["${args_no_hyphens}"]}, {"k": None}))
    assert none.value() == "None"
    (null,) = parser.parse_overrides(agent_command({"program": "p", "command": ["${args_no_hyphens}"]}, {"k": "null"}))
    assert null.value() is None
    values = {"a": True, "b": False, "c": 1e-5, "d": 0.5, "e": 7, "f": "trailing", "g": float("inf")}
    parsed = parser.parse_overrides(agent_command({"program": "p", "command": ["${args_no_hyphens}"]}, values))
    assert [o.value() for o in parsed] == list(values.values())
    assert [type(o.value()) for o in parsed] == [bool, bool, float, float, int, str, float]


def test_one_agent_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = yaml.safe_load((CONFIG_DIR / "wandb" / "sweep-grid.yaml").read_text())
    values = {"model": "digits-ideal", "scheduler": "dpmsolver", "steps": 3, "scheduler.use_karras_sigmas": True}
    command = agent_command(sweep, values)
    assert command[2] == "scripts/run.py", command  # env, python, the program, then its overrides
    args = [*command[3:], "batch_size=1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_main("scripts/run.py", args, tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["label"] == "dpmsolver-karras-3" and metrics["scheduler"]["config"]["use_karras_sigmas"] is True
